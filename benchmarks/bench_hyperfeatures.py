"""Diffusion Hyperfeatures: the cost of collecting maps during DDIM inversion, the bytes stored
per image, and training speed reading features from the store against reading from memory.

1. Inversion, real-size SD 1.5 with random weights (built offline into ``--model-dir``, shared
   with bench_dift.py), the hyperfeatures-sd15 preset at 512 x 512: ``--steps`` DDIM steps
   (default 50) keeping 11 timesteps of the 12 decoder ResNet ``conv2`` maps.

   - ``bare``: VAE encode + the same DDIM inversion passes with no hooks, nothing kept;
   - ``collect``: ``extractor.extract`` (hooks on 12 modules, 132 maps copied out as float32);
   - ``store``: ``collect`` plus writing the entry into a zarr feature store (float16);
   - ``pipeline``: ``diffeat extract``'s path (``Pipeline.extract``) over all timed images
     (content keys, store lookups, extraction and the write of each entry).

   Each is timed on the same ``--images`` images after one warm-up image; the target is
   ``collect / bare < 1.10``. The stored entry's size on disk is the "bytes per image".

2. Training, the real `diffeat train` data path: ``--pairs`` pairs over ``--train-images``
   images whose features have the real shapes (12 layers x 11 timesteps, from 8x8 to 64x64;
   random values: the cost does not depend on them) stored in a feature store; steps/s of the
   hyperfeatures network (384 x 64 x 64) training on them with the features read

   - ``memory``: from a dict of tensors already in memory;
   - ``store``: from the store in the training process (``workers=0``);
   - ``store-workers``: from the store through a DataLoader with ``--workers`` spawn workers.

    python benchmarks/bench_hyperfeatures.py --steps 10 --images 1    # CPU, a few minutes
    python benchmarks/bench_hyperfeatures.py --device cuda --dtype float16 --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import device_sync, machine_info, synthetic_images, write_json
from _models import SD15_DIR, build_sd15_random, sd15_is_complete

#: the seed of the first synthetic image: bench_dift.py's images
IMAGE_SEED = 1000
CONV2 = "up_blocks.*.resnets.*.conv2"
KEPT_50 = [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]


def kept_timesteps(steps: int) -> list[int]:
    """The preset's 11 kept timesteps for 50 steps; for fewer steps, every step up to 11."""
    if steps == 50:
        return KEPT_50
    from diffeat.plugins.stable_diffusion.ddim import inversion_steps

    ts = [s.t for s in inversion_steps(steps)]
    if len(ts) <= 11:
        return ts
    picks = [round(i * (len(ts) - 1) / 10) for i in range(11)]
    return [ts[i] for i in picks]


def preset_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": str(args.model_dir),
        "mode": "inversion",
        "layers": [CONV2],
        "timesteps": kept_timesteps(args.steps),
        "inversion_steps": args.steps,
        "image_size": [512, 512],
        "resample": "bilinear",
        "ensemble_size": 1,
        "latent": "sample",
        "dtype": args.dtype,
        "device": args.device,
    }


def make_pipeline(args: argparse.Namespace, store: Path) -> Any:
    """The hyperfeatures-sd15 extraction as ``diffeat extract`` runs it, with a store."""
    from diffeat.core.pipeline import Pipeline

    data = {"extractor": {"plugin": "stable-diffusion", **preset_options(args)}}
    return Pipeline.from_dict(data, store=store)


def bare_inversion(ex: Any, image: Any) -> None:
    """The same UNet passes as ``collect`` without any hook or copy."""
    import torch

    from diffeat.plugins.stable_diffusion.ddim import alpha_at, ddim_update, epsilon_from

    p = ex.parts
    kept = set(ex.options.timesteps)
    steps = ex.schedule()
    last = max(s.index for s in steps if s.t in kept)
    alphas = p.scheduler.alphas_cumprod.float()
    with torch.no_grad():
        pixels = torch.stack([ex.preprocess(image)])
        x = ex.encode(pixels, [ex.make_noise(image.key)]).float()
        context = ex.prompt_embeddings("")
        for step in steps[: last + 1]:
            t_in = torch.full((1,), float(step.t), device=ex.device)
            out = p.unet(x.to(ex.dtype), t_in, encoder_hidden_states=context).sample.float()
            a, a_next = alpha_at(alphas, step.t).to(ex.device), alpha_at(alphas, step.t_next)
            x = ddim_update(x, epsilon_from(out, x, a, "epsilon"), a, a_next.to(ex.device))
        float(x.sum())  # wait for the device


def time_inversion(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    from diffeat.store import FeatureStore

    pipe = make_pipeline(args, workdir / "extract.zarr")
    sync = device_sync(args.device.startswith("cuda"))
    ex = pipe.extractor
    images = synthetic_images(args.images + 1, IMAGE_SEED)
    _ = ex.parts  # load before timing
    store = FeatureStore(workdir / "inv.zarr")
    cache_key = "bench-hyperfeatures"
    store.register_extractor(cache_key, {"plugin": "stable-diffusion", "bench": True})

    def collect(im: Any) -> Any:
        (fs,) = ex.extract([im])
        for t in fs.layers.values():
            float(t[0, 0, 0, 0])  # wait for the device
        return fs

    def collect_store(im: Any) -> None:
        fs = collect(im)
        store.put(cache_key, im.key, fs.to("cpu"), source="bench")

    variants = {"bare": lambda im: bare_inversion(ex, im), "collect": collect}
    variants["store"] = collect_store
    for fn in variants.values():  # warm-up (kernels, allocator) on image 0
        fn(images[0])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for im in images[1:]:
        for name, fn in variants.items():  # interleaved, so drift hits every variant alike
            sync()
            start = time.perf_counter()
            fn(im)
            sync()
            times[name].append(time.perf_counter() - start)
    # diffeat extract's path over all timed images at once
    pipe.extract(images[:1])  # warm-up (and the store's first write)
    sync()
    start = time.perf_counter()
    report = pipe.extract(images[1:])
    sync()
    times["pipeline"] = [(time.perf_counter() - start) / max(1, report.computed)]
    info = store.entry_info(cache_key, images[1].key)
    result: dict[str, Any] = {
        "steps": args.steps,
        "kept_timesteps": list(ex.options.timesteps),
        "images": args.images,
        "s_per_image": {k: sum(v) / len(v) for k, v in times.items()},
        "all_s": times,
        "entry_values_bytes_fp16": info["nbytes"],
        "entry_stored_bytes": info["stored_bytes"],
        "layers": {k: v["shape"] for k, v in info["layers"].items()},
    }
    s = result["s_per_image"]
    result["collect_over_bare"] = s["collect"] / s["bare"]
    result["store_over_bare"] = s["store"] / s["bare"]
    result["pipeline_over_bare"] = s["pipeline"] / s["bare"]
    if args.device.startswith("cuda"):
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# -- training -------------------------------------------------------------------------------


def real_shapes() -> dict[str, tuple[int, int, int]]:
    """(channels, h, w) of SD 1.5's 12 decoder conv2 maps at 512 px."""
    shapes = {}
    for i, (c, side) in enumerate([(1280, 8), (1280, 16), (640, 32), (320, 64)]):
        for j in range(3):
            shapes[f"up_blocks.{i}.resnets.{j}.conv2"] = (c, side, side)
    return shapes


def fill_training_store(path: Path, n_images: int, timesteps: int) -> tuple[str, list[str]]:
    """A store with ``n_images`` entries of the real shapes (float16, random values)."""
    import torch

    from diffeat.core.features import FeatureSet
    from diffeat.core.geometry import ImageTransform
    from diffeat.store import FeatureStore

    store = FeatureStore(path)
    cache_key = "bench-train"
    store.register_extractor(cache_key, {"plugin": "stable-diffusion", "bench": True})
    gen = torch.Generator().manual_seed(0)
    keys = []
    for i in range(n_images):
        layers = {
            name: torch.randn((timesteps, c, h, w), generator=gen)
            for name, (c, h, w) in real_shapes().items()
        }
        meta = {"transform": ImageTransform.resize((640, 480), (512, 512)).to_dict()}
        key = f"img{i:04d}"
        store.put(cache_key, key, FeatureSet(layers, tuple(KEPT_50[:timesteps]), meta))
        keys.append(key)
    return cache_key, keys


def time_training(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Steps/s of the hyperfeatures network with features from memory, the store, workers."""
    import numpy as np
    import torch

    from diffeat.core.options import build_options
    from diffeat.plugins.hyperfeatures.aggregator import Hyperfeatures
    from diffeat.train.data import PairFeatures, TrainPair, pair_loader
    from diffeat.train.loss import correspondence_loss

    timesteps = len(KEPT_50)
    cache_key, keys = fill_training_store(workdir / "train.zarr", args.train_images, timesteps)
    rng = np.random.RandomState(0)
    pairs = []
    for i in range(args.pairs):
        a, b = rng.choice(len(keys), 2, replace=False)
        cells = rng.randint(0, 64 * 64, size=(2, 12))
        pairs.append(TrainPair(f"p{i}", keys[a], keys[b], cells[0], cells[1]))
    from diffeat.core.sources import StoredFeatures

    dataset = PairFeatures(StoredFeatures(workdir / "train.zarr", cache_key, "float16"), pairs)
    # every image read once and kept as tensors; the samples share them
    from diffeat.train.data import PairSample

    held = {key: dataset.reader.get(key) for key in keys}
    memory = [
        PairSample(
            i,
            held[p.source_key],
            held[p.target_key],
            torch.as_tensor(p.source_cells, dtype=torch.long),
            torch.as_tensor(p.target_cells, dtype=torch.long),
        )
        for i, p in enumerate(pairs)
    ]

    device = args.device
    sync = device_sync(device.startswith("cuda"))
    agg = Hyperfeatures(build_options(Hyperfeatures, {"device": device}, "bench"))
    shapes = real_shapes()
    network = agg.network_for([(n, c) for n, (c, _, _) in shapes.items()], KEPT_50)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.0)

    def step(sample: Any) -> float:
        optimizer.zero_grad()
        out = agg.forward_features([sample.source, sample.target])
        loss = correspondence_loss(out[0], out[1], sample.source_cells, sample.target_cells)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    n = args.train_steps
    order = [i % len(pairs) for i in range(n + 2)]

    def run(samples: Any) -> float:
        it = iter(samples)
        for _ in range(2):  # warm-up steps (and, with workers, their start-up)
            step(next(it))
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step(next(it))
        sync()
        return n / (time.perf_counter() - start)

    speeds = {
        "memory": run(memory[i] for i in order),
        "store": run(pair_loader(dataset, order, workers=0)),
    }
    if args.workers > 0:
        speeds["store-workers"] = run(pair_loader(dataset, order, workers=args.workers))
    entry = dataset.store.entry_info(cache_key, keys[0])
    return {
        "network": "12 layers x 11 timesteps -> 384 x 64 x 64",
        "steps": n,
        "workers": args.workers,
        "steps_per_s": speeds,
        "store_over_memory": speeds["store"] / speeds["memory"],
        "entry_stored_bytes": entry["stored_bytes"],
    }


def print_report(summary: dict[str, Any]) -> None:
    inv = summary.get("inversion")
    if inv:
        s = inv["s_per_image"]
        print(f"\ninversion ({inv['steps']} steps, {len(inv['kept_timesteps'])} kept), s/image:")
        for name in ("bare", "collect", "store", "pipeline"):
            print(f"  {name:<8} {s[name]:8.3f}")
        print(f"  collect / bare  = {inv['collect_over_bare']:.3f} (target < 1.10)")
        print(f"  store / bare    = {inv['store_over_bare']:.3f} (write after each image)")
        print(
            f"  pipeline / bare = {inv['pipeline_over_bare']:.3f} (diffeat extract: writes overlap)"
        )
        print(
            f"  stored per image: {inv['entry_stored_bytes'] / 2**20:.1f} MiB on disk "
            f"({inv['entry_values_bytes_fp16'] / 2**20:.1f} MiB of float16 values)"
        )
    tr = summary.get("training")
    if tr:
        print(f"\ntraining ({tr['network']}), steps/s:")
        for name, value in tr["steps_per_s"].items():
            print(f"  {name:<14} {value:8.3f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=SD15_DIR)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--steps", type=int, default=50, help="DDIM inversion steps")
    ap.add_argument("--images", type=int, default=2, help="timed images (plus one warm-up)")
    ap.add_argument("--train-steps", type=int, default=20, help="timed training steps per mode")
    ap.add_argument("--train-images", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-inversion", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary: dict[str, Any] = {
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-hf-"))
    try:
        if not args.skip_inversion:
            if not sd15_is_complete(args.model_dir):
                print(f"building SD 1.5 with random weights in {args.model_dir} ...", flush=True)
                summary["model_build_s"] = build_sd15_random(args.model_dir)
            summary["inversion"] = time_inversion(args, workdir)
        if not args.skip_training:
            summary["training"] = time_training(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(summary)
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
