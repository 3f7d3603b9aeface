"""Validation of the names that become folders in the store.

Every cache key, image key and layer name is checked here before it is joined
into a store path, so that nothing a caller passes can point outside the store
folder or collide with a zarr metadata or temporary file.
"""

from __future__ import annotations

import re

from diffeat.core.errors import StoreError
from diffeat.core.features import check_layer_name

MAX_KEY_LENGTH = 128

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class InvalidKeyError(StoreError, ValueError):
    """A cache key, image key or layer name that cannot be used as a store key.

    It is both a :class:`~diffeat.core.errors.StoreError` (the CLI prints it) and
    a :class:`ValueError`.
    """


def _reserved(name: str) -> bool:
    """Names zarr uses for its own files (``zarr.json``, ``*.partial`` temp files)."""
    low = name.lower()
    return low.startswith("zarr.") or low.endswith(".partial")


def is_valid_key(key: object) -> bool:
    return (
        isinstance(key, str)
        and _KEY.match(key) is not None
        and ".." not in key
        and not _reserved(key)
    )


def check_key(key: object, what: str = "key") -> str:
    """Return ``key`` if it is a valid cache key or image key, else raise :class:`InvalidKeyError`."""
    if not is_valid_key(key):
        raise InvalidKeyError(
            f"invalid {what} {key!r}: a store key is 1 to {MAX_KEY_LENGTH} characters, starts with "
            "a letter or digit, uses only letters, digits and '_', '.', '-', contains no '..' and "
            "is not a name zarr reserves ('zarr.*', '*.partial')"
        )
    return key  # type: ignore[return-value]


def check_layer_key(name: object) -> str:
    """Return ``name`` if it is a valid layer name that is also safe as a store key."""
    if not isinstance(name, str):
        raise InvalidKeyError(f"invalid layer name {name!r}: must be a string")
    try:
        check_layer_name(name)
    except ValueError as exc:
        raise InvalidKeyError(str(exc)) from None
    if len(name) > MAX_KEY_LENGTH or _reserved(name):
        raise InvalidKeyError(
            f"invalid layer name {name!r}: at most {MAX_KEY_LENGTH} characters and not a name "
            "zarr reserves ('zarr.*', '*.partial')"
        )
    return name
