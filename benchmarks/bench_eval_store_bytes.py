"""What an evaluation's store report costs: ``info()`` of the whole store against
``cache_key_bytes`` of the evaluated cache key, in a store where another extractor holds
many entries (a shared default store).

Fills a local store with ``--others`` small entries under one cache key and ``--mine``
under another, then times ``info()`` (every entry of every extractor is read) and
``cache_key_bytes("mine")`` (one walk of that key's folder), best of ``--repeat``, in one
run so the ratio is fair on a noisy machine. The file cache is warm: a cold one only
widens the gap.

    python benchmarks/bench_eval_store_bytes.py                   # 20k others: ~2 min on 2 cores
    python benchmarks/bench_eval_store_bytes.py --others 100000 --json out.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from diffeat.core.features import FeatureSet
from diffeat.store import FeatureStore

from _common import machine_info, write_json


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--others", type=int, default=20_000, help="entries of another key")
    parser.add_argument("--mine", type=int, default=10, help="entries of the evaluated key")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the store goes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    features = FeatureSet({"l": torch.ones(1, 4, 3, 3)}, [1])
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = FeatureStore(Path(tmp) / "feats.zarr")
        start = time.perf_counter()
        for i in range(args.others):
            store.put("others", f"img{i}", features)
        for i in range(args.mine):
            store.put("mine", f"img{i}", features)
        fill = time.perf_counter() - start
        info = best_seconds(store.info, args.repeat)
        key_bytes = best_seconds(lambda: store.cache_key_bytes("mine"), args.repeat)
    result = {
        "machine": machine_info(),
        "others": args.others,
        "mine": args.mine,
        "fill_s": fill,
        "info_s": info,
        "cache_key_bytes_s": key_bytes,
        "ratio": info / key_bytes,
    }
    print(
        f"{args.others} other entries, {args.mine} evaluated: info() {info:.3f} s, "
        f"cache_key_bytes {1000 * key_bytes:.2f} ms ({info / key_bytes:.0f}x); fill {fill:.0f} s"
    )
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
