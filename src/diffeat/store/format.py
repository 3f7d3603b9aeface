"""Constants and small helpers of the on-disk format (spec: docs/store-format.md)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from diffeat.core.errors import StoreError

FORMAT_VERSION = 1

#: Root group attribute that marks a folder as a diffeat feature store.
ROOT_ATTR = "diffeat"
#: Image-group attribute written last, once every array of the entry is on disk.
COMPLETE_ATTR = "complete"

FEATURES_ARRAY = "features"
TIMESTEP_ARRAY = "timestep"
DIMENSION_NAMES = ("timestep", "channel", "y", "x")

#: Storage dtypes a store can write, and their element size (Blosc typesize).
STORAGE_DTYPES: dict[str, int] = {"float16": 2, "float32": 4}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}

#: Blosc settings, chosen by measurement on float16 feature maps (docs/store-format.md).
BLOSC_CNAME = "lz4"
BLOSC_CLEVEL = 5
BLOSC_SHUFFLE = "bitshuffle"


def blosc_codec(storage_dtype: str):  # -> zarr.codecs.BloscCodec
    from zarr.codecs import BloscCodec

    return BloscCodec(
        cname=BLOSC_CNAME,
        clevel=BLOSC_CLEVEL,
        shuffle=BLOSC_SHUFFLE,
        typesize=STORAGE_DTYPES[storage_dtype],
    )


def check_storage_dtype(dtype: object) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = {v: k for k, v in _TORCH_DTYPES.items()}.get(dtype, str(dtype))
    elif isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        dtype = np.dtype(dtype).name
    if dtype not in STORAGE_DTYPES:
        raise StoreError(
            f"unsupported store dtype {dtype!r}: use 'float16' (default, half the size) or "
            "'float32' (exact for float32 features); bfloat16 tensors are stored as either"
        )
    return str(dtype)


def torch_dtype(storage_dtype: str) -> torch.dtype:
    return _TORCH_DTYPES[storage_dtype]


def to_json_value(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), or a StoreError."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON-serialisable (no NaN/inf): {exc}") from None


def group_json(attributes: dict[str, Any]) -> bytes:
    """The ``zarr.json`` document of a zarr v3 group with ``attributes``."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


def parse_group_json(raw: bytes | None) -> dict[str, Any] | None:
    """The attributes of a group ``zarr.json``; None when missing, truncated or not a group."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        return None
    attrs = doc.get("attributes", {})
    return attrs if isinstance(attrs, dict) else None
