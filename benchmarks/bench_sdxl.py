"""Seconds per image and peak memory of the SDXL UNet as the stable-diffusion extractor runs it.

The UNet is SDXL's architecture at its real size (2.57 B parameters, built from SDXL's
``unet/config.json`` with random weights: the same FLOPs as the real model) or, with
``--width-divisor N``, every channel width divided by N. One pass runs through the
extractor's own capture mechanism (``UNetPasses`` with SDXL's ``added_cond_kwargs``), as
the DistillDIFT preset does (t = 101, one draw, ``up_blocks.0.resnets.0``, stopping there)
and as a full pass (``stop_early = false``). Nothing is downloaded or written.

    python benchmarks/bench_sdxl.py --size 256                    # real size, 256 px
    python benchmarks/bench_sdxl.py --size 768 --json benchmarks/out/sdxl_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import (
    cuda_peaks,
    device_sync,
    machine_info,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    write_json,
)

#: SDXL base / SDXL-Turbo ``unet/config.json`` (the fields that shape the network)
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}


def build(divisor: int):
    import torch
    from diffusers import UNet2DConditionModel

    cfg = dict(SDXL_UNET)
    if divisor > 1:
        cfg["block_out_channels"] = [c // divisor for c in cfg["block_out_channels"]]
        cfg["attention_head_dim"] = [max(1, h // divisor) for h in cfg["attention_head_dim"]]
        cfg["norm_num_groups"] = max(1, 32 // divisor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg)
    return unet.eval().requires_grad_(False), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="model input side in pixels")
    ap.add_argument("--width-divisor", type=int, default=1, help="divide every channel width")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    ap.add_argument(
        "--only", choices=["both", "stop", "full"], default="both", help="which variants to time"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()

    import torch

    from diffeat.plugins.stable_diffusion.unet_layers import UNetPasses

    if args.threads:
        torch.set_num_threads(args.threads)
    reset_peak_rss()
    t0 = time.perf_counter()
    unet, cfg = build(args.width_divisor)
    build_s = time.perf_counter() - t0
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    unet = unet.to(device, dtype)
    sync = device_sync(device.type == "cuda")
    params = sum(p.numel() for p in unet.parameters())
    latent = args.size // 8
    z = torch.randn(1, 4, latent, latent).to(device, dtype)
    context = torch.randn(1, 77, cfg["cross_attention_dim"]).to(device, dtype)
    added = {
        "text_embeds": torch.randn(1, cfg["projection_class_embeddings_input_dim"] - 6 * 256).to(
            device, dtype
        ),
        "time_ids": torch.tensor(
            [[args.size, args.size, 0, 0, args.size, args.size]], dtype=dtype, device=device
        ),
    }
    warm = UNetPasses(unet, ["up_blocks.0.resnets.0"])
    with torch.no_grad(), warm.conditioned(added, zero_added=True):
        for _ in range(args.warmup):  # untimed: first-call set-up of the kernels
            warm.maps(z, torch.tensor(101, device=device), context)
    rows = []
    variants = [
        ("distilldift (stop after up_blocks.0.resnets.0)", True),
        ("full pass", False),
    ]
    variants = [v for v in variants if args.only == "both" or (args.only == "stop") == v[1]]
    for name, stop in variants:
        passes = UNetPasses(unet, ["up_blocks.0.resnets.0"], stop_early=stop)
        times = []
        with torch.no_grad(), passes.conditioned(added, zero_added=True):
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                out = passes.maps(z, torch.tensor(101, device=device), context)
                sync()
                times.append(time.perf_counter() - t)
        rows.append(
            {
                "variant": name,
                "seconds_per_pass": min(times),
                "map_shape": list(out["up_blocks.0.resnets.0"].shape),
            }
        )
    result = {
        "size_px": args.size,
        "width_divisor": args.width_divisor,
        "unet_parameters": params,
        "build_seconds": build_s,
        "rss_mib_after": rss_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": args.dtype,
        **({"cuda": cuda_peaks(device)} if device.type == "cuda" else {}),
        "rows": rows,
        "machine": machine_info(),
    }
    print(f"SDXL UNet {params / 1e9:.2f} B parameters, {args.size} px, built in {build_s:.1f} s")
    for r in rows:
        print(f"  {r['variant']:<48} {r['seconds_per_pass']:8.2f} s  {r['map_shape']}")
    print(f"  peak RSS {result['peak_rss_mib']} MiB")
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
