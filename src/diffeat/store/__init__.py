"""The zarr v3 feature store (format spec: docs/store-format.md)."""

from diffeat.core.sources import set_store_opener
from diffeat.store.featurestore import FeatureStore, MissingEntry
from diffeat.store.keys import InvalidKeyError

__all__ = ["FeatureStore", "InvalidKeyError", "MissingEntry"]

set_store_opener(FeatureStore)  # core opens a store from a path through this, never by import
