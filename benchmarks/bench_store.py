"""Throughput of FeatureStore.put/get against raw zarr arrays with the same codec and chunks.

Two realistic feature shapes (float16, generated, spatially smooth like real maps):

- ``dift``: one layer 1280 x 48 x 48, T = 1 (SD 2.1 up-block 1 at 768 px), 5.9 MB per image;
- ``hyperfeatures``: the 12 SD 1.5 decoder layers at 512 px input (1280 ch x3 at 8x8,
  1280 ch x3 at 16x16, 640 ch x3 at 32x32, 320 ch x3 at 64x64), T = 11, 157 MB per image.

For each case the script writes N images with ``FeatureStore.put`` (float16 CPU
tensors in) and with plain ``zarr.create_array(...)[...] = data`` (one array per
layer with the store's codec, chunks and chunk key encoding): "defaults" leaves
zarr's other settings alone, "tuned" also sets ``write_empty_chunks=True`` as the
store does; the put ratio is against "tuned", the stricter baseline. It then
reads everything back: ``FeatureStore.get(dtype=float16)`` against
``zarr.open_array(...)[...]``, and ``get()`` in float32 (the default) against
the same raw read followed by a torch cast. Throughput is MB/s of uncompressed
float16 data, best of the rounds (on a shared machine interference only ever
slows a round down; ``--json`` also has every round). The page cache is flushed
(``os.sync``) before every phase; reads are warm (from the page cache).

    python benchmarks/bench_store.py                       # ~30 s on 2 CPU cores
    python benchmarks/bench_store.py --dir /dev/shm        # in memory: CPU cost only
    python benchmarks/bench_store.py --n-dift 100 --n-hyper 8 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import LocalStore

from diffeat.core.features import FeatureSet
from diffeat.store import FeatureStore
from diffeat.store.format import CHUNK_KEY_ENCODING, DIMENSION_NAMES, blosc_codec

from _common import timed, write_json

HYPER_SHAPES = [(1280, 8, 8)] * 3 + [(1280, 16, 16)] * 3 + [(640, 32, 32)] * 3 + [(320, 64, 64)] * 3
CASES = {
    "dift": {"timesteps": (261,), "shapes": [(1280, 48, 48)]},
    "hyperfeatures": {"timesteps": tuple(range(0, 1001, 100)), "shapes": HYPER_SHAPES},
}


def feature_map(t: int, c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random field + fine noise, per-channel scale and offset, as float16."""
    low = torch.randn(t, c, max(1, h // 4), max(1, w // 4), generator=gen)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(t, c, h, w, generator=gen)
    scale = torch.exp(0.7 * torch.randn(1, c, 1, 1, generator=gen))
    offset = 0.5 * torch.randn(1, c, 1, 1, generator=gen)
    return (x * scale + offset).half()


def make_features(case: str, seed: int) -> FeatureSet:
    spec = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    t = len(spec["timesteps"])
    layers = {
        f"layer{i:02d}": feature_map(t, *shape, gen) for i, shape in enumerate(spec["shapes"])
    }
    return FeatureSet(layers, spec["timesteps"], {"transform": {"image_size": [512, 512]}})


class Round:
    """One repetition: a raw zarr store and a FeatureStore in their own folders."""

    def __init__(self, pool: list[FeatureSet], n: int, workdir: Path) -> None:
        self.pool = pool
        self.np_pool = [{k: v.numpy() for k, v in fs.layers.items()} for fs in pool]
        self.layers = list(pool[0].layers)
        self.n = n
        self.codec = blosc_codec("float16")
        self.raw = LocalStore(workdir / "raw")
        self.fstore = FeatureStore(workdir / "store", dtype="float16")
        self.fstore.register_extractor("bench", {"plugin": "bench", "config": {}})

    def raw_put(self, tuned: bool) -> None:
        # zarr defaults but the store's codec, chunks and chunk key encoding; "tuned" also
        # skips zarr's per-chunk "is it all fill value?" check, as the store does
        config = {"write_empty_chunks": True} if tuned else None
        tag = "tuned" if tuned else "plain"
        for i in range(self.n):
            for name, data in self.np_pool[i % len(self.pool)].items():
                arr = zarr.create_array(
                    self.raw,
                    name=f"{tag}/img{i}/{name}/features",
                    shape=data.shape,
                    dtype="float16",
                    chunks=(1,) + data.shape[1:],
                    compressors=(self.codec, Crc32cCodec()),  # as format 2 writes
                    chunk_key_encoding=CHUNK_KEY_ENCODING,
                    dimension_names=DIMENSION_NAMES,
                    config=config,
                )
                arr[...] = data

    def store_put(self) -> None:
        for i in range(self.n):
            self.fstore.put("bench", f"img{i}", self.pool[i % len(self.pool)])

    def raw_get(self, cast: torch.dtype | None) -> None:
        # cast: the fair baseline of get(dtype=float32) is read, then torch cast
        for i in range(self.n):
            for name in self.layers:
                data = zarr.open_array(self.raw, path=f"tuned/img{i}/{name}/features", mode="r")[
                    ...
                ]
                if cast is not None:
                    torch.from_numpy(data).to(cast)

    def store_get(self, dtype: torch.dtype) -> None:
        for i in range(self.n):
            self.fstore.get("bench", f"img{i}", dtype=dtype)


def run_case(case: str, n: int, rounds: int, workdir: Path) -> dict:
    pool = [make_features(case, seed) for seed in range(min(n, 2))]
    nbytes = pool[0].nbytes()
    keys = (
        "raw_put",
        "raw_put_tuned",
        "store_put",
        "raw_get",
        "store_get16",
        "raw_get32",
        "store_get32",
    )
    times: dict[str, list[float]] = {k: [] for k in keys}
    has_us: list[float] = []
    stored_per_image = 0

    for r in range(rounds):
        rdir = workdir / f"{case}{r}"
        rnd = Round(pool, n, rdir)
        writers = [
            ("raw_put", partial(rnd.raw_put, False)),
            ("raw_put_tuned", partial(rnd.raw_put, True)),
            ("store_put", rnd.store_put),
        ]
        readers = [
            ("raw_get", partial(rnd.raw_get, None)),
            ("store_get16", partial(rnd.store_get, torch.float16)),
            ("raw_get32", partial(rnd.raw_get, torch.float32)),
            ("store_get32", partial(rnd.store_get, torch.float32)),
        ]
        # Alternate the order between rounds, and flush dirty pages before every phase so
        # that no phase pays for the write-back of the one before. Reads are warm (page cache).
        for phase in (writers, readers):
            for key, fn in phase if r % 2 == 0 else phase[::-1]:
                os.sync()
                times[key].append(timed(fn))

        # correctness spot check and sizes
        got = rnd.fstore.get("bench", "img0", dtype=torch.float16)
        assert all(torch.equal(got.layers[k], pool[0].layers[k]) for k in pool[0].layers)
        stored_per_image = rnd.fstore.entry_info("bench", "img0")["stored_bytes"]
        start = time.perf_counter()
        for _ in range(100):
            rnd.fstore.has("bench", "img0")
        has_us.append((time.perf_counter() - start) / 100 * 1e6)
        shutil.rmtree(rdir)

    def mbps(key: str) -> float:
        return n * nbytes / min(times[key]) / 1e6

    result = {
        "case": case,
        "images": n,
        "rounds": rounds,
        "layers": len(pool[0].layers),
        "timesteps": len(pool[0].timesteps),
        "uncompressed_bytes_per_image": nbytes,
        "stored_bytes_per_image": stored_per_image,
        "compression_ratio": nbytes / stored_per_image,
        "mb_per_s": {k: mbps(k) for k in times},
        "ms_per_image": {k: min(v) / n * 1e3 for k, v in times.items()},
        "seconds_per_round": times,
        "has_us": statistics.median(has_us),
    }
    mb = result["mb_per_s"]
    result["ratio_put"] = mb["store_put"] / mb["raw_put_tuned"]
    result["ratio_put_vs_plain"] = mb["store_put"] / mb["raw_put"]
    result["ratio_get"] = mb["store_get16"] / mb["raw_get"]
    result["ratio_get_float32"] = mb["store_get32"] / mb["raw_get32"]
    return result


def print_table(results: list[dict]) -> None:
    print(f"{'case':<14}{'operation':<28}{'MB/s':>9}{'ms/img':>10}{'vs raw':>9}")
    labels = {
        "raw_put": ("raw zarr write (defaults)", None),
        "raw_put_tuned": ("raw zarr write (tuned)", None),
        "store_put": ("FeatureStore.put", "ratio_put"),
        "raw_get": ("raw zarr read (float16)", None),
        "store_get16": ("FeatureStore.get float16", "ratio_get"),
        "raw_get32": ("raw zarr read + cast f32", None),
        "store_get32": ("FeatureStore.get float32", "ratio_get_float32"),
    }
    for res in results:
        for key, (label, ratio) in labels.items():
            rel = f"{res[ratio]:.2f}x" if ratio else ""
            print(
                f"{res['case']:<14}{label:<28}{res['mb_per_s'][key]:>9.0f}"
                f"{res['ms_per_image'][key]:>10.1f}{rel:>9}"
            )
        print(
            f"{res['case']:<14}{'stored / uncompressed':<28}"
            f"{res['stored_bytes_per_image'] / 1e6:>8.1f}M / {res['uncompressed_bytes_per_image'] / 1e6:.1f}M"
            f" per image (ratio {res['compression_ratio']:.3f}); has(): {res['has_us']:.0f} us"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n-dift", type=int, default=30, help="images in the dift case (0 skips it)"
    )
    parser.add_argument(
        "--n-hyper", type=int, default=3, help="images in the hyperfeatures case (0 skips)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; the best is reported")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the results as JSON here"
    )
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="diffeat-bench-", dir=args.dir))
    try:
        results = []
        for case, n in (("dift", args.n_dift), ("hyperfeatures", args.n_hyper)):
            if n > 0:
                results.append(run_case(case, n, args.rounds, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"zarr {zarr.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, numpy {np.__version__}"
    )
    print_table(results)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
