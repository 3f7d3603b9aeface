"""The feature store on object storage (``s3://``, ``gs://``, ``az://``): format version 3.

``FeatureStore("s3://bucket/feats.zarr")`` opens an :class:`ObjectFeatureStore`. The
zarr hierarchy is the one of a store on disk, with one difference: an object store
has no rename, so a write cannot be staged and moved into place. Instead::

    <cache_key>/<image_key>/zarr.json              the completion marker (entry attributes,
                                                   "data": <write_id>), written last
    <cache_key>/<image_key>/<write_id>/zarr.json   group of this write's layers
    <cache_key>/<image_key>/<write_id>/<layer>/... the arrays, as on disk

Every write puts its arrays under its own data prefix, then commits by writing the
marker with a conditional request: create-if-absent (``If-None-Match: *``) for a new
entry, replace-if-unchanged (``If-Match`` on the ETag read at the start) to replace
one. Of several writers of one image exactly one commits; a marker always names a
whole write. A data prefix no marker names is invisible (a write in progress, or the
leftover of a killed writer, which ``diffeat store verify --repair`` removes).

The index (``<cache_key>/_index/``, a name no key can take) makes ``entries`` and
``info`` cost a bounded number of requests instead of a LIST of every entry: each
committed put or delete adds one empty *event* object whose name carries the event
(``log/<time_ns>~put~<image_key>~<write_id>~<bytes>~<replaced write_id>``); a
compacted ``manifest.json`` holds the state up to its events. Readers LIST the log
(one page once compacted), GET the manifest and merge; writers compact the log into
the manifest (an ``If-Match`` write, so two compactors cannot lose events) once it
holds :data:`COMPACT_AT` events (each put looks with probability 1/500). ``has`` and ``get`` never use the index: the marker
is the truth (``has`` is one GET of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from diffeat.core.errors import StoreError
from diffeat.store.featurestore import (
    COMMIT_ATTEMPTS,
    FeatureStore,
    LayoutWriteError,
    complete_attrs,
    gather_all,
    root_version,
)
from diffeat.store.format import (
    DATA_ATTR,
    OBJECT_FORMAT_VERSION,
    ROOT_ATTR,
    check_storage_dtype,
    group_json,
    layout_version,
    parse_group_json,
)
from diffeat.store.keys import check_key, is_valid_key
from diffeat.store.zarr_io import ZarrObjects, run

__all__ = ["COMPACT_AT", "INDEX_DIR", "ObjectFeatureStore", "merge_index"]

#: the folder of a cache key that holds its index (no key may start with "_")
INDEX_DIR = "_index"
#: compact the event log into the manifest once it holds this many events (one LIST page)
COMPACT_AT = 1000
#: each put looks at the log (and compacts it if due) with probability 1 / this: one look
#: per this many puts on average, however the puts are spread over writer processes
_CHECK_EVERY = 500
_SEP = "~"  # no key may contain it


@dataclass(frozen=True)
class IndexEvent:
    """One committed put or delete, as named in the index log."""

    name: str
    op: Literal["put", "delete"]
    image_key: str
    write_id: str
    nbytes: int
    replaced: str | None

    @classmethod
    def parse(cls, name: str) -> IndexEvent | None:
        parts = name.rsplit("/", 1)[-1].split(_SEP)
        if len(parts) != 6 or parts[1] not in ("put", "delete") or not parts[4].isdigit():
            return None
        replaced = None if parts[5] == "-" else parts[5]
        return cls(name, parts[1], parts[2], parts[3], int(parts[4]), replaced)  # type: ignore[arg-type]


def merge_index(entries: dict[str, list[Any]], events: list[IndexEvent]) -> dict[str, list[Any]]:
    """The index state ``image_key -> [write_id, bytes]`` after ``events`` on ``entries``.

    Applying an event twice changes nothing, and a put that another write replaced (or a
    delete removed) never comes back, whatever the order the events are seen in."""
    state = {k: list(v) for k, v in entries.items()}
    dead = {e.replaced for e in events if e.op == "put" and e.replaced}
    dead |= {e.write_id for e in events if e.op == "delete"}
    for event in sorted(events, key=lambda e: e.name):
        if event.op == "put" and event.write_id not in dead:
            state[event.image_key] = [event.write_id, event.nbytes]
        elif event.op == "delete" and state.get(event.image_key, [None])[0] == event.write_id:
            del state[event.image_key]
    return {k: v for k, v in state.items() if v[0] not in dead}


#: waits before looking again for the root zarr.json of a prefix that holds objects
OPEN_RETRY_DELAYS_S = (0.1, 0.3, 1.0, 2.0, 3.0, 4.0)


class ObjectFeatureStore(FeatureStore):
    """A :class:`FeatureStore` under an object-store URL (see the module docstring).

    Opened by ``FeatureStore(url)``; credentials come from the environment (``AWS_*``
    with ``AWS_ENDPOINT_URL`` for S3-compatible servers, ``GOOGLE_*``, ``AZURE_*``).
    """

    _store: ZarrObjects

    def __init__(
        self,
        path: str,
        mode: Literal["r", "a"] = "a",
        *,
        dtype: str = "float16",
    ) -> None:
        if mode not in ("r", "a"):
            raise StoreError(
                f"invalid store mode {mode!r}: use 'r' (read-only) or 'a' (read/write)"
            )
        self.path = str(path).rstrip("/")  # type: ignore[assignment]
        self.mode = mode
        self.dtype = check_storage_dtype(dtype)
        self._known_groups: set[str] = set()
        try:
            self._store = ZarrObjects(self.path, read_only=mode == "r")
            self.format_version = self._open()
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"cannot open the feature store {self.path}: {type(exc).__name__}: {exc} "
                "(check the URL, the credentials in the environment and, for S3-compatible "
                "servers, AWS_ENDPOINT_URL)"
            ) from exc

    def _open(self) -> int:
        raw = self._read_root()
        attrs = parse_group_json(raw)
        if attrs is None:
            raise StoreError(
                f"{self.path}/zarr.json is not a readable zarr v3 group, so {self.path} is not "
                "a diffeat feature store (or its root metadata is damaged): choose another prefix"
            )
        version = root_version(self.path, attrs)
        if layout_version(version) < OBJECT_FORMAT_VERSION and self.mode == "a":
            raise LayoutWriteError(
                f"{self.path} is a format {version} store (copied from a local disk): on object "
                "storage it can be read (mode='r') but not written, since format "
                f"{version} commits entries by renaming folders; extract into a new prefix"
            )
        return version

    def _read_root(self) -> bytes:
        """The root zarr.json, created (create-if-absent) when the prefix is empty.

        Another process may be creating the store at the same moment, so no single look
        decides: an empty prefix is created conditionally (of several creators one wins,
        the others read its root), and objects without a root are looked at again for
        about 10 s (a loaded machine or a slow server stretches the creator's window)
        before the prefix is called foreign or damaged."""
        raw = self._read_now("zarr.json")
        for delay in (*OPEN_RETRY_DELAYS_S, None):
            if raw is not None:
                return raw
            if not run(self._store.any_object("")):
                if self.mode == "r":
                    raise StoreError(
                        f"no feature store at {self.path}: nothing is stored under that "
                        "prefix (check the URL, or extract features into it first)"
                    )
                root = group_json({ROOT_ATTR: {"format_version": OBJECT_FORMAT_VERSION}})
                run(self._store.create("zarr.json", root))
            elif delay is None:
                break
            else:
                time.sleep(delay)
            raw = self._read_now("zarr.json")
        if raw is not None:  # created at the last look (the objects went meanwhile)
            return raw
        raise StoreError(
            f"{self.path} holds objects but no zarr.json, so it is not a diffeat "
            "feature store (or its root metadata was removed): choose another prefix"
        )

    def _io_errors(self) -> tuple[type[BaseException], ...]:
        import obstore.exceptions

        return (OSError, obstore.exceptions.BaseError)

    @property
    def _indexed(self) -> bool:
        return layout_version(self.format_version) >= OBJECT_FORMAT_VERSION

    def _xarray_target(self) -> Any:
        return self._store.zarr_store

    # ------------------------------------------------------------------ sizes and listing

    def _stored_bytes(self, prefix: str) -> int:
        return sum(int(m["size"]) for m in run(self._store.list_objects(prefix)))

    def has_cache_key(self, cache_key: str) -> bool:
        check_key(cache_key, "cache key")
        return run(self._store.any_object(cache_key))

    async def _aextractors(self) -> dict[str, dict[str, Any] | None]:
        keys = sorted(k for k in await self._store.list_dirs("") if is_valid_key(k))
        raws = await asyncio.gather(*(self._aread(f"{k}/zarr.json") for k in keys))
        return {key: parse_group_json(raw) for key, raw in zip(keys, raws)}

    def _damaged_info(self, cache_key: str) -> str:
        return (
            f"{self.path}/{cache_key}/zarr.json (the extractor info of cache key {cache_key!r}) "
            "is missing or not readable zarr v3 group metadata; its entries are kept: running "
            "`diffeat extract` with the same configuration rewrites it, "
            f"`diffeat store delete {self.path} --key {cache_key}` removes the cache key"
        )

    async def _ascan(self, cache_key: str) -> tuple[list[str], list[str]]:
        """The truth, from a LIST of every object: (complete, incomplete) image keys. An
        entry is incomplete when its marker is there but unreadable; data prefixes that
        no marker names are leftovers (see :meth:`leftovers`), not entries."""
        objects = await self._store.list_objects(cache_key)
        markers = sorted(
            parts[1]
            for parts in (m["path"].split("/") for m in objects)
            if len(parts) == 3 and parts[2] == "zarr.json" and is_valid_key(parts[1])
        )
        found = await asyncio.gather(*(self._aentry(f"{cache_key}/{n}") for n in markers))
        complete = [n for n, a in zip(markers, found) if a is not None]
        incomplete = [n for n, a in zip(markers, found) if a is None]
        return complete, incomplete

    # ------------------------------------------------------------------ index

    def _index_key(self, cache_key: str, name: str) -> str:
        return f"{cache_key}/{INDEX_DIR}/{name}"

    async def _alog(
        self, cache_key: str, op: str, image_key: str, write_id: str, nbytes: int, replaced: str
    ) -> None:
        name = _SEP.join([f"{time.time_ns():020d}", op, image_key, write_id, str(nbytes), replaced])
        await self._store.write(self._index_key(cache_key, f"log/{name}"), b"")

    async def _aindex(self, cache_key: str, *, compact: bool) -> dict[str, list[Any]]:
        """``image_key -> [write_id, bytes]`` of the complete entries, from the index."""
        store = self._store
        # the log first, then the manifest: a compaction in between moved the events
        # into the manifest (merging them twice changes nothing)
        logged = await store.list_objects(self._index_key(cache_key, "log"))
        got = await store.read_versioned(self._index_key(cache_key, "manifest.json"))
        entries = _manifest_entries(got[0] if got else None, f"{self.path}/{cache_key}")
        events = [e for e in (IndexEvent.parse(m["path"]) for m in logged) if e is not None]
        state = merge_index(entries, events)
        if compact and self.mode == "a" and len(events) >= COMPACT_AT:
            await self._acompact(cache_key, state, got[1] if got else None, events)
        return state

    async def _acompact(
        self,
        cache_key: str,
        state: dict[str, list[Any]],
        e_tag: str | None,
        events: list[IndexEvent],
    ) -> bool:
        """Write ``state`` as the manifest (only if the manifest is still the one read, with
        ETag ``e_tag``), then remove the events merged into it."""
        key = self._index_key(cache_key, "manifest.json")
        doc = json.dumps({"version": 1, "entries": state}, separators=(",", ":")).encode()
        if e_tag is None:
            written = await self._store.create(key, doc)
        else:
            written = await self._store.replace_if(key, doc, e_tag)
        if written:  # another compactor won otherwise: its manifest holds these events
            await self._store.delete_many([e.name for e in events])
        return written

    def reindex(self, cache_key: str) -> bool:
        """Rebuild the index of ``cache_key`` from a LIST of its markers (what
        ``diffeat store verify --repair`` does): events logged meanwhile are kept."""
        self._check_writable()
        check_key(cache_key, "cache key")
        return run(self._areindex(cache_key))

    async def _areindex(self, cache_key: str) -> bool:
        store = self._store
        logged = await store.list_objects(self._index_key(cache_key, "log"))
        objects = await store.list_objects(cache_key)
        sizes: dict[str, int] = {}
        for meta in objects:
            parts = meta["path"].split("/")
            if len(parts) >= 3 and is_valid_key(parts[1]):
                sizes[parts[1]] = sizes.get(parts[1], 0) + int(meta["size"])
        complete, _ = await self._ascan(cache_key)
        attrs = await asyncio.gather(*(self._aentry(f"{cache_key}/{n}") for n in complete))
        state = {
            n: [a.get("write_id"), sizes.get(n, 0)]
            for n, a in zip(complete, attrs)
            if a is not None
        }
        doc = json.dumps({"version": 1, "entries": state}, separators=(",", ":")).encode()
        await store.write(self._index_key(cache_key, "manifest.json"), doc)
        await store.delete_many([m["path"] for m in logged])
        return True

    def entries(self, cache_key: str) -> list[str]:
        """The image keys of the complete entries under ``cache_key``, sorted, from the
        index (a bounded number of requests, however many entries there are)."""
        check_key(cache_key, "cache key")
        if not self._indexed:
            return super().entries(cache_key)
        return sorted(run(self._aindex(cache_key, compact=True)))

    def cache_key_bytes(self, cache_key: str) -> int:
        check_key(cache_key, "cache key")

        async def count() -> int:
            if self._indexed:  # the index's bytes: a bounded number of requests
                state = await self._aindex(cache_key, compact=False)
                return sum(int(v[1]) for v in state.values())
            return sum(int(m["size"]) for m in await self._store.list_objects(cache_key))

        return run(count())

    async def _ainfo(self) -> dict[str, Any]:
        extractors = await self._aextractors()
        summary: dict[str, dict[str, Any]] = {}
        total = 0
        for key, info in extractors.items():
            if self._indexed:
                state = await self._aindex(key, compact=True)
                count, incomplete = len(state), None  # only a LIST of everything can tell
                nbytes = sum(int(v[1]) for v in state.values())
                names = sorted(state)
            else:
                complete, partial = await self._ascan(key)
                count, incomplete = len(complete), len(partial)
                nbytes = sum(int(m["size"]) for m in await self._store.list_objects(key))
                names = complete
            summary[key] = {
                **(info or {}),
                "entries": count,
                "incomplete": incomplete,
                "bytes": nbytes,
                "dtype": await self._asample_dtype(key, names),
            }
            if info is None:
                summary[key]["damaged"] = self._damaged_info(key)
            total += nbytes
        return {
            "path": self.path,
            "format_version": self.format_version,
            "extractors": summary,
            "bytes": total,
        }

    # ------------------------------------------------------------------ writing

    async def _aput(
        self,
        cache_key: str,
        prefix: str,
        arrays: dict[str, Any],
        timesteps: Any,
        attrs: dict[str, Any],
        replace: bool,
    ) -> bool:
        store = self._store
        if cache_key not in self._known_groups:
            await store.create(f"{cache_key}/zarr.json", group_json({}))
            self._known_groups.add(cache_key)
        marker = f"{prefix}/zarr.json"
        got = await store.read_versioned(marker)
        current = complete_attrs(got[0]) if got else None
        if current is not None and not replace:
            return False
        write_id = attrs["write_id"]
        attrs = {**attrs, DATA_ATTR: write_id}
        data = f"{prefix}/{write_id}"
        try:
            await store.write(f"{data}/zarr.json", group_json({}))
            await gather_all(self._awrite_layer(data, n, a, timesteps) for n, a in arrays.items())
            nbytes = sum(int(m["size"]) for m in await store.list_objects(data))
            replaced = await self._acommit_marker(marker, group_json(attrs), got, current)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: leave no leftover
                await self._aremove(data)
            raise
        if replaced is False:  # another writer's complete entry is there: keep it
            await self._aremove(data)
            return False
        if replaced:  # the write this one replaced: its data goes
            await self._aremove(f"{prefix}/{replaced}")
        image_key = prefix.split("/")[1]
        if self._indexed:
            await self._alog(cache_key, "put", image_key, write_id, nbytes, replaced or "-")
            if random.random() < 1 / _CHECK_EVERY:
                await self._aindex(cache_key, compact=True)
        return True

    async def _acommit_marker(
        self,
        marker: str,
        doc: bytes,
        got: tuple[bytes, str | None] | None,
        replaceable: dict[str, Any] | None,
    ) -> str | Literal[False] | None:
        """Write the completion marker, conditionally. Returns the data prefix of the write
        it replaced (None if it replaced none), or False when another writer's complete
        entry is there (kept). Only the entry that was there when the put began (or an
        unreadable marker) is replaced."""
        store = self._store
        replaceable_id = None if replaceable is None else replaceable.get("write_id")
        for _attempt in range(COMMIT_ATTEMPTS):
            if got is None:
                if await store.create(marker, doc):
                    return None
            elif await store.replace_if(marker, doc, got[1]):
                return _data_name(replaceable)
            got = await store.read_versioned(marker)
            if got is None:
                replaceable = None
                continue  # deleted meanwhile: create it
            there = complete_attrs(got[0])
            if there is not None and there.get("write_id") != replaceable_id:
                return False
            replaceable = there
        raise StoreError(
            f"{self.path}/{marker}: could not commit the entry after {COMMIT_ATTEMPTS} "
            "attempts (other processes kept replacing it); try again"
        )

    # ------------------------------------------------------------------ removing

    async def _adelete(
        self, prefix: str, write_id: str | None = None, only_incomplete: bool = False
    ) -> bool:
        store = self._store
        marker = f"{prefix}/zarr.json"
        got = await store.read_versioned(marker)
        if got is None:
            return False
        attrs = complete_attrs(got[0])
        if only_incomplete and attrs is not None:
            return False
        if write_id is not None and (attrs is None or attrs.get("write_id") != write_id):
            return False
        # the marker goes first (the entry is then absent, at once), then its data
        await store.delete(marker)
        data = _data_name(attrs)
        if data:
            await self._aremove(f"{prefix}/{data}")
        if attrs is not None and self._indexed:
            cache_key, image_key = prefix.split("/")
            await self._alog(cache_key, "delete", image_key, str(attrs.get("write_id")), 0, "-")
        return True

    def delete_cache_key(self, cache_key: str) -> int:
        """Remove everything under a cache key: every entry's marker first (entries vanish
        whole), then data, index and extractor info. Returns the complete entries removed."""
        self._check_writable()
        check_key(cache_key, "cache key")
        complete, _ = run(self._ascan(cache_key))
        markers = [f"{cache_key}/{n}/zarr.json" for n in complete]
        run(self._store.delete_many(markers))
        run(self._aremove(cache_key))
        self._known_groups.discard(cache_key)
        return len(complete)

    # ------------------------------------------------------------------ leftovers

    def leftovers(self, min_age_s: float = 0.0) -> list[str]:  # type: ignore[override]
        """Data prefixes that no marker names (killed or failed writers), as URLs, whose
        newest object is at least ``min_age_s`` seconds old (a live writer's are younger)."""
        return run(self._aleftovers(min_age_s))

    async def _aleftovers(self, min_age_s: float) -> list[str]:
        objects = await self._store.list_objects("")
        newest: dict[tuple[str, str, str], float] = {}
        markers: set[tuple[str, str]] = set()
        for meta in objects:
            parts = meta["path"].split("/")
            if len(parts) < 3 or parts[1] == INDEX_DIR or not is_valid_key(parts[1]):
                continue
            if len(parts) == 3 and parts[2] == "zarr.json":
                markers.add((parts[0], parts[1]))
            elif len(parts) >= 4:
                stamp = meta["last_modified"].timestamp()
                key = (parts[0], parts[1], parts[2])
                newest[key] = max(newest.get(key, 0.0), stamp)
        named: dict[tuple[str, str], str | None] = {}
        entries = sorted({(c, i) for c, i, _ in newest} & markers)
        found = await asyncio.gather(*(self._aread(f"{c}/{i}/zarr.json") for c, i in entries))
        for entry, raw in zip(entries, found):
            named[entry] = _data_name(parse_group_json(raw))
        now = time.time()
        out = []
        for (c, i, d), stamp in sorted(newest.items()):
            if named.get((c, i)) == d or now - stamp < min_age_s:
                continue
            out.append(f"{self.path}/{c}/{i}/{d}")
        return out

    def remove_leftover(self, path: Any) -> None:
        self._check_writable()
        rel = str(path)
        if not rel.startswith(self.path + "/"):
            raise StoreError(f"{path} is not a leftover of the store {self.path}")
        parts = rel[len(self.path) + 1 :].split("/")
        if len(parts) != 3 or not all(is_valid_key(p) for p in parts):
            raise StoreError(f"{path} is not a leftover of the store {self.path}")
        run(self._aremove("/".join(parts)))


def _data_name(attrs: dict[str, Any] | None) -> str | None:
    """The data prefix an entry's attributes name (None for none, or an invalid one)."""
    data = None if attrs is None else attrs.get(DATA_ATTR)
    return data if is_valid_key(data) else None


def _manifest_entries(raw: bytes | None, where: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
        entries = doc["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"{where}/{INDEX_DIR}/manifest.json, the entry index, is damaged ({exc}): run "
            f"`diffeat store verify --repair` on the store to rebuild it"
        ) from None
    return entries
