"""Constants and small helpers of the on-disk format (spec: docs/store-format.md)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from diffeat.core.errors import StoreError

#: the highest format version this diffeat reads
FORMAT_VERSION = 5
#: the version of a new store on a local disk (or shared filesystem)
LOCAL_FORMAT_VERSION = 2
#: the version of a new store on object storage, and the first whose entries may keep
#: their layers under a per-write data prefix (the ``data`` attribute of the entry)
OBJECT_FORMAT_VERSION = 3
#: the version a store of each layout version (2: disk, 3: object storage) moves to when its
#: first bfloat16 layer is written: 4 and 5 are 2 and 3 plus layers stored as the raw bits of
#: bfloat16 (``uint16`` arrays, entry dtype ``"bfloat16"``), which older readers would take
#: for damage, so they refuse these stores instead
BFLOAT16_VERSIONS = {LOCAL_FORMAT_VERSION: 4, OBJECT_FORMAT_VERSION: 5}
#: entry attribute naming the entry's data prefix (format 3 on object storage)
DATA_ATTR = "data"
#: the first format version whose arrays end their codecs with a crc32c checksum per chunk
CHECKSUM_VERSION = 2
CHECKSUM_CODEC: dict[str, Any] = {"name": "crc32c"}

#: Root group attribute that marks a folder as a diffeat feature store.
ROOT_ATTR = "diffeat"
#: Image-group attribute written last, once every array of the entry is on disk.
COMPLETE_ATTR = "complete"

FEATURES_ARRAY = "features"
TIMESTEP_ARRAY = "timestep"
DIMENSION_NAMES = ("timestep", "channel", "y", "x")
#: Chunk files are flat in the array folder (``features/c.3.0.0.0``): one folder per
#: array instead of 1 + 3 T nested ones, which matters on shared filesystems.
CHUNK_KEY_ENCODING = {"name": "default", "configuration": {"separator": "."}}

#: Storage dtypes a store can write, and their element size (Blosc typesize).
STORAGE_DTYPES: dict[str, int] = {"float16": 2, "float32": 4, "bfloat16": 2}
#: the default storage dtype (a cache key names the storage dtype only when it is another)
DEFAULT_STORAGE_DTYPE = "float16"
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
#: The zarr data type of a storage dtype's ``features`` arrays. zarr and numpy have no
#: bfloat16: its arrays hold the raw 16-bit patterns as ``uint16`` (the format extension of
#: versions 4 and 5), which readers view back as bfloat16.
ZARR_DATA_TYPES: dict[str, str] = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
#: the fill value of a bfloat16 array: the bits of bfloat16's quiet NaN (``0x7FC0``), so that
#: a missing chunk reads as NaN there too
BFLOAT16_NAN_BITS = 0x7FC0

#: Blosc settings, chosen by measurement on float16 feature maps (docs/store-format.md).
BLOSC_CNAME = "lz4"
BLOSC_CLEVEL = 5
BLOSC_SHUFFLE = "bitshuffle"


def layout_version(version: int) -> int:
    """The layout a store's format version has: 4 is 2 (disk) and 5 is 3 (object storage),
    with bfloat16 layers allowed; the others are their own."""
    return {v: k for k, v in BFLOAT16_VERSIONS.items()}.get(version, version)


def holds_bfloat16(version: int) -> bool:
    """Whether a store of this format version may hold bfloat16 layers."""
    return version in BFLOAT16_VERSIONS.values()


def blosc_json(storage_dtype: str) -> dict[str, Any]:
    """The ``blosc`` codec entry of a feature array's ``codecs`` list (``storage_dtype``: a
    storage dtype or a zarr data type; it sets the typesize)."""
    typesize = STORAGE_DTYPES.get(storage_dtype) or np.dtype(storage_dtype).itemsize
    return {
        "name": "blosc",
        "configuration": {
            "typesize": typesize,
            "cname": BLOSC_CNAME,
            "clevel": BLOSC_CLEVEL,
            "shuffle": BLOSC_SHUFFLE,
            "blocksize": 0,
        },
    }


def blosc_codec(storage_dtype: str):  # -> zarr.codecs.BloscCodec, for plain-zarr comparisons
    """Kept for benchmarks/bench_store.py: see :func:`diffeat.store.zarr_io.blosc_codec`."""
    from diffeat.store.zarr_io import blosc_codec

    return blosc_codec(storage_dtype)


def array_json(
    shape: tuple[int, ...],
    data_type: str,
    chunk_shape: tuple[int, ...],
    *,
    compressed: bool,
    fill_value: float | int | str,
    dimension_names: tuple[str, ...],
    checksum: bool = True,
    attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``zarr.json`` document of a zarr v3 array as the store writes it (``checksum``:
    a crc32c checksum at the end of every chunk, format version 2 on)."""
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compressed:
        codecs.append(blosc_json(data_type))
    if checksum:
        codecs.append(dict(CHECKSUM_CODEC))
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
        "chunk_key_encoding": CHUNK_KEY_ENCODING,
        "fill_value": fill_value,
        "codecs": codecs,
        "attributes": dict(attributes or {}),
        "dimension_names": list(dimension_names),
        "storage_transformers": [],
    }


def features_json(
    shape: tuple[int, ...], storage_dtype: str, *, checksum: bool = True
) -> dict[str, Any]:
    """Metadata of a ``features`` array ``[T, C, H, W]``: one chunk per timestep, Blosc,
    then (``checksum``) crc32c. A bfloat16 array is a ``uint16`` array of the raw bits whose
    attributes say so (``{"diffeat": {"dtype": "bfloat16"}}``)."""
    chunks = (1,) + tuple(max(int(d), 1) for d in shape[1:])
    bf16 = storage_dtype == "bfloat16"
    return array_json(
        shape,
        ZARR_DATA_TYPES[storage_dtype],
        chunks,
        compressed=True,
        fill_value=BFLOAT16_NAN_BITS if bf16 else "NaN",
        dimension_names=DIMENSION_NAMES,
        checksum=checksum,
        attributes={"diffeat": {"dtype": "bfloat16"}} if bf16 else None,
    )


def chunk_keys(shape: list[int] | tuple[int, ...]) -> list[str]:
    """The chunk file names of a ``features`` array of ``shape`` (one per timestep; none
    for an empty array, whose chunks are never written)."""
    if not shape or any(int(d) == 0 for d in shape):
        return []
    rest = ".0" * (len(shape) - 1)
    return [f"c.{t}{rest}" for t in range(int(shape[0]))]


def timestep_json(n: int, *, checksum: bool = True) -> dict[str, Any]:
    """Metadata of a ``timestep`` array ``[T]`` (int64, one uncompressed chunk; ``checksum``
    as for features)."""
    return array_json(
        (n,),
        "int64",
        (max(n, 1),),
        compressed=False,
        fill_value=0,
        dimension_names=DIMENSION_NAMES[:1],
        checksum=checksum,
    )


def to_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, allow_nan=False, indent=2).encode()


def check_storage_dtype(dtype: object) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = {v: k for k, v in _TORCH_DTYPES.items()}.get(dtype, str(dtype))
    elif isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        dtype = np.dtype(dtype).name
    if dtype not in STORAGE_DTYPES:
        raise StoreError(
            f"unsupported store dtype {dtype!r}: use 'float16' (default, half the size), "
            "'float32' (exact for float32 features) or 'bfloat16' (half the size, float32's "
            "range, fewer mantissa bits than float16)"
        )
    return str(dtype)


def torch_dtype(storage_dtype: str) -> torch.dtype:
    """The torch dtype of a storage dtype (``"bfloat16"`` -> ``torch.bfloat16``)."""
    return _TORCH_DTYPES[storage_dtype]


def zarr_data_type(recorded: object) -> object:
    """The zarr ``data_type`` the arrays of an entry's recorded layer dtype have (the
    recorded dtype itself when it is not a storage dtype this diffeat knows)."""
    return ZARR_DATA_TYPES.get(recorded, recorded) if isinstance(recorded, str) else recorded


def itemsize(recorded: str) -> int:
    """Bytes per value of a recorded layer dtype."""
    return STORAGE_DTYPES.get(recorded) or np.dtype(recorded).itemsize


def to_json_value(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), or a StoreError."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON-serialisable (no NaN/inf): {exc}") from None


def group_json(attributes: dict[str, Any]) -> bytes:
    """The ``zarr.json`` document of a zarr v3 group with ``attributes``, as bytes."""
    return to_bytes({"zarr_format": 3, "node_type": "group", "attributes": attributes})


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
