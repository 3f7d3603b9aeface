"""Paths as diffeat records them: the source of an image, made absolute."""

from __future__ import annotations

import os

__all__ = ["absolute_source"]


def absolute_source(source: str) -> str:
    """``source`` as stored with an entry: a relative path to an existing file (as the
    writer's working folder resolves it) made absolute, also the file part of a video
    frame's ``clip.mp4#12``; anything else (``<memory>``, a URL, an absolute path, free
    text naming no file) unchanged."""
    if not source or source.startswith("<") or "://" in source or os.path.isabs(source):
        return source
    path, sep, rest = source, "", ""
    if not os.path.isfile(source) and "#" in source:
        path, sep, rest = source.rpartition("#")
    try:
        if os.path.isfile(path):
            return os.path.abspath(path) + sep + rest
    except (OSError, ValueError):  # a name the filesystem cannot hold: not a file
        pass
    return source
