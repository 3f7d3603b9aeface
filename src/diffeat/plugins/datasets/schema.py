"""Deprecated: moved to :mod:`diffeat.core.datasets` (this module re-exports it)."""

import sys

from diffeat.compat import moved

sys.modules[__name__] = moved("diffeat.plugins.datasets.schema", "diffeat.core.datasets")
