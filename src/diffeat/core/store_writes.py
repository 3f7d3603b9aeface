"""Stores that cannot be written: read what is there, compute the rest, warn once.

A feature store on a read-only folder, file system or bucket, or opened with
``mode="r"``, still holds useful entries. Whatever writes into the pipeline's
store (:class:`~diffeat.core.sources.FeatureSource` for features,
:class:`~diffeat.core.query_cache.QueryCache` for a matcher's per-query work)
asks :func:`can_write` before writing and hands a refused write to
:func:`refused_write`: the store is then marked as read-only for the rest of
the process, with ONE :class:`StoreWriteWarning` for the store, whoever
noticed first. Reads go on as before; what is missing is computed and not kept.
"""

from __future__ import annotations

import errno
import warnings
import weakref
from typing import Any

from diffeat.core.errors import DiffeatWarning

__all__ = ["StoreWriteWarning", "can_write", "mark_read_only", "refused_write", "write_refusal"]

#: the errno values of a write the system refuses (no permission, read-only file system)
REFUSED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class StoreWriteWarning(DiffeatWarning):
    """A feature store cannot be written: its entries are read, the rest is computed, not kept."""


# store object -> why it cannot be written (weak: a closed pipeline's store goes away)
_READ_ONLY: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
# stores that cannot be weakly referenced, by id (kept alive with them)
_READ_ONLY_BY_ID: dict[int, tuple[Any, str]] = {}


def _known(store: Any) -> str | None:
    try:
        return _READ_ONLY.get(store)
    except TypeError:
        held = _READ_ONLY_BY_ID.get(id(store))
        return held[1] if held is not None else None


def mark_read_only(store: Any, reason: str, *, stacklevel: int = 2) -> None:
    """Treat ``store`` as read-only from now on because of ``reason`` (e.g. "its folder is
    not writable"); warns once per store, the first time it is marked."""
    if _known(store) is not None:
        return
    try:
        _READ_ONLY[store] = reason
    except TypeError:
        _READ_ONLY_BY_ID[id(store)] = (store, reason)
    warnings.warn(
        f"the store {getattr(store, 'path', store)} is read-only ({reason}): features not in it "
        "are computed and not kept; use --no-store (store=None) or a writable --store",
        StoreWriteWarning,
        stacklevel=stacklevel + 1,
    )


def can_write(store: Any, *, stacklevel: int = 2) -> bool:
    """Whether writes into ``store`` are to be tried: False for a store opened with
    ``mode="r"`` (marked read-only here, with the warning) or one a write was refused by."""
    if _known(store) is not None:
        return False
    if getattr(store, "mode", "a") == "r":
        mark_read_only(store, "opened with mode 'r'", stacklevel=stacklevel + 1)
        return False
    return True


def write_refusal(exc: BaseException) -> str | None:
    """Why ``exc`` says the store refuses writes (no permission, read-only file system or
    store), or None for any other failure (a full disk, a bad value: not a refusal).

    The store wraps the system's error (``StoreError(...) from OSError``): the whole chain
    of causes is looked at.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and (
            isinstance(current, PermissionError) or current.errno in REFUSED_ERRNOS
        ):
            text = current.strerror or type(current).__name__
            return f"{text}: {current.filename}" if current.filename else text
        if "PermissionDenied" in type(current).__name__:  # object stores (obstore)
            return "permission denied"
        if "open read-only" in str(current):  # the store's own read-only mode
            return "opened with mode 'r'"
        current = current.__cause__ or current.__context__
    return None


def refused_write(store: Any, exc: BaseException, *, stacklevel: int = 2) -> bool:
    """When ``exc`` (raised by a write into ``store``) is a refusal (:func:`write_refusal`),
    mark the store read-only (one warning) and return True: the caller goes on without
    keeping what it computed. Any other error: False (the caller re-raises it)."""
    reason = write_refusal(exc)
    if reason is None:
        return False
    mark_read_only(store, reason, stacklevel=stacklevel + 1)
    return True
