"""Old import paths kept working for a while: each warns once and points to the new one."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def moved(old: str, new: str) -> ModuleType:
    """The module now at ``new``, with a :class:`DeprecationWarning` naming both paths."""
    warnings.warn(
        f"{old} moved to {new}; import it from there ({old} will be removed)",
        DeprecationWarning,
        stacklevel=3,
    )
    return importlib.import_module(new)
