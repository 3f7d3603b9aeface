"""Deprecated: moved to :mod:`diffeat.testing.sd` (this module re-exports it)."""

import sys

from diffeat.compat import moved

sys.modules[__name__] = moved("diffeat.testing_models", "diffeat.testing.sd")
