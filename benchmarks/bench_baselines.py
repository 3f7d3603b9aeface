"""Throughput of the ViT baselines at their preset resolutions, real-size architectures.

Each baseline runs its preset from ``examples/`` (extractor options as shipped: blocks, facet,
image size, resize rule) with the model swapped for the same architecture at full size with
*random* weights, built offline once into ``--model-dir`` (random weights cost the same FLOPs
as the real ones):

- ``dino-vitb8``: DINO ViT-B/8 (``ViTModel``, 86M parameters), 224 x 224 -> 28 x 28 tokens;
- ``dinov2-b14``: DINOv2 ViT-B/14 (``Dinov2Model``, 86M), 840 x 840 (pad) -> 60 x 60 tokens;
- ``openclip-vith14``: OpenCLIP ViT-H-14 (open_clip's own config; vision tower 632M, the whole
  CLIP 986M parameters stored as float16 to halve the file), 224 x 224 -> 16 x 16 tokens.

Per baseline: one untimed warm-up image, then ``--images`` timed ``extract`` calls on synthetic
640 x 480 images (preprocessing included), one image per call unless ``--batch-size``.
Reported: images/s, seconds per image, load time, the RSS after loading and the peak RSS of the
timed part (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; baselines run one after
the other in this process, so later peaks include what the allocator kept), the CPU
utilisation (CPU seconds / wall seconds) and the output layer's shape.

    python benchmarks/bench_baselines.py                      # CPU, fp32, 3 timed images each
    python benchmarks/bench_baselines.py --images 2 --only dino-vitb8 --json benchmarks/out/b.json
    python benchmarks/bench_baselines.py --device cuda --dtype float16 --images 50

A model folder is rebuilt when its ``.bench_complete.json`` marker is missing or stale.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    EXAMPLES,
    cpu_seconds,
    cuda_peaks,
    device_sync,
    machine_info,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    synthetic_images,
    write_json,
)
from _models import VIT_BASELINES as BASELINES
from _models import VIT_DIR, build_vit

#: the seed of the first synthetic image (the warm-up one)
IMAGE_SEED = 2000


# -- measuring -----------------------------------------------------------------------------------


def run_baseline(name: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from diffeat.core.config import load_config

    overrides = [
        f"extractor.model={json.dumps(model)}",
        f"extractor.device={json.dumps(args.device)}",
        f"extractor.dtype={json.dumps(args.dtype)}",
        f"extractor.batch_size={args.batch_size}",
    ]
    cfg = load_config(EXAMPLES / f"{name}.toml", overrides)
    ex = cfg.extractor.build()
    cuda = ex.device.type == "cuda"
    sync = device_sync(cuda)

    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    _ = ex.model
    load_s = time.perf_counter() - start
    gc.collect()
    rss_loaded = rss_mib()
    log(f"loaded in {load_s:.1f} s, RSS {rss_loaded or 0:.0f} MiB")
    b = args.batch_size
    images = synthetic_images(b * (args.images + 1), IMAGE_SEED)
    sync()
    t = time.perf_counter()
    ex.extract(images[:b])
    sync()
    warmup_s = time.perf_counter() - t
    log(f"warm-up: {warmup_s:.2f} s")
    gc.collect()
    peak_ok = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    per_call, shape = [], None
    cpu0 = cpu_seconds()
    for i in range(args.images):
        chunk = images[b * (i + 1) : b * (i + 2)]
        sync()
        t = time.perf_counter()
        fs = ex.extract(chunk)
        sync()
        per_call.append(time.perf_counter() - t)
        layer = next(iter(fs[0].layers.values()))
        shape = list(layer.shape)
        log(f"call {i + 1}/{args.images}: {per_call[-1]:.2f} s ({b} image(s)), {shape}")
    total = sum(per_call)
    n_images = b * len(per_call)
    result: dict[str, Any] = {
        "baseline": name,
        "options": {k: v for k, v in cfg.extractor.resolved().items() if k != "model"},
        "device": str(ex.device),
        "torch_threads": torch.get_num_threads(),
        "images": n_images,
        "images_per_s": n_images / total,
        "seconds_per_image": total / n_images,
        "seconds_per_call": per_call,
        "warmup_s": warmup_s,
        "load_s": load_s,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_timed_mib": peak_rss_mib() if peak_ok else None,
        "cpu_busy": (cpu_seconds() - cpu0) / total,
        "layer": [i.to_dict() for i in ex.layers()],
        "layer_shape": shape,
    }
    if cuda:
        result.update(cuda_peaks(ex.device))
    del ex
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=3, help="timed extract calls per baseline")
    p.add_argument("--batch-size", type=int, default=1, help="images per extract call")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--only", nargs="+", choices=BASELINES, default=list(BASELINES))
    p.add_argument("--model-dir", type=Path, default=VIT_DIR)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    info = machine_info()  # before --threads: it records torch's default thread count
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffeat.plugins.modelfiles import quiet_transformers

    quiet_transformers()
    results = {}
    for name in args.only:
        model = build_vit(name, args.model_dir / name)
        results[name] = run_baseline(name, model, args)

    cuda = any("cuda_max_allocated_mib" in r for r in results.values())
    print(
        f"{'baseline':<17}{'input':>10}{'grid':>9}{'channels':>9}{'images':>7}{'s/image':>9}"
        f"{'images/s':>10}{'load s':>8}{'peak RSS':>11}{'CPU busy':>9}"
        + (f"{'CUDA peak':>12}" if cuda else "")
    )
    for name, r in results.items():
        w, h = r["options"]["image_size"]
        _, c, gh, gw = r["layer_shape"]
        peak = r["peak_rss_timed_mib"]
        print(
            f"{name:<17}{f'{w}x{h}':>10}{f'{gw}x{gh}':>9}{c:>9}{r['images']:>7}"
            f"{r['seconds_per_image']:>9.{4 if cuda else 2}f}{r['images_per_s']:>10.3f}{r['load_s']:>8.1f}"
            f"{'-' if peak is None else f'{peak:.0f} MiB':>11}{r['cpu_busy']:>9.2f}"
            + (f"{r.get('cuda_max_allocated_mib', 0):>8.0f} MiB" if cuda else "")
        )
    if args.json:
        out = {"machine": info, "args": {**vars(args), "model_dir": str(args.model_dir)}}
        out["args"]["json"] = str(args.json)
        out["results"] = results
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
