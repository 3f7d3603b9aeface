"""The feature store's one door to zarr: every zarr import and call of :mod:`diffeat.store`.

The rest of the store package speaks bytes, keys and numpy arrays; this module turns
them into zarr calls. There are two ways through, and they write the same bytes:

fast path
    Coroutines run on zarr's own event loop (``zarr.core.sync.sync``); an array
    being written is built straight from the metadata document the store has just
    written (``zarr.AsyncArray(<dict>, ...)``, no read back of its ``zarr.json``);
    small files are read with ``LocalStore.get_sync`` where it exists (zarr >= 3.1.6),
    without an event-loop round trip. These lean on zarr internals, so the fast path
    is used only on the zarr releases it was tested with (:data:`FAST_PATH_ZARR`).

public path
    Public zarr API only: coroutines run on an event loop of this module's own (one
    thread, like zarr's), arrays are opened with ``zarr.AsyncArray.open`` after their
    ``zarr.json`` is written, small files are read through the event loop.

The fast path is taken when zarr's version is in :data:`FAST_PATH_ZARR` and neither
the environment variable ``DIFFEAT_ZARR_FAST_PATH=0`` nor :func:`use_fast_path`
(``False``) turns it off; otherwise the public path. The store format is the same
either way (docs/store-format.md): the metadata documents are the store's own bytes,
and chunks go through the same zarr codec pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
from zarr.abc.buffer import Buffer
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore, StorePath

from diffeat.core.errors import StoreError
from diffeat.store.format import blosc_json

__all__ = [
    "FAST_PATH_ENV",
    "FAST_PATH_ZARR",
    "STORE_URL_SCHEMES",
    "ZarrFolder",
    "ZarrObjects",
    "blosc_codec",
    "fast_path_active",
    "fast_path_supported",
    "is_store_url",
    "run",
    "use_fast_path",
    "zarr_version",
]

T = TypeVar("T")

#: zarr releases the fast path was tested with: ``(major, minor)`` from (inclusive)
#: to (exclusive). Keep in step with the ``zarr`` requirement in pyproject.toml.
FAST_PATH_ZARR: tuple[tuple[int, int], tuple[int, int]] = ((3, 1), (3, 2))
#: Set to ``0`` to take the public path on any zarr release.
FAST_PATH_ENV = "DIFFEAT_ZARR_FAST_PATH"

_switch: bool | None = None  # set by use_fast_path(); None: the environment decides


def zarr_version() -> str:
    """The installed zarr's version string."""
    return str(zarr.__version__)


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


_Internals = tuple[Callable[[Coroutine[Any, Any, Any]], Any], type[zarr.AsyncArray]]


def _load_internals() -> _Internals | None:
    """``(zarr.core.sync.sync, zarr.AsyncArray)`` when the installed zarr is a tested release."""
    version = _major_minor(zarr_version())
    low, high = FAST_PATH_ZARR
    if version is None or not low <= version < high:
        return None
    try:
        from zarr.core.sync import sync
    except ImportError:  # pragma: no cover - moved in an untested release
        return None
    return sync, zarr.AsyncArray


_INTERNALS = _load_internals()


def fast_path_supported() -> bool:
    """True if the installed zarr is one the fast path was tested with."""
    return _INTERNALS is not None


def fast_path_active() -> bool:
    """True if store calls take the fast path now (supported and not switched off)."""
    if _INTERNALS is None:
        return False
    if _switch is not None:
        return _switch
    return os.environ.get(FAST_PATH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def use_fast_path(enabled: bool) -> Iterator[None]:
    """Take the fast path (``True``, where supported) or the public path (``False``)
    for every store call made inside the ``with`` block, in every thread."""
    global _switch
    before = _switch
    _switch = bool(enabled)
    try:
        yield
    finally:
        _switch = before


# ---------------------------------------------------------------- event loop


class _Loop:
    """The public path's event loop: one daemon thread running ``run_forever``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="diffeat-zarr-io", daemon=True
                )
                thread.start()
                self._loop = loop
            return self._loop

    def forget(self) -> None:  # in a forked child the thread is gone
        self._lock = threading.Lock()
        self._loop = None


_LOOP = _Loop()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_LOOP.forget)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine of store calls to its end, from synchronous code."""
    if fast_path_active():
        sync = _INTERNALS[0]  # type: ignore[index]
        return sync(coro)
    loop = _LOOP.get()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("a synchronous store call was made from inside the store's event loop")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


# ---------------------------------------------------------------- files and arrays


def _buffer(data: bytes) -> Buffer:
    return default_buffer_prototype().buffer.from_bytes(data)


class ZarrFolder:
    """A local folder of zarr v3 files, as the store uses it: bytes under ``/``-separated
    keys (``"ck/img/zarr.json"``), folders to list and delete, and arrays to write or read
    whole. The async methods run on the event loop of :func:`run`."""

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self.path = path
        self._store = LocalStore(path, read_only=read_only)

    def read_now(self, key: str) -> bytes | None:
        """The bytes of one (small) file, or None if there is none; synchronous."""
        get_sync = getattr(self._store, "get_sync", None)  # LocalStore, zarr >= 3.1.6
        if get_sync is None or not fast_path_active():
            return run(self.read(key))
        buf = get_sync(key)
        return None if buf is None else buf.to_bytes()

    def read_files(self, keys: list[str]) -> list[bytes | None]:
        """The bytes of many small files (None for each missing one), read synchronously
        from the folder (the same bytes zarr's ``LocalStore.get`` returns)."""
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append((self.path / key).read_bytes())
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                out.append(None)
        return out

    async def read(self, key: str) -> bytes | None:
        """The bytes of one file, or None if there is none."""
        buf = await self._store.get(key, prototype=default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    async def write(self, key: str, data: bytes) -> None:
        """Write (or replace) one file, atomically."""
        await self._store.set(key, _buffer(data))

    async def write_if_absent(self, key: str, data: bytes) -> None:
        """Write one file unless it exists (atomically: one of several writers wins)."""
        await self._store.set_if_not_exists(key, _buffer(data))

    async def delete(self, key: str) -> None:
        """Remove one file; nothing happens if there is none."""
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        """Remove a folder and everything below it (``FileNotFoundError`` if it went meanwhile)."""
        await self._store.delete_dir(prefix)

    async def rename_dir(self, src: str, dst: str) -> bool:
        """Move the folder ``src`` to ``dst`` atomically unless ``dst`` exists (as a non-empty
        folder or a file): True if moved, False if ``dst`` was there. ``FileNotFoundError``
        if ``src`` is gone. (``rename(2)`` on a local filesystem; it never replaces a
        non-empty folder, so of several writers renaming onto one name exactly one wins.)"""
        try:
            os.rename(self.path / src, self.path / dst)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                return False
            raise
        return True

    async def list_dir(self, prefix: str) -> list[str]:
        """The names directly below ``prefix`` (``""``: the root), files and folders."""
        return [name async for name in self._store.list_dir(prefix)]

    async def write_chunks(
        self,
        path: str,
        metadata: dict[str, Any],
        data: np.ndarray,
        *,
        write_empty_chunks: bool = False,
    ) -> None:
        """Write ``data`` whole into the array at ``path``, whose ``zarr.json`` the caller
        has already written from the document ``metadata`` (``to_bytes(metadata)``).

        ``write_empty_chunks=True`` writes chunks that hold only the fill value too
        (and skips zarr's check for them).
        """
        if data.size == 0:
            return
        config = {"write_empty_chunks": write_empty_chunks}
        if fast_path_active():
            async_array = _INTERNALS[1]  # type: ignore[index]
            array = async_array(metadata, StorePath(self._store, path), config=config)
        else:
            array = await zarr.AsyncArray.open(StorePath(self._store, path), zarr_format=3)
            array = _with_config(array, config)
        await array.setitem(..., data)

    async def read_array(self, path: str) -> np.ndarray:
        """The whole array at ``path``; zarr's exceptions pass through (damaged metadata or chunks)."""
        array = await zarr.AsyncArray.open(StorePath(self._store, path), zarr_format=3)
        return await array.getitem(...)


# ---------------------------------------------------------------- object storage

#: URL schemes of object stores (opened with obstore through zarr's ``ObjectStore``)
STORE_URL_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure")


def is_store_url(path: object) -> bool:
    """True if ``path`` is an object-store URL (``s3://bucket/prefix`` and the like)."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return path.split("://", 1)[0].lower() in STORE_URL_SCHEMES


def _open_obstore(url: str) -> Any:
    """An obstore store for ``url``; credentials and settings come from the environment
    (obstore reads ``AWS_*``, ``GOOGLE_*``, ``AZURE_*``). For S3-compatible servers the
    endpoint is ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; plain ``http://`` endpoints
    are allowed."""
    try:
        from obstore.store import from_url
    except ImportError:
        raise StoreError(
            f"opening the feature store {url} needs obstore: pip install 'diffeat[s3]'"
        ) from None
    scheme = url.split("://", 1)[0].lower()
    kwargs: dict[str, Any] = {}
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["client_options"] = {"allow_http": True}
    return from_url(url, **kwargs)


class ZarrObjects(ZarrFolder):
    """An object-store prefix (``s3://bucket/feats.zarr``) seen as :class:`ZarrFolder`
    sees a folder, through zarr's :class:`zarr.storage.ObjectStore` (obstore), plus the
    conditional writes that replace renames there: create-if-absent (``If-None-Match``)
    and replace-if-unchanged (``If-Match`` on the ETag). There is no rename."""

    def __init__(self, url: str, *, read_only: bool) -> None:
        from zarr.storage import ObjectStore

        self.path = url  # type: ignore[assignment]
        self.objects = _open_obstore(url)
        self._store = ObjectStore(self.objects, read_only=read_only)  # type: ignore[assignment]

    @property
    def zarr_store(self) -> Any:
        """The zarr store object (for xarray)."""
        return self._store

    def read_now(self, key: str) -> bytes | None:
        return run(self.read(key))

    def read_files(self, keys: list[str]) -> list[bytes | None]:
        async def read_all() -> list[bytes | None]:
            return list(await asyncio.gather(*(self.read(k) for k in keys)))

        return run(read_all())

    async def read_versioned(self, key: str) -> tuple[bytes, str | None] | None:
        """The bytes of one object and its ETag, or None if there is none."""
        import obstore as obs

        try:
            resp = await obs.get_async(self.objects, key)
            data = bytes(await resp.bytes_async())
        except FileNotFoundError:
            return None
        return data, resp.meta.get("e_tag")

    async def create(self, key: str, data: bytes) -> bool:
        """Write one object unless it exists (``If-None-Match: *``): True if this call
        created it, False if it was there (of several writers exactly one gets True)."""
        import obstore as obs

        try:
            await obs.put_async(self.objects, key, data, mode="create")
        except obs.exceptions.AlreadyExistsError:
            return False
        except obs.exceptions.PreconditionError:  # some servers answer 412 for If-None-Match
            return False
        return True

    async def replace_if(self, key: str, data: bytes, e_tag: str | None) -> bool:
        """Replace one object only if its ETag is still ``e_tag`` (``If-Match``): True if
        replaced, False if it changed or went meanwhile."""
        import obstore as obs

        if e_tag is None:  # pragma: no cover - every S3/GCS/Azure object has an ETag
            raise StoreError(f"{self.path}/{key}: the object store gave no ETag")
        try:
            await obs.put_async(self.objects, key, data, mode={"e_tag": e_tag})
        except (obs.exceptions.PreconditionError, obs.exceptions.AlreadyExistsError):
            return False
        except FileNotFoundError:
            return False
        return True

    async def write_if_absent(self, key: str, data: bytes) -> None:
        await self.create(key, data)

    async def list_objects(self, prefix: str) -> list[dict[str, Any]]:
        """Every object below ``prefix`` (a folder: ``"ck/img"`` lists ``ck/img/...``), as
        obstore's metadata dicts (``path``, ``size``, ``last_modified``, ``e_tag``)."""
        import obstore as obs

        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out: list[dict[str, Any]] = []
        async for batch in obs.list(self.objects, prefix or None):
            out.extend(batch)
        return out

    async def list_dirs(self, prefix: str) -> list[str]:
        """The names of the "folders" (common prefixes) directly below ``prefix``."""
        import obstore as obs

        if prefix and not prefix.endswith("/"):
            prefix += "/"
        result = await obs.list_with_delimiter_async(self.objects, prefix or None)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in result["common_prefixes"]]

    async def any_object(self, prefix: str = "") -> bool:
        """True if at least one object lies below ``prefix``."""
        import obstore as obs

        if prefix and not prefix.endswith("/"):
            prefix += "/"
        async for batch in obs.list(self.objects, prefix or None, chunk_size=1):
            if batch:
                return True
        return False

    async def delete_many(self, keys: list[str]) -> None:
        """Remove objects (bulk requests where the store has them); gone ones are fine."""
        import obstore as obs

        if keys:
            with contextlib.suppress(FileNotFoundError):
                await obs.delete_async(self.objects, keys)

    async def delete_dir(self, prefix: str) -> None:
        await self.delete_many([m["path"] for m in await self.list_objects(prefix)])

    async def rename_dir(self, src: str, dst: str) -> bool:  # pragma: no cover - guard
        raise StoreError("object stores have no rename: this store must not be asked for one")


def _with_config(array: zarr.AsyncArray, config: dict[str, Any]) -> zarr.AsyncArray:
    """``array`` with the runtime ``config`` (zarr.AsyncArray.with_config from zarr 3.1.6 on;
    before, the public constructor with the opened array's own metadata, as it does)."""
    with_config = getattr(array, "with_config", None)
    if with_config is not None:
        return with_config(config)
    return type(array)(array.metadata, array.store_path, config=config)


def blosc_codec(storage_dtype: str) -> BloscCodec:
    """The store's Blosc codec for ``storage_dtype`` as a zarr codec object (for plain-zarr
    comparisons such as benchmarks/bench_store.py)."""
    return BloscCodec.from_dict(blosc_json(storage_dtype))
