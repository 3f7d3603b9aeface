"""The zarr v3 feature store (format spec: docs/store-format.md)."""

from diffeat.store.featurestore import (
    DamagedEntry,
    DamagedRootError,
    FeatureStore,
    LayoutWriteError,
    MissingEntry,
    restore_root,
)
from diffeat.store.keys import InvalidKeyError

__all__ = [
    "DamagedEntry",
    "DamagedRootError",
    "FeatureStore",
    "InvalidKeyError",
    "LayoutWriteError",
    "MissingEntry",
    "restore_root",
]
