"""Errors that reach the user as a message, not a traceback."""

from __future__ import annotations


class DiffeatError(Exception):
    """A problem the user can fix: bad input, a missing file, a bad config.

    The CLI prints the message (which names the file, key or value and the way
    out) and exits with status 2.
    """

    exit_code = 2


class ConfigError(DiffeatError):
    """A pipeline file or plugin option is invalid."""


class ImageError(DiffeatError):
    """An image cannot be read or decoded."""


class StoreError(DiffeatError):
    """A feature store cannot be opened or written as asked."""


class ModelLoadError(DiffeatError):
    """A model cannot be found or loaded."""


class PluginError(DiffeatError):
    """A plugin is missing, broken or registered something invalid."""


class DiffeatWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one
    ``warning: ...`` line on stderr."""
