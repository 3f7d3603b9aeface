"""The version of diffeat, in one place.

``diffeat.__version__`` re-exports it and ``pyproject.toml`` reads it (setuptools'
dynamic ``version = {attr = ...}``), so core modules can name the version
without importing the package root.
"""

from __future__ import annotations

__version__ = "0.1.0"
