"""Deprecated: moved to :mod:`diffeat.testing.vit` (this module re-exports it)."""

import sys

from diffeat.compat import moved

sys.modules[__name__] = moved("diffeat.testing_vit", "diffeat.testing.vit")
