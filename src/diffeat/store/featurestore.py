"""The zarr v3 feature store: extracted features on disk, computed once and reused.

The on-disk format is specified in ``docs/store-format.md``. In short::

    <root>/zarr.json                      attributes {"diffeat": {"format_version": 2}}
    <root>/<cache_key>/zarr.json          attributes = extractor info
    <root>/<cache_key>/<image_key>/       one group per image; "complete": true is written last
    <root>/<cache_key>/<image_key>/<layer>/features   [T, C, H, W], one chunk per timestep
    <root>/<cache_key>/<image_key>/<layer>/timestep   [T] int64 (the xarray coordinate)

Every image writes its own files only, so any number of processes may write
different images into one store at once. All zarr I/O of one call runs as one
batch of coroutines on one event loop (layers read and written concurrently);
every zarr call goes through :mod:`diffeat.store.zarr_io`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from diffeat.core.errors import StoreError
from diffeat.core.features import FeatureSet
from diffeat.core.paths import absolute_source
from diffeat.store.format import (
    BFLOAT16_VERSIONS,
    CHECKSUM_VERSION,
    COMPLETE_ATTR,
    DATA_ATTR,
    FEATURES_ARRAY,
    FORMAT_VERSION,
    LOCAL_FORMAT_VERSION,
    ROOT_ATTR,
    STORAGE_DTYPES,
    TIMESTEP_ARRAY,
    check_storage_dtype,
    chunk_keys,
    features_json,
    group_json,
    holds_bfloat16,
    itemsize,
    layout_version,
    parse_group_json,
    timestep_json,
    to_bytes,
    to_json_value,
    torch_dtype,
    zarr_data_type,
)
from diffeat.store.keys import check_key, check_layer_key, is_valid_key
from diffeat.store.xarray_view import with_coordinates
from diffeat.store.zarr_io import ZarrFolder, is_store_url, run

if TYPE_CHECKING:
    import xarray

__all__ = [
    "DamagedEntry",
    "DamagedRootError",
    "FeatureStore",
    "LayoutWriteError",
    "MissingEntry",
    "restore_root",
]

_FLOAT16_SOURCES = (torch.float32, torch.float64, torch.bfloat16)
_FLOAT16_MAX = 65504.0
#: bfloat16 has float32's exponent range: only the few float32 values within one bfloat16
#: rounding step of float32's maximum (and larger float64 ones) would become inf
_BFLOAT16_SOURCES = (torch.float32, torch.float64)
_BFLOAT16_MAX = float(torch.finfo(torch.bfloat16).max)
COMMIT_ATTEMPTS = 16
#: suffixes of the folders of writes in progress and of removals in progress; both end in
#: ``.partial``, which no key may, so listings never show them
STAGING_SUFFIX = ".partial"
TRASH_SUFFIX = ".deleted.partial"
#: a ``*.partial`` leftover (a killed writer's staging folder, an interrupted delete's
#: folder, a zarr temporary file) is removed by the next writer and by ``store verify
#: --repair`` only once nothing in it changed for this long: a live writer's is younger
LEFTOVER_AGE_S = 3600.0


def leftover_age(path: Path, now: float | None = None) -> float:
    """Seconds since anything under ``path`` last changed: the newest ``mtime`` of the
    path and every file and folder inside (a live writer keeps adding chunk files). A
    folder of a delete (``*.deleted.partial``: an entry renamed aside, its files' times
    unchanged) counts its own ``ctime`` too, which the rename sets."""
    now = time.time() if now is None else now
    stat = path.stat()
    newest = stat.st_mtime
    if path.name.endswith(TRASH_SUFFIX):
        newest = max(newest, stat.st_ctime)
    if path.is_dir():
        for dirpath, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, (Path(dirpath) / name).stat().st_mtime)
    return now - newest


class MissingEntry(KeyError):
    """There is no complete entry for ``(cache_key, image_key)`` in the store."""

    def __init__(self, cache_key: str, image_key: str, reason: str = "no complete entry") -> None:
        self.cache_key = cache_key
        self.image_key = image_key
        super().__init__(f"{reason} for image {image_key!r} under cache key {cache_key!r}")

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _bytes_by_top_folder(folder: Path) -> dict[str, int]:
    """Bytes of the files under ``folder``, per name directly in it (a file's own name, or
    the folder it lies below): one ``scandir`` walk, with ``os.walk``'s rules: links to
    folders are not followed, folders that cannot be listed and files removed meanwhile
    (by another process) count as nothing."""
    sizes: dict[str, int] = {}
    stack: list[tuple[str, str | None]] = [(os.fspath(folder), None)]
    while stack:
        current, top = stack.pop()
        try:
            listing = os.scandir(current)
        except OSError:  # gone, not a folder, or not ours to read
            continue
        with listing:
            for item in listing:
                name = top or item.name
                try:
                    if item.is_dir():
                        if not item.is_symlink():
                            stack.append((item.path, name))
                    else:
                        sizes[name] = sizes.get(name, 0) + item.stat().st_size
                except OSError:
                    pass
    return sizes


class DamagedRootError(StoreError):
    """The root ``zarr.json`` of a folder that holds diffeat features is missing or damaged."""

    def __init__(self, path: Path, what: str, cache_keys: list[str]) -> None:
        self.path = path
        shown = ", ".join(cache_keys[:3]) + (", ..." if len(cache_keys) > 3 else "")
        super().__init__(
            f"{path}/zarr.json, the feature store's root metadata, {what}, but the folder holds "
            f"diffeat features (cache keys {shown}): run `diffeat store verify --repair {path}` "
            "to rewrite it (the features are kept), or choose another path"
        )


class LayoutWriteError(StoreError):
    """A store whose layout can be read here but not written: one written on object storage
    and copied to a disk, or the other way round (open it with ``mode="r"``)."""


def _cache_keys_with_entries(path: Path, limit: int = 64) -> list[str]:
    """Names of the folders in ``path`` that look like cache-key groups of a diffeat store
    (a folder holding an entry: a group whose attributes have ``write_id``), looking at no
    more than ``limit`` folders and entries each."""
    found = []
    try:
        folders = sorted(p for p in path.iterdir() if p.is_dir() and is_valid_key(p.name))
    except OSError:
        return []
    for folder in folders[:limit]:
        try:
            entries = [p for p in folder.iterdir() if p.is_dir()][:limit]
        except OSError:
            continue
        for entry in entries:
            try:
                attrs = parse_group_json((entry / "zarr.json").read_bytes())
            except OSError:
                continue
            if attrs is not None and "write_id" in attrs:
                found.append(folder.name)
                break
    return found


def restore_root(path: str | os.PathLike[str]) -> bool:
    """Rewrite the root ``zarr.json`` of a feature store whose root metadata is missing or
    damaged (:class:`DamagedRootError`); returns False (and writes nothing) when the
    folder does not hold diffeat features or its root metadata is sound."""
    folder = Path(path).expanduser().absolute()
    if not folder.is_dir() or not _cache_keys_with_entries(folder):
        return False
    raw = None
    with contextlib.suppress(OSError):
        raw = (folder / "zarr.json").read_bytes()
    attrs = parse_group_json(raw)
    if attrs is not None and isinstance(attrs.get(ROOT_ATTR), dict):
        return False
    store = ZarrFolder(folder, read_only=False)
    version = CHECKSUM_VERSION if _has_checksums(folder) else 1
    if version == CHECKSUM_VERSION and _has_bfloat16(folder):
        version = BFLOAT16_VERSIONS[version]
    run(store.write("zarr.json", group_json({ROOT_ATTR: {"format_version": version}})))
    return True


def _has_checksums(folder: Path) -> bool:
    """Whether the first feature array found under ``folder`` has crc32c checksums (its
    store is then format 2 or later; else format 1)."""
    for meta in folder.glob(f"*/*/*/{FEATURES_ARRAY}/zarr.json"):
        try:
            codecs = json.loads(meta.read_bytes()).get("codecs", [])
        except (OSError, ValueError, AttributeError):
            continue
        return any(isinstance(c, dict) and c.get("name") == "crc32c" for c in codecs)
    return False


def _has_bfloat16(folder: Path) -> bool:
    """Whether an entry under ``folder`` records a bfloat16 layer (its store is then format 4)."""
    for meta in folder.glob("*/*/zarr.json"):
        try:
            layers = (parse_group_json(meta.read_bytes()) or {}).get("layers")
        except OSError:
            continue
        if isinstance(layers, dict) and any(
            isinstance(spec, dict) and spec.get("dtype") == "bfloat16" for spec in layers.values()
        ):
            return True
    return False


def root_version(where: object, attrs: dict[str, Any]) -> int:
    """The ``format_version`` of a store's root attributes, checked (a StoreError naming
    ``where`` when it is missing, invalid or newer than this diffeat reads)."""
    marker = attrs.get(ROOT_ATTR)
    version = marker.get("format_version") if isinstance(marker, dict) else None
    if version is None:
        raise StoreError(
            f"{where} is a zarr store but not a diffeat feature store (its root group has no "
            f"'{ROOT_ATTR}' attribute): choose another path for the features"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreError(f"{where}: invalid diffeat store format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{where} uses diffeat store format {version}, but this diffeat reads format "
            f"{FORMAT_VERSION} at most: upgrade diffeat (pip install -U diffeat) or choose "
            "another path"
        )
    return version


class DamagedEntry(StoreError):
    """A complete entry whose data cannot be used as recorded (unreadable, missing chunks,
    shape or dtype not as the entry says)."""

    def __init__(self, store_path: Path, cache_key: str, image_key: str, problem: str) -> None:
        self.cache_key = cache_key
        self.image_key = image_key
        self.problem = problem
        super().__init__(
            f"{store_path}/{problem}. The entry {image_key!r} under cache key {cache_key!r} "
            f"cannot be used: run `diffeat store verify --repair {store_path}` (it removes "
            "damaged entries) and extract again to recompute it"
        )


def _overflows(src: torch.Tensor, limit: float = _FLOAT16_MAX) -> bool:
    """True if a finite value of ``src`` is beyond ``limit`` in size (the largest finite
    value of the storage dtype: float16's by default)."""
    if not src.numel():
        return False
    lo, hi = torch.aminmax(src)  # one fast pass; the exact check only when it fails
    if -limit <= float(lo) and float(hi) <= limit:
        return False
    return bool(((src.abs() > limit) & src.isfinite()).any())


async def gather_all(coros) -> list[Any]:
    """Like ``asyncio.gather``, but on failure waits for every other coroutine to end
    before raising (so that a cleanup after it races with no pending write)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def complete_attrs(raw: bytes | None) -> dict[str, Any] | None:
    """The attributes of an image group's ``zarr.json`` if it marks a COMPLETE entry."""
    attrs = parse_group_json(raw)
    if (
        attrs is None
        or attrs.get(COMPLETE_ATTR) is not True
        or not isinstance(attrs.get("layers"), dict)
        or not isinstance(attrs.get("timesteps"), list)
    ):
        return None
    return attrs


class FeatureStore:
    """A folder of extracted features in zarr v3 format.

    ``path`` may also be an object-store URL (``s3://bucket/feats.zarr``, ``gs://``,
    ``az://``): the store is then an :class:`~diffeat.store.objectstore.ObjectFeatureStore`
    (same methods; ``path`` is the URL string).

    ``mode="a"`` opens the store for reading and writing and creates it if the
    folder is missing or empty; ``mode="r"`` opens an existing store read-only.
    ``dtype`` is the storage dtype of the feature arrays this handle writes:
    ``"float16"`` (default), ``"float32"`` (exact for float32 features) or
    ``"bfloat16"`` (the raw bits in ``uint16`` arrays; the store's first bfloat16
    write moves it to format 4, or 5 on object storage: docs/store-format.md,
    *Storage dtypes*). Reads return whatever was stored, cast to the dtype asked for.
    """

    FORMAT_VERSION = FORMAT_VERSION

    def __new__(cls, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> FeatureStore:
        # an object-store URL (s3://, gs://, az://) opens the object-store implementation
        if cls is FeatureStore and is_store_url(path):
            from diffeat.store.objectstore import ObjectFeatureStore

            return super().__new__(ObjectFeatureStore)
        return super().__new__(cls)

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: Literal["r", "a"] = "a",
        *,
        dtype: str | torch.dtype = "float16",
    ) -> None:
        if mode not in ("r", "a"):
            raise StoreError(
                f"invalid store mode {mode!r}: use 'r' (read-only) or 'a' (read/write)"
            )
        self.path = Path(path).expanduser().absolute()
        self.mode = mode
        self.dtype = check_storage_dtype(dtype)
        self._known_groups: set[str] = set()
        self._swept: set[str] = set()  # cache keys whose old leftovers this writer removed
        self._writing: set[str] = set()  # write ids of this object's puts in progress
        try:
            self.format_version = self._open()
        except OSError as exc:
            raise StoreError(f"cannot open the feature store {self.path}: {exc}") from exc

    # ------------------------------------------------------------------ opening

    def _open(self) -> int:
        path = self.path
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is a file, not a feature store folder: choose another path")
        if not path.exists() and self.mode == "r":
            raise StoreError(
                f"no feature store at {path}: the folder does not exist (check the path, or "
                "extract features into it first)"
            )
        self._store = ZarrFolder(path, read_only=self.mode == "r")
        raw = self._read_now("zarr.json")
        if raw is None:
            raw = self._read_missing_root()
        attrs = parse_group_json(raw)
        if attrs is None:
            holds = _cache_keys_with_entries(path)
            if holds:
                raise DamagedRootError(path, "is not readable zarr v3 group metadata", holds)
            raise StoreError(
                f"{path}/zarr.json is not a readable zarr v3 group, so {path} is not a diffeat "
                "feature store (or its root metadata is damaged): choose another path"
            )
        version = root_version(path, attrs)
        if layout_version(version) > LOCAL_FORMAT_VERSION and self.mode == "a":
            raise LayoutWriteError(
                f"{path} is a format {version} store (written on object storage, then copied "
                "here): a local path can read it but not write into it; open it with mode='r', "
                "or write through its object-store URL"
            )
        return version

    def _read_missing_root(self) -> bytes | None:
        """The root zarr.json of a folder that had none a moment ago: created when the
        folder is empty (or the root of another process that won the create). Before
        calling the folder damaged or foreign, look once more: another process may have
        created the store since the first look."""
        path = self.path
        holds = _cache_keys_with_entries(path)
        if holds:
            if (raw := self._read_now("zarr.json")) is not None:
                return raw
            raise DamagedRootError(path, "is missing", holds)
        if self.mode == "r":
            raise StoreError(
                f"{path} is not a diffeat feature store (it has no zarr.json): check the path"
            )
        # another process may be creating the store right now: its zarr.json (or the
        # temporary file it is renaming) may already be there
        others = [p for p in path.iterdir() if not p.name.startswith("zarr.")]
        if others:
            if (raw := self._read_now("zarr.json")) is not None:
                return raw
            kind = "a zarr v2 store" if (path / ".zgroup").exists() else "not a zarr store"
            raise StoreError(
                f"{path} is {kind} and not empty, so it cannot become a diffeat feature "
                "store: choose a new or empty folder"
            )
        root = group_json({ROOT_ATTR: {"format_version": LOCAL_FORMAT_VERSION}})
        run(self._store.write_if_absent("zarr.json", root))
        return self._read_now("zarr.json")

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, mode={self.mode!r}, dtype={self.dtype!r})"

    def __reduce__(self):  # re-open by path in another process; nothing else is pickled
        return (_reopen, (str(self.path), self.mode, self.dtype))

    # ------------------------------------------------------------------ low level

    async def _aread(self, key: str) -> bytes | None:
        return await self._store.read(key)

    def _read_now(self, key: str) -> bytes | None:
        """Read one small file without the event-loop round trip where zarr allows."""
        return self._store.read_now(key)

    def _entry_now(self, prefix: str) -> dict[str, Any] | None:
        return complete_attrs(self._read_now(f"{prefix}/zarr.json"))

    async def _aentry(self, prefix: str) -> dict[str, Any] | None:
        """The attributes of a COMPLETE entry at ``prefix``, else None."""
        return complete_attrs(await self._aread(f"{prefix}/zarr.json"))

    async def _alist(self, prefix: str) -> list[str]:
        names = await self._store.list_dir(prefix)
        return sorted(n for n in names if is_valid_key(n))

    def _check_writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"the feature store {self.path} is open read-only (mode 'r')")

    def _prefix(self, cache_key: str, image_key: str) -> str:
        return f"{check_key(cache_key, 'cache key')}/{check_key(image_key, 'image key')}"

    def _stored_bytes(self, prefix: str) -> int:
        return sum(_bytes_by_top_folder(self.path / prefix).values())

    # ------------------------------------------------------------------ extractors

    def register_extractor(self, cache_key: str, info: dict[str, Any]) -> None:
        """Record what produced the features under ``cache_key`` (the cache-key group's attributes).

        Idempotent and safe to call from several processes at once. When the
        stored info differs from ``info`` only in ``"versions"`` the first
        record is kept; any other difference replaces it, with a warning.
        """
        self._check_writable()
        check_key(cache_key, "cache key")
        info = to_json_value(info, f"extractor info of cache key {cache_key!r}")
        if not isinstance(info, dict):
            raise StoreError(f"extractor info of cache key {cache_key!r} must be a dict")
        key = f"{cache_key}/zarr.json"
        try:
            self._register_info(cache_key, key, info)
        except self._io_errors() as exc:  # the system's refusal stays in the chain
            raise StoreError(
                f"registering cache key {cache_key!r} in {self.path} failed: {exc}"
            ) from exc

    def _register_info(self, cache_key: str, key: str, info: dict[str, Any]) -> None:
        current = parse_group_json(run(self._acreate_group(key, info)))
        self._known_groups.add(cache_key)
        if current == info:
            return
        if current:  # registered before, by us or by another process
            differing = sorted(k for k in set(current) | set(info) if current.get(k) != info.get(k))
            if differing == ["versions"]:
                return
            warnings.warn(
                f"feature store {self.path}: cache key {cache_key!r} was registered with a "
                f"different {', '.join(differing)}; replacing the stored extractor info",
                stacklevel=3,
            )
        # (re)write: the group was created empty by put(), or its info changed, or damaged
        run(self._store.write(key, group_json(info)))

    async def _acreate_group(self, key: str, attributes: dict[str, Any]) -> bytes | None:
        """Create a group ``zarr.json`` unless one exists (atomically); return what is there."""
        raw = await self._aread(key)
        if raw is None:
            await self._store.write_if_absent(key, group_json(attributes))
            raw = await self._aread(key)
        return raw

    def extractors(self) -> dict[str, dict[str, Any]]:
        """``cache_key -> info`` for every cache key in the store (``{}`` if never registered,
        or if its info is damaged: see :meth:`damaged_extractors`)."""
        return {k: v or {} for k, v in run(self._aextractors()).items()}

    def damaged_extractors(self) -> dict[str, str]:
        """``cache_key -> what is wrong`` for the cache keys whose extractor info (their
        ``zarr.json``) is missing or unreadable; their entries may be intact."""
        found = run(self._aextractors())
        return {k: self._damaged_info(k) for k, v in found.items() if v is None}

    def _damaged_info(self, cache_key: str) -> str:
        what = (
            "is missing"
            if not (self.path / cache_key / "zarr.json").exists()
            else ("is not readable zarr v3 group metadata")
        )
        return (
            f"{self.path}/{cache_key}/zarr.json (the extractor info of cache key {cache_key!r}) "
            f"{what}; its entries are kept: running `diffeat extract` with the same "
            f"configuration rewrites it, `diffeat store delete {self.path} --key {cache_key}` "
            "removes the cache key"
        )

    async def _aextractors(self) -> dict[str, dict[str, Any] | None]:
        keys = [k for k in await self._alist("") if (self.path / k).is_dir()]
        raws = await asyncio.gather(*(self._aread(f"{k}/zarr.json") for k in keys))
        return {key: parse_group_json(raw) for key, raw in zip(keys, raws)}

    # ------------------------------------------------------------------ entries

    def has(self, cache_key: str, image_key: str) -> bool:
        """True if a COMPLETE entry exists (half-written ones do not count)."""
        return self._entry_now(self._prefix(cache_key, image_key)) is not None

    def entries(self, cache_key: str) -> list[str]:
        """The image keys of the complete entries under ``cache_key``, sorted."""
        check_key(cache_key, "cache key")
        complete, _ = run(self._ascan(cache_key))
        return complete

    async def _ascan(self, cache_key: str) -> tuple[list[str], list[str]]:
        names = await self._alist(cache_key)
        # the markers are small local files: read in one worker thread, one after the
        # other (a coroutine per file through zarr costs ~40x more at 10k entries)
        keys = [f"{cache_key}/{n}/zarr.json" for n in names]
        found = [
            complete_attrs(raw) for raw in await asyncio.to_thread(self._store.read_files, keys)
        ]
        complete = [n for n, a in zip(names, found) if a is not None]
        incomplete = [n for n, a in zip(names, found) if a is None]
        return complete, incomplete

    def entry_info(self, cache_key: str, image_key: str) -> dict[str, Any]:
        """Source, layer shapes and dtype, timesteps, meta and bytes of a complete entry."""
        prefix = self._prefix(cache_key, image_key)
        attrs = self._entry_now(prefix)
        if attrs is None:
            raise MissingEntry(cache_key, image_key)
        layers = {}
        nbytes = 0
        for name, spec in attrs["layers"].items():
            shape = [int(s) for s in spec["shape"]]
            size = int(np.prod(shape)) * itemsize(spec["dtype"])
            layers[name] = {"shape": shape, "dtype": spec["dtype"], "nbytes": size}
            nbytes += size
        return {
            "cache_key": cache_key,
            "image_key": image_key,
            "source": attrs.get("source"),
            "timesteps": list(attrs["timesteps"]),
            "layers": layers,
            "meta": attrs.get("meta", {}),
            "nbytes": nbytes,
            "stored_bytes": self._stored_bytes(prefix),
        }

    def delete(
        self,
        cache_key: str,
        image_key: str,
        *,
        write_id: str | None = None,
        only_incomplete: bool = False,
    ) -> bool:
        """Remove an entry, complete or not; returns whether there was one to remove.

        The entry's folder is first moved aside (atomically) under a reserved
        ``*.deleted.partial`` name, then removed, so readers see the whole entry
        or none, and an interrupted delete leaves only an invisible leftover.
        With ``write_id``, only the complete entry of that write is removed; with
        ``only_incomplete``, only an incomplete entry. What else is found moved aside
        (another writer's complete entry, put in place meanwhile) is put back and kept.
        """
        self._check_writable()
        prefix = self._prefix(cache_key, image_key)
        return run(self._adelete(prefix, write_id, only_incomplete))

    def delete_cache_key(self, cache_key: str) -> int:
        """Remove everything under a cache key (its extractor info and every entry);
        returns the number of complete entries removed (0 if there was nothing)."""
        self._check_writable()
        check_key(cache_key, "cache key")
        if not (self.path / cache_key).is_dir():
            return 0
        complete, _ = run(self._ascan(cache_key))
        trash = _trash_name(cache_key)
        try:
            moved = run(self._store.rename_dir(cache_key, trash))
        except FileNotFoundError:
            return 0
        if moved:
            run(self._aremove(trash))
        self._known_groups.discard(cache_key)
        return len(complete)

    async def _aremove(self, prefix: str) -> None:
        """Remove a folder (and everything in it) if it is there."""
        try:
            await self._store.delete_dir(prefix)
        except FileNotFoundError:  # removed meanwhile
            pass

    async def _adelete(
        self, prefix: str, write_id: str | None = None, only_incomplete: bool = False
    ) -> bool:
        trash = _trash_name(prefix)
        try:
            if not await self._store.rename_dir(prefix, trash):
                return False  # pragma: no cover - the trash name is unique
        except FileNotFoundError:
            return False
        if write_id is not None or only_incomplete:
            moved = await self._aentry(trash)
            keep = moved is not None and (only_incomplete or moved.get("write_id") != write_id)
            if keep and await self._store.rename_dir(trash, prefix):
                return False  # not the entry asked for: put back
        await self._aremove(trash)
        return True

    # ------------------------------------------------------------------ writing

    def put(
        self,
        cache_key: str,
        image_key: str,
        features: FeatureSet,
        *,
        source: str | None = None,
        replace: bool = True,
    ) -> bool:
        """Write the features of one image; returns True if this write's entry is the one
        now in the store, False if another writer's complete entry was kept instead.

        The entry is written in full into a private staging folder, then moved into
        place in one atomic step, so readers see the old entry, or the new one, never
        a mixture, and a killed writer leaves only an invisible leftover.

        ``replace=True`` (default) replaces the complete entry that existed when the
        call began; ``replace=False`` keeps any complete entry (and writes nothing if
        there is one already). Either way an entry that another writer completes while
        this one writes is kept, never deleted (see *Concurrency* in docs/store-format.md).
        """
        self._check_writable()
        prefix = self._prefix(cache_key, image_key)
        if not isinstance(features, FeatureSet):
            raise TypeError(f"put() takes a FeatureSet, got {type(features).__name__}")
        if source is not None:
            source = absolute_source(os.fspath(source))
        for name in features.layers:
            check_layer_key(name)
        meta = to_json_value(features.meta, f"FeatureSet.meta of image {image_key!r}")
        if isinstance(meta, dict) and isinstance(meta.get("source"), str):
            meta["source"] = absolute_source(meta["source"])
        arrays = {
            name: self._to_numpy(image_key, name, tensor)
            for name, tensor in features.layers.items()
        }
        attrs = {
            COMPLETE_ATTR: True,  # true already in the staging folder: invisible until moved
            "write_id": uuid.uuid4().hex,
            "timesteps": list(features.timesteps),
            "source": source,
            "layers": {n: {"shape": list(a.shape), "dtype": self.dtype} for n, a in arrays.items()},
            "meta": meta,
        }
        timesteps = np.asarray(features.timesteps, dtype=np.int64)
        try:
            self._allow_bfloat16()
            return run(self._aput(cache_key, prefix, arrays, timesteps, attrs, replace))
        except self._io_errors() as exc:
            raise StoreError(f"writing {prefix} into {self.path} failed: {exc}") from exc

    def _allow_bfloat16(self) -> None:
        """Before this handle's first bfloat16 layer goes into a store whose format version
        does not allow bfloat16 layers, move its root to the version that does (2 -> 4 on a
        disk, 3 -> 5 on object storage), so that an older diffeat refuses the store instead
        of taking those layers for damage. Several writers doing this at once write the
        same root document."""
        if self.dtype != "bfloat16" or holds_bfloat16(self.format_version):
            return
        new = BFLOAT16_VERSIONS.get(self.format_version)
        if new is None:
            raise StoreError(
                f"{self.path} is a format {self.format_version} store, which cannot hold "
                "bfloat16 layers: store float16 or float32 there, or extract into a new store"
            )
        attrs = parse_group_json(self._read_now("zarr.json")) or {}
        marker = attrs.get(ROOT_ATTR)
        marker = dict(marker) if isinstance(marker, dict) else {}
        if not isinstance(marker.get("format_version"), int) or marker["format_version"] < new:
            marker["format_version"] = new
            run(self._store.write("zarr.json", group_json({**attrs, ROOT_ATTR: marker})))
        self.format_version = new

    def _io_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions of a failed write that become a StoreError (disk full, ...)."""
        return (OSError,)

    def _to_numpy(self, image_key: str, name: str, tensor: torch.Tensor) -> np.ndarray:
        target = torch_dtype(self.dtype)
        src = tensor.detach()
        limit = None
        if target == torch.float16 and src.dtype in _FLOAT16_SOURCES:
            limit = _FLOAT16_MAX
        elif target == torch.bfloat16 and src.dtype in _BFLOAT16_SOURCES:
            limit = _BFLOAT16_MAX
        if limit is not None and _overflows(src, limit):
            raise StoreError(
                f"layer {name!r} of image {image_key!r} has values beyond the {self.dtype} range "
                f"(|x| > {limit:g}): open the FeatureStore with dtype='float32' "
                "(--store-dtype float32)"
            )
        out = src.to(target)  # cast before leaving the GPU: half the bytes to copy
        if target == torch.bfloat16:  # numpy has no bfloat16: its raw bits, as uint16
            return out.cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        return out.cpu().contiguous().numpy()

    async def _aput(
        self,
        cache_key: str,
        prefix: str,
        arrays: dict[str, np.ndarray],
        timesteps: np.ndarray,
        attrs: dict[str, Any],
        replace: bool,
    ) -> bool:
        store = self._store
        if cache_key not in self._known_groups:
            await store.write_if_absent(f"{cache_key}/zarr.json", group_json({}))
            self._known_groups.add(cache_key)
        if cache_key not in self._swept:
            self._swept.add(cache_key)
            await asyncio.to_thread(self.sweep_leftovers, cache_key)
        current = await self._aentry(prefix)
        if current is not None and not replace:
            return False
        replaceable = None if current is None else current.get("write_id")
        staging = f"{prefix}.{attrs['write_id']}{STAGING_SUFFIX}"
        self._writing.add(attrs["write_id"])
        try:
            await gather_all(
                self._awrite_layer(staging, n, a, timesteps) for n, a in arrays.items()
            )
            await store.write(f"{staging}/zarr.json", group_json(attrs))  # the marker, last
            return await self._acommit(staging, prefix, replaceable)
        except BaseException:
            with contextlib.suppress(OSError):  # best effort: leave no leftover
                await self._aremove(staging)
            raise
        finally:
            self._writing.discard(attrs["write_id"])

    async def _acommit(self, staging: str, prefix: str, replaceable: str | None) -> bool:
        """Move the finished ``staging`` folder to ``prefix``: True when it is in place, False
        when another writer's complete entry is there (kept; ``staging`` is removed).

        Only what is at ``prefix`` and is not a complete entry of another write is moved
        aside: an incomplete leftover, or the complete entry ``replaceable`` that this
        write replaces. A complete entry moved aside by mistake (completed by another
        writer between the look and the move) is put back.
        """
        store = self._store
        for _attempt in range(COMMIT_ATTEMPTS):
            if await store.rename_dir(staging, prefix):
                return True
            there = await self._aentry(prefix)
            if there is not None and there.get("write_id") != replaceable:
                await self._aremove(staging)
                return False
            trash = _trash_name(prefix)
            try:
                if not await store.rename_dir(prefix, trash):
                    continue  # pragma: no cover - the trash name is unique
            except FileNotFoundError:
                continue  # moved away meanwhile by another writer: try again
            moved = await self._aentry(trash)
            if moved is not None and moved.get("write_id") != replaceable:
                if await store.rename_dir(trash, prefix):  # another writer's: put it back
                    await self._aremove(staging)
                    return False
            await self._aremove(trash)
        raise StoreError(
            f"{self.path}/{prefix}: could not put the entry in place after {COMMIT_ATTEMPTS} "
            "attempts (other processes kept replacing it); try again"
        )

    async def _awrite_layer(
        self, prefix: str, name: str, array: np.ndarray, timesteps: np.ndarray
    ) -> None:
        # Metadata is written directly (no existence checks, no parent creation: the
        # entry folder was just emptied and its group written), data through zarr.
        store = self._store
        layer = f"{prefix}/{name}"
        features_path = f"{layer}/{FEATURES_ARRAY}"
        steps_path = f"{layer}/{TIMESTEP_ARRAY}"
        checksum = self.format_version >= CHECKSUM_VERSION  # v1 stores stay readable by v1
        features_doc = features_json(array.shape, self.dtype, checksum=checksum)
        steps_doc = timestep_json(array.shape[0], checksum=checksum)
        await gather_all(
            [
                store.write(f"{layer}/zarr.json", group_json({})),
                store.write(f"{features_path}/zarr.json", to_bytes(features_doc)),
                store.write(f"{steps_path}/zarr.json", to_bytes(steps_doc)),
            ]
        )
        await gather_all(
            [
                store.write_chunks(features_path, features_doc, array, write_empty_chunks=True),
                store.write_chunks(steps_path, steps_doc, timesteps),
            ]
        )

    # ------------------------------------------------------------------ reading

    def get(
        self,
        cache_key: str,
        image_key: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        layers: Sequence[str] | None = None,
    ) -> FeatureSet:
        """The features of one image, as tensors on ``device`` in ``dtype`` (default float32).

        ``layers`` selects a subset (in that order); raises :class:`MissingEntry`
        (a ``KeyError``) when there is no complete entry.
        """
        prefix = self._prefix(cache_key, image_key)
        if isinstance(layers, str):
            raise TypeError("layers= takes a sequence of layer names, not a single string")
        names = None if layers is None else [check_layer_key(n) for n in layers]
        device = torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        on_cpu = device.type == "cpu"
        for _attempt in range(3):
            got = run(self._aget(cache_key, image_key, prefix, names, dtype if on_cpu else None))
            if got is not None:
                break
        else:
            raise MissingEntry(
                cache_key, image_key, "the entry kept changing while being read (being rewritten?)"
            )
        attrs, tensors = got
        if not on_cpu:  # move the stored (smaller) dtype, cast on the device
            tensors = {k: v.to(device).to(dtype) for k, v in tensors.items()}
        return FeatureSet(tensors, tuple(attrs["timesteps"]), attrs.get("meta", {}))

    async def _aget(
        self,
        cache_key: str,
        image_key: str,
        prefix: str,
        names: list[str] | None,
        cast: torch.dtype | None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        attrs = await self._aentry(prefix)
        if attrs is None:
            raise MissingEntry(cache_key, image_key)
        stored = attrs["layers"]
        names = list(stored) if names is None else names
        unknown = [n for n in names if n not in stored]
        if unknown:
            raise StoreError(
                f"image {image_key!r} under cache key {cache_key!r} has no layer "
                f"{', '.join(map(repr, unknown))}; it has {', '.join(map(repr, stored))}"
            )
        try:
            base = self._data_path(prefix, attrs)
        except DamagedEntry as exc:
            results: list[Any] = [exc]
        else:
            results = await asyncio.gather(
                *(self._aread_layer(base, n, stored[n], cast) for n in names),
                return_exceptions=True,
            )
        again = parse_group_json(await self._aread(f"{prefix}/zarr.json"))
        if again is None or again.get("write_id") != attrs.get("write_id"):
            return None  # rewritten or deleted while we read: try again
        tensors: list[torch.Tensor] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            tensors.append(result)
        return attrs, dict(zip(names, tensors))

    def _data_path(self, prefix: str, attrs: dict[str, Any]) -> str:
        """Where the layers of the entry at ``prefix`` are: the entry group itself, or (format
        3, object storage) the data prefix its marker names."""
        data = attrs.get(DATA_ATTR)
        if data is None:
            return prefix
        if not is_valid_key(data):
            raise self._damaged(
                f"{prefix}/zarr.json", f"its data prefix {data!r} is not a valid store key"
            )
        return f"{prefix}/{data}"

    def has_cache_key(self, cache_key: str) -> bool:
        """True if anything is stored under ``cache_key`` (its group exists)."""
        check_key(cache_key, "cache key")
        return (self.path / cache_key).is_dir()

    def reindex(self, cache_key: str) -> bool:
        """Rebuild the entry index of ``cache_key`` from the entries themselves; False when
        the store keeps no index (on a local disk the folders are the index)."""
        check_key(cache_key, "cache key")
        return False

    def _xarray_target(self) -> Any:
        return self.path

    def _damaged(self, path: str, what: str) -> DamagedEntry:
        cache_key, image_key = path.split("/")[:2]
        return DamagedEntry(self.path, cache_key, image_key, f"{path} is damaged: {what}")

    async def _adata_type(self, array_path: str) -> str | None:
        """The ``data_type`` an array's ``zarr.json`` names (None if unreadable)."""
        try:
            doc = json.loads(await self._aread(f"{array_path}/zarr.json") or b"")
        except (ValueError, UnicodeDecodeError, OSError):
            return None
        data_type = doc.get("data_type") if isinstance(doc, dict) else None
        return data_type if isinstance(data_type, str) else None

    async def _aread_layer(
        self, prefix: str, name: str, spec: dict[str, Any], cast: torch.dtype | None
    ) -> torch.Tensor:
        path = f"{prefix}/{name}/{FEATURES_ARRAY}"
        try:
            data, listed = await asyncio.gather(
                self._store.read_array(path), self._store.list_dir(path)
            )
        except Exception as exc:
            stored = await self._adata_type(path)
            if stored is not None and stored != zarr_data_type(spec.get("dtype")):
                what = f"its dtype {stored} is not the entry's recorded {spec.get('dtype')}"
            elif "checksum" in str(exc).lower():
                what = "a chunk's crc32c checksum does not match its bytes (they changed on disk)"
            else:
                what = f"{type(exc).__name__}: {exc}"
            raise self._damaged(path, what) from exc
        shape = [int(s) for s in spec.get("shape", [])]
        if list(data.shape) != shape:
            raise self._damaged(
                path, f"its shape {list(data.shape)} is not the entry's recorded {shape}"
            )
        if data.dtype.name != zarr_data_type(spec.get("dtype")):
            raise self._damaged(
                path, f"its dtype {data.dtype.name} is not the entry's recorded {spec.get('dtype')}"
            )
        present = set(listed)
        missing = [c for c in chunk_keys(shape) if c not in present]
        if missing:
            raise self._damaged(
                path,
                f"{len(missing)} of its chunk files are missing ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); they would read as NaN",
            )
        if spec.get("dtype") == "bfloat16":  # the raw bits of bfloat16 values, as uint16
            tensor = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(data)
        if cast is None or tensor.dtype == cast:
            return tensor
        # the cast runs in a worker thread, overlapping with the other layers' reads
        return await asyncio.to_thread(tensor.to, cast)

    # ------------------------------------------------------------------ checking

    def check_entry(self, cache_key: str, image_key: str) -> str | None:
        """Read a complete entry whole and say what is wrong with it: ``None`` when it is
        sound (or is not there: no complete entry, nothing to check), else a sentence.

        Checks what :meth:`get` checks (readable metadata and chunks, shapes and dtypes
        as recorded, every chunk present) and that every value is finite. Layers are
        read one at a time, in their storage dtype.
        """
        prefix = self._prefix(cache_key, image_key)
        attrs = self._entry_now(prefix)
        if attrs is None:
            return None
        problems = []
        for name, spec in attrs["layers"].items():
            if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
                problems.append(f"layer {name!r} has no recorded shape")
                continue
            recorded = spec.get("dtype")
            known = isinstance(recorded, str) and recorded in STORAGE_DTYPES
            dtype = torch_dtype(recorded) if known else torch.float32
            try:
                fs = self.get(cache_key, image_key, dtype=dtype, layers=[name])
            except MissingEntry:
                return None  # removed or being replaced meanwhile
            except DamagedEntry as exc:
                problems.append(exc.problem)
                continue
            tensor = fs.layers[name]
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                problems.append(f"layer {name!r} holds {bad} NaN or infinite values")
        return "; ".join(problems) or None

    def write_id(self, cache_key: str, image_key: str) -> str | None:
        """The ``write_id`` of a complete entry (None if there is none)."""
        attrs = self._entry_now(self._prefix(cache_key, image_key))
        return None if attrs is None else attrs.get("write_id")

    def scan(self, cache_key: str) -> tuple[list[str], list[str]]:
        """``(complete, incomplete)`` image keys under ``cache_key`` from the entries
        themselves (every entry is looked at; :meth:`entries` may use an index)."""
        check_key(cache_key, "cache key")
        return run(self._ascan(cache_key))

    def incomplete_entries(self, cache_key: str) -> list[str]:
        """Image keys of the incomplete entries under ``cache_key`` (see the format spec)."""
        check_key(cache_key, "cache key")
        return run(self._ascan(cache_key))[1]

    def leftovers(self, min_age_s: float = 0.0) -> list[Path]:
        """Files and folders left by killed writers or interrupted deletes (``*.partial``),
        outermost only. Staging folders and zarr's temporary files younger than
        ``min_age_s`` seconds are not listed (a live writer may own them); folders of
        deletes (``*.deleted.partial``) always are."""
        now = time.time()
        found: list[Path] = []
        for dirpath, dirs, files in os.walk(self.path):
            for name in [*dirs, *files]:
                if not name.endswith(STAGING_SUFFIX):
                    continue
                path = Path(dirpath) / name
                try:
                    age = leftover_age(path, now)
                except FileNotFoundError:
                    continue
                if name.endswith(TRASH_SUFFIX) or age >= min_age_s:
                    found.append(path)
            dirs[:] = [d for d in dirs if not d.endswith(STAGING_SUFFIX)]
        return sorted(found)

    def sweep_leftovers(self, cache_key: str, min_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
        """Remove the leftovers of killed writers where the next writer of ``cache_key``
        looks (the first ``put`` of each cache key does this): ``*.partial`` files and
        folders in the store's root folder and in ``cache_key``'s folder (staging folders,
        folders of interrupted deletes, zarr temporary files) that nothing changed in for
        ``min_age_s`` seconds (:func:`leftover_age`), never a staging folder of this
        object's own writes in progress. Best effort: a leftover that cannot be removed
        stays for ``diffeat store verify --repair``. Returns what was removed."""
        self._check_writable()
        now = time.time()
        removed: list[Path] = []
        for folder in (self.path, self.path / check_key(cache_key, "cache key")):
            try:
                names = [e.name for e in os.scandir(folder)]
            except OSError:
                continue
            for name in names:
                if not name.endswith(STAGING_SUFFIX):
                    continue
                parts = name.split(".")
                if len(parts) >= 3 and parts[-2] in self._writing:
                    continue  # a write of this object, in progress
                path = folder / name
                try:
                    if leftover_age(path, now) < min_age_s:
                        continue
                    self.remove_leftover(path)
                except OSError:
                    continue
                removed.append(path)
        return removed

    def remove_leftover(self, path: Path) -> None:
        """Remove one path listed by :meth:`leftovers` (gone already: nothing happens)."""
        self._check_writable()
        rel = Path(path).absolute().relative_to(self.path).as_posix()
        if not rel.endswith(STAGING_SUFFIX):
            raise StoreError(f"{path} is not a leftover of the store {self.path}")
        if Path(path).is_dir():
            run(self._aremove(rel))
        else:
            run(self._store.delete(rel))

    # ------------------------------------------------------------------ summaries

    def cache_key_bytes(self, cache_key: str) -> int:
        """Bytes stored for one extractor's entries (as :meth:`info` reports them), looking
        at that cache key only, not at the whole store."""
        check_key(cache_key, "cache key")
        return self._stored_bytes(cache_key)

    def info(self) -> dict[str, Any]:
        """A summary of the store (for ``diffeat store info``)::

        {"path": ..., "format_version": 2, "bytes": <on disk, whole store>,
         "extractors": {cache_key: {<the registered info: plugin, config, model,
                                     layers, ...>,
                                    "entries": <complete>, "incomplete": <count>,
                                    "bytes": <on disk>}}}
        """
        return run(self._ainfo())

    async def _ainfo(self) -> dict[str, Any]:
        extractors = await self._aextractors()
        scans = await asyncio.gather(*(self._ascan(k) for k in extractors))
        # one walk of the folders gives every cache key's bytes and the total
        by_key = await asyncio.to_thread(_bytes_by_top_folder, self.path)
        summary: dict[str, dict[str, Any]] = {}
        for (key, info), (complete, incomplete) in zip(extractors.items(), scans):
            summary[key] = {
                **(info or {}),
                "entries": len(complete),
                "incomplete": len(incomplete),
                "bytes": by_key.get(key, 0),
                "dtype": await self._asample_dtype(key, complete),
            }
            if info is None:
                summary[key]["damaged"] = self._damaged_info(key)
        return {
            "path": str(self.path),
            "format_version": self.format_version,
            "extractors": summary,
            "bytes": sum(by_key.values()),
        }

    async def _asample_dtype(self, cache_key: str, complete: list[str]) -> str | None:
        """The storage dtype of the entries under ``cache_key``, read from the first complete
        one (None: no entry). A source writes one dtype per cache key (the cache key names
        any storage dtype but float16); entries of several give ``"mixed (...)"``."""
        if not complete:
            return None
        attrs = await self._aentry(f"{cache_key}/{complete[0]}")
        layers = attrs.get("layers", {}) if attrs else {}
        # a damaged marker is `store verify`'s to report: info shows no dtype for it
        specs = [spec for spec in layers.values() if isinstance(spec, dict)]
        dtypes = sorted({str(spec.get("dtype")) for spec in specs})
        if not dtypes:
            return None
        return dtypes[0] if len(dtypes) == 1 else f"mixed ({', '.join(dtypes)})"

    # ------------------------------------------------------------------ xarray

    def open_xarray(self, cache_key: str, image_key: str, layer: str) -> xarray.Dataset:
        """One layer of an entry as an xarray Dataset: variable ``features`` with dims
        ``(timestep, channel, y, x)`` and a ``timestep`` coordinate (lazily loaded), plus
        each cell's centre in model-input and original-image pixels (``x_input``,
        ``y_input``, ``x_image``, ``y_image``) and the image transform in ``attrs``
        (:mod:`diffeat.store.xarray_view`)."""
        try:
            import xarray as xr
        except ImportError:
            raise StoreError(
                "FeatureStore.open_xarray needs xarray: pip install diffeat[xarray]"
            ) from None
        prefix = self._prefix(cache_key, image_key)
        check_layer_key(layer)
        attrs = self._entry_now(prefix)
        if attrs is None:
            raise MissingEntry(cache_key, image_key)
        if layer not in attrs["layers"]:
            raise StoreError(
                f"image {image_key!r} under cache key {cache_key!r} has no layer {layer!r}; it "
                f"has {', '.join(map(repr, attrs['layers']))}"
            )
        base = self._data_path(prefix, attrs)
        ds = xr.open_dataset(
            self._xarray_target(),
            engine="zarr",
            group=f"{base}/{layer}",
            zarr_format=3,
            consolidated=False,
            chunks=None,
        )
        ds.attrs.update(
            {
                "cache_key": cache_key,
                "image_key": image_key,
                "layer": layer,
                "source": attrs.get("source") or "",
            }
        )
        shape = ds[FEATURES_ARRAY].shape  # [T, C, h, w]
        transform = (attrs.get("meta") or {}).get("transform")
        if not isinstance(transform, dict):
            transform = None
        stride = None if transform else self._declared_stride(cache_key, layer)
        return with_coordinates(ds, (int(shape[-1]), int(shape[-2])), transform, stride)

    def _declared_stride(self, cache_key: str, layer: str) -> float | None:
        """The stride the extractor declared for ``layer`` (its registered info), if any."""
        info = parse_group_json(self._read_now(f"{cache_key}/zarr.json")) or {}
        for spec in info.get("layers") or []:
            if isinstance(spec, dict) and spec.get("name") == layer:
                with contextlib.suppress(TypeError, ValueError):
                    return float(spec["stride"])
        return None


def _trash_name(prefix: str) -> str:
    """A unique reserved name next to ``prefix`` for a folder on its way out."""
    return f"{prefix}.{uuid.uuid4().hex}{TRASH_SUFFIX}"


def _reopen(path: str, mode: str, dtype: str) -> FeatureStore:
    return FeatureStore(path, mode, dtype=dtype)  # type: ignore[arg-type]
