"""The zarr v3 feature store (format spec: docs/store-format.md)."""

from diffeat.store.featurestore import FeatureStore, MissingEntry
from diffeat.store.keys import InvalidKeyError

__all__ = ["FeatureStore", "InvalidKeyError", "MissingEntry"]
