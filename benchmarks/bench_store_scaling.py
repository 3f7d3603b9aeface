"""How ``has``, ``put``, ``entries`` and ``info`` of the feature store grow with the number of
entries, on a local disk and on a local S3-compatible server (moto's server mode).

For each backend and size N the script fills a store with N entries, then times:

- ``has``: median of 200 calls (half present keys, half missing ones);
- ``put``: median of 30 puts of new entries (one layer ``[1, 32, 8, 8]``, the size of a
  tiny-model entry, float16, about 4 KB);
- ``entries`` and ``info``: median of 3 calls (``--repeat``);
- on S3, ``scan``: one full listing of the entries (what ``entries``/``info`` would cost
  without the index: a LIST of every object and a GET of every marker), up to
  ``--scan-max`` entries.

On S3 it also counts the HTTP requests of one call of each (obstore calls; a LIST counts
one request per 1000 objects, as S3 pages them).

Filling N entries with real puts takes N x (~17 ms on disk, ~45-70 ms on moto) on a small
machine, so by default (``--fill markers``) the N filler entries are written directly as what
``has``, ``entries`` and ``info`` read: on disk one entry folder with its completion marker;
on S3 the marker plus a compacted index manifest (as after ``COMPACT_AT`` puts). The timed
puts are real, full puts. ``--fill real`` fills with ``FeatureStore.put`` (use it at 1k to
check that the filler does not change the picture).

    python benchmarks/bench_store_scaling.py                          # 1k and 10k, ~3 min
    python benchmarks/bench_store_scaling.py --sizes 1000 10000 100000 --backends disk
    python benchmarks/bench_store_scaling.py --sizes 1000 --fill real --json out.json

moto keeps a bucket in one Python dict and filters every LIST by prefix over all keys of
the bucket, so on moto even a LIST of a small prefix grows with the bucket's size; on S3,
GCS and Azure a LIST of a prefix costs by the objects it returns. The request counts are
the backend-independent measure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from _common import machine_info, write_json

LAYER = "up_blocks.1"
SHAPE = (1, 32, 8, 8)


def _features(seed: int) -> Any:
    import torch

    from diffeat.core.features import FeatureSet

    gen = torch.Generator().manual_seed(seed)
    return FeatureSet({LAYER: torch.randn(*SHAPE, generator=gen)}, (261,), {"seed": seed})


def _marker(image_key: str, data: str | None) -> tuple[bytes, str]:
    from diffeat.store.format import group_json

    write_id = uuid.uuid4().hex
    attrs = {
        "complete": True,
        "write_id": write_id,
        "timesteps": [261],
        "source": None,
        "layers": {LAYER: {"shape": list(SHAPE), "dtype": "float16"}},
        "meta": {},
    }
    if data is not None:
        attrs["data"] = write_id
    return group_json(attrs), write_id


def fill(store: Any, backend: str, n: int, how: str) -> float:
    """Put ``n`` entries ``f{i}`` under cache key ``ck``; returns the seconds it took."""
    start = time.perf_counter()
    if how == "real":
        fs = _features(0)
        for i in range(n):
            store.put("ck", f"f{i}", fs)
        return time.perf_counter() - start
    if backend == "disk":
        root = Path(store.path) / "ck"
        root.mkdir(exist_ok=True)
        (root / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_type": "group"}')
        for i in range(n):
            folder = root / f"f{i}"
            folder.mkdir()
            (folder / "zarr.json").write_bytes(_marker(f"f{i}", None)[0])
        return time.perf_counter() - start
    from diffeat.store.objectstore import INDEX_DIR
    from diffeat.store.zarr_io import run

    objects = store._store

    async def put_markers(lo: int, hi: int) -> dict[str, list[Any]]:
        import asyncio

        docs = [_marker(f"f{i}", "data") for i in range(lo, hi)]
        await asyncio.gather(
            *(objects.write(f"ck/f{i}/zarr.json", doc) for i, (doc, _) in zip(range(lo, hi), docs))
        )
        return {f"f{i}": [wid, 4200] for i, (_doc, wid) in zip(range(lo, hi), docs)}

    run(objects.create("ck/zarr.json", b'{"zarr_format": 3, "node_type": "group"}'))
    entries: dict[str, list[Any]] = {}
    for lo in range(0, n, 64):
        entries.update(run(put_markers(lo, min(n, lo + 64))))
    manifest = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    run(objects.write(f"ck/{INDEX_DIR}/manifest.json", manifest))
    return time.perf_counter() - start


class RequestCounter:
    """Counts obstore calls (HTTP requests) while active."""

    NAMES = ("get_async", "put_async", "head_async", "delete_async", "list_with_delimiter_async")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __enter__(self) -> RequestCounter:
        import obstore

        self._saved = {name: getattr(obstore, name) for name in (*self.NAMES, "list")}
        for name in self.NAMES:
            real = self._saved[name]

            def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                self.counts[_name.removesuffix("_async")] += 1
                return _real(*args, **kwargs)

            setattr(obstore, name, counted)
        real_list = self._saved["list"]
        counter = self.counts

        class Listed:
            def __init__(self, stream: Any) -> None:
                self.stream, self.n = stream, 0

            def __aiter__(self) -> Any:
                return self._iter()

            async def _iter(self) -> Any:
                async for batch in self.stream:
                    self.n += len(batch)
                    yield batch
                counter["list"] += max(1, math.ceil(self.n / 1000))

        obstore.list = lambda *a, **k: Listed(real_list(*a, **k))  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        import obstore

        for name, real in self._saved.items():
            setattr(obstore, name, real)

    def total(self) -> int:
        return sum(self.counts.values())


def _median_ms(fn: Any, calls: list[Any]) -> float:
    times = []
    for arg in calls:
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(store: Any, backend: str, n: int, scan_max: int, repeat: int = 3) -> dict[str, Any]:
    keys = [f"f{(i * 7919) % n}" if i % 2 == 0 else f"missing{i}" for i in range(200)]
    row: dict[str, Any] = {"backend": backend, "entries": n}
    row["has_ms"] = _median_ms(lambda k: store.has("ck", k), keys)
    new = [(f"new{i}-{uuid.uuid4().hex[:6]}", _features(i)) for i in range(30)]
    row["put_ms"] = _median_ms(lambda kv: store.put("ck", kv[0], kv[1]), new)
    row["entries_ms"] = _median_ms(lambda _: store.entries("ck"), range(repeat))
    row["info_ms"] = _median_ms(lambda _: store.info(), range(repeat))
    assert len(store.entries("ck")) == n + len(new), "the index lost entries"
    if backend == "s3":
        requests = {}
        for name, call in {
            "has": lambda: store.has("ck", "f0"),
            "put": lambda: store.put("ck", f"counted-{uuid.uuid4().hex[:6]}", _features(1)),
            "entries": lambda: store.entries("ck"),
            "info": lambda: store.info(),
        }.items():
            with RequestCounter() as counter:
                call()
            requests[name] = counter.total()
        row["requests"] = requests
        if n <= scan_max:
            start = time.perf_counter()
            with RequestCounter() as counter:
                complete, _ = store.scan("ck")
            row["scan_ms"] = (time.perf_counter() - start) * 1000
            row["scan_requests"] = counter.total()
            assert len(complete) >= n
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--backends", nargs="+", default=["disk", "s3"], choices=["disk", "s3"])
    parser.add_argument("--fill", choices=["markers", "real"], default="markers")
    parser.add_argument("--scan-max", type=int, default=1000, help="largest N to time a scan at")
    parser.add_argument("--repeat", type=int, default=3, help="calls of entries/info timed")
    parser.add_argument("--dir", default=None, help="folder for the disk stores (default: a temp)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from diffeat.store import FeatureStore
    from diffeat.testing.s3 import local_s3_server

    rows = []
    for backend in args.backends:
        for n in args.sizes:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                if backend == "disk":
                    store = FeatureStore(Path(tmp) / "scale.zarr")
                    row = _run(store, backend, n, args)
                else:
                    with local_s3_server() as s3:
                        store = FeatureStore(s3.url("scale.zarr"))
                        row = _run(store, backend, n, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    _table(rows)
    if args.json:
        write_json(Path(args.json), {"machine": machine_info(), "fill": args.fill, "rows": rows})


def _run(store: Any, backend: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    seconds = fill(store, backend, n, args.fill)
    row = measure(store, backend, n, args.scan_max, args.repeat)
    row["fill_s"] = seconds
    row["fill"] = args.fill
    return row


def _table(rows: list[dict[str, Any]]) -> None:
    print("\n| backend | entries | has ms | put ms | entries ms | info ms | scan ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        scan = f"{r['scan_ms']:.0f}" if "scan_ms" in r else "-"
        print(
            f"| {r['backend']} | {r['entries']} | {r['has_ms']:.2f} | {r['put_ms']:.1f} | "
            f"{r['entries_ms']:.1f} | {r['info_ms']:.1f} | {scan} |"
        )


if __name__ == "__main__":
    main()
