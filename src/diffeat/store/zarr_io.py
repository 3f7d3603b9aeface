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

from diffeat.store.format import blosc_json

__all__ = [
    "FAST_PATH_ENV",
    "FAST_PATH_ZARR",
    "ZarrFolder",
    "blosc_codec",
    "fast_path_active",
    "fast_path_supported",
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
