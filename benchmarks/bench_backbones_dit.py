"""Cost of the diffusion-transformer extractor per family (FLUX, SD3, PixArt), reduced configs.

The real models do not fit this benchmark's budget on a CPU: FLUX.1-dev's transformer
is 12B parameters (DiTF's block 28 runs 19 double- and 10 single-stream blocks, about
8B) with a 4.7B T5-XXL, SD3.5 large 8B, PixArt-alpha 0.6B with T5-XXL. So each family
is built offline with *random* weights (same FLOPs per block as the real ones) at its
real block width but few blocks, small text encoders (prompts are encoded once per
prompt, outside the per-image cost) and its real T5 length:

- ``flux``: width 3072 (24 heads x 128, FLUX.1-dev), ``--blocks`` split into double- then
  single-stream blocks, the deepest captured, 512 T5 tokens;
- ``sd3``: width 1536 (24 x 64, SD3 medium), joint blocks, 256 T5 tokens;
- ``pixart``: width 1152 (16 x 72, PixArt-alpha XL), AdaLN-single blocks, 120 T5 tokens.

``--width-scale`` divides the head count (0.25: a quarter of the width) for a quicker run.
Per family: one untimed warm-up image, then ``--images`` timed ``extract`` calls on synthetic
640 x 480 images at ``--size`` (square resize), ``--ensemble`` copies, one timestep, DiTF's
normalisation on. Reported: seconds per image, seconds per image per block (the real preset
needs ``ensemble x blocks`` of these, at its own token count), the RSS after loading and the
peak RSS of the timed part, and the output shape.

    python benchmarks/bench_backbones_dit.py                       # defaults: 256 px, 2 blocks
    python benchmarks/bench_backbones_dit.py --only pixart --size 512 --json benchmarks/out/d.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    OUT,
    cpu_seconds,
    fresh_folder,
    machine_info,
    marker_complete,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    synthetic_images,
    write_json,
    write_marker,
)

RECIPE = 1
#: real (heads, head dim) and T5 length of each family
FAMILIES = {
    "flux": (24, 128, 512),
    "sd3": (24, 64, 256),
    "pixart": (16, 72, 120),
}
IMAGE_SEED = 3000


def build(family: str, folder: Path, heads: int, head_dim: int, blocks: int) -> tuple[Path, str]:
    """The random model (built once per recipe and size) and the block to capture."""
    from diffeat.testing import dit

    if family == "flux":
        double, single = (blocks + 1) // 2, blocks // 2
        layer = (
            f"single_transformer_blocks.{single - 1}"
            if single
            else f"transformer_blocks.{double - 1}"
        )
        kwargs = {"num_layers": double, "num_single_layers": max(single, 1)}
        builder = dit.build_tiny_flux
    else:
        layer = f"transformer_blocks.{blocks - 1}"
        kwargs = {"num_layers": blocks + 1}  # SD3's last block is context_pre_only
        builder = dit.build_tiny_sd3 if family == "sd3" else dit.build_tiny_pixart
    if not marker_complete(folder, RECIPE):
        fresh_folder(folder)
        t = time.perf_counter()
        builder(folder / "model", heads=heads, head_dim=head_dim, **kwargs)
        write_marker(folder, RECIPE, build_s=time.perf_counter() - t)
    return folder / "model", layer


def run_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    from diffeat.plugins.dit.extractor import DiffusionTransformerExtractor
    from diffeat.plugins.dit.options import DiffusionTransformerOptions

    heads, head_dim, t5_len = FAMILIES[family]
    heads = max(1, round(heads * args.width_scale))
    name = f"{family}-h{heads}x{head_dim}-b{args.blocks}"
    model, layer = build(family, args.model_dir / name, heads, head_dim, args.blocks)

    def log(msg: str) -> None:
        print(f"[{family}] {msg}", file=sys.stderr, flush=True)

    opts = DiffusionTransformerOptions(
        model=str(model),
        layers=[layer],
        timesteps=[260],
        image_size=[args.size, args.size],
        ensemble_size=args.ensemble,
        max_sequence_length=t5_len,
        massive_activations="ditf",
        dtype=args.dtype,
        device=args.device,
    )
    ex = DiffusionTransformerExtractor(opts)
    t = time.perf_counter()
    _ = ex.parts
    load_s = time.perf_counter() - t
    params = sum(p.numel() for p in ex.parts.transformer.parameters())
    gc.collect()
    rss_loaded = rss_mib()
    log(f"{params / 1e6:.0f}M transformer parameters, loaded in {load_s:.1f} s")
    images = synthetic_images(args.images + 1, IMAGE_SEED)
    t = time.perf_counter()
    ex.extract(images[:1])
    warmup_s = time.perf_counter() - t
    log(f"warm-up {warmup_s:.2f} s")
    gc.collect()
    peak_ok = reset_peak_rss()
    per_call, shape = [], None
    cpu0 = cpu_seconds()
    for i in range(args.images):
        t = time.perf_counter()
        fs = ex.extract(images[i + 1 : i + 2])
        per_call.append(time.perf_counter() - t)
        shape = list(fs[0].layers[layer].shape)
        log(f"image {i + 1}/{args.images}: {per_call[-1]:.2f} s, {shape}")
    total = sum(per_call)
    result = {
        "family": family,
        "model": name,
        "layer": layer,
        "blocks_run": args.blocks,
        "transformer_parameters": params,
        "width": heads * head_dim,
        "t5_tokens": t5_len,
        "size": args.size,
        "ensemble": args.ensemble,
        "dtype": args.dtype,
        "seconds_per_image": total / len(per_call),
        "seconds_per_image_per_block": total / len(per_call) / args.blocks,
        "seconds_per_call": per_call,
        "warmup_s": warmup_s,
        "load_s": load_s,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_timed_mib": peak_rss_mib() if peak_ok else None,
        "cpu_busy": (cpu_seconds() - cpu0) / total,
        "layer_shape": shape,
    }
    del ex
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2, help="timed extract calls per family")
    p.add_argument("--size", type=int, default=256, help="model input side in pixels")
    p.add_argument("--blocks", type=int, default=2, help="transformer blocks run")
    p.add_argument("--ensemble", type=int, default=1, help="noisy copies per image")
    p.add_argument("--width-scale", type=float, default=1.0, help="fraction of the real heads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--only", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--model-dir", type=Path, default=OUT / "dit-random")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    info = machine_info()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {f: run_family(f, args) for f in args.only}
    print(
        f"{'family':<8}{'width':>7}{'params':>9}{'input':>9}{'grid':>7}{'E':>3}{'s/image':>9}"
        f"{'s/img/block':>13}{'load s':>8}{'peak RSS':>11}{'CPU busy':>9}"
    )
    for f, r in results.items():
        _, _, gh, gw = r["layer_shape"]
        peak = r["peak_rss_timed_mib"]
        print(
            f"{f:<8}{r['width']:>7}{r['transformer_parameters'] / 1e6:>8.0f}M"
            f"{f'{args.size}px':>9}{f'{gw}x{gh}':>7}{r['ensemble']:>3}"
            f"{r['seconds_per_image']:>9.2f}{r['seconds_per_image_per_block']:>13.2f}"
            f"{r['load_s']:>8.1f}{'-' if peak is None else f'{peak:.0f} MiB':>11}"
            f"{r['cpu_busy']:>9.2f}"
        )
    if args.json:
        out = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
        out["results"] = results
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
