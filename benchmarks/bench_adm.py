"""Seconds per image and peak memory of the ``adm`` extractor (DIFT_adm), real-size random weights.

The model is guided-diffusion's 256x256 unconditional UNet at full size (552,814,086
parameters) with *random* weights: an official-style state dict (the official key names,
``diffeat.testing.adm.tiny_official_state_dict`` applied to the real architecture) is
written to safetensors and converted with ``diffeat convert adm``'s code into
``--model-dir`` once (the conversion time is reported; a ``.bench_complete.json`` marker is
written last). Random weights cost exactly the same FLOPs as the real ones.

Then the extractor runs DIFT_adm's semantic preset (``examples/dift-adm-semantic.toml``:
output block 4, t = 101, 512 x 512) with ``--ensemble`` copies (the preset's 8 by default)
on synthetic 640 x 480 images: ``--warmup`` untimed images, then ``--images`` timed ones.
Reported: seconds per image, peak resident memory while the timed images ran (Linux
``VmHWM`` after a reset; it includes the 2.2 GB of weights), CPU utilisation, and on CUDA
``torch.cuda.max_memory_allocated``. ``--no-stop-early`` runs the whole UNet, as the
original featurizer's loop does not (it returns at the block) but a plain forward would.

``--check`` first compares every block output of the converted full-size UNet with
guided-diffusion's forward written out (``diffeat.testing.adm.reference_blocks``) on the
same official-key weights, at 64 px (about 2.5 min and 7 GB on a CPU).

    python benchmarks/bench_adm.py --ensemble 1 --images 1          # ~3 min on 2 busy CPU cores
    python benchmarks/bench_adm.py --device cuda --images 10
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    EXAMPLES,
    OUT,
    cpu_seconds,
    cuda_peaks,
    device_sync,
    fresh_folder,
    machine_info,
    marker_complete,
    marker_facts,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    synthetic_images,
    write_json,
    write_marker,
)

ADM_RECIPE = 1
IMAGE_SEED = 100


def build_adm_random(folder: Path) -> dict[str, Any]:
    """The real-size ADM folder with random weights, through the converter (once)."""
    if marker_complete(folder, ADM_RECIPE):
        return marker_facts(folder)
    from safetensors.torch import save_file

    from diffeat.plugins.adm.architecture import AdmArchitecture
    from diffeat.plugins.adm.convert import convert_file
    from diffeat.testing.adm import tiny_official_state_dict

    fresh_folder(folder)
    source = folder.with_name(folder.name + ".official.safetensors")
    start = time.perf_counter()
    state = tiny_official_state_dict(AdmArchitecture(), seed=0)
    params = sum(v.numel() for v in state.values())
    save_file(state, str(source))
    del state
    written = time.perf_counter() - start
    start = time.perf_counter()
    convert_file(source, folder)
    convert_s = time.perf_counter() - start
    source.unlink()
    write_marker(
        folder, ADM_RECIPE, parameters=params, write_official_s=written, convert_s=convert_s
    )
    return marker_facts(folder)


def check_conversion(model: Path) -> dict[str, float]:
    """Worst relative difference over every block between the converted UNet and the
    written-out official forward on the same weights (seed 0 of the build), at 64 px."""
    import torch
    from diffusers import UNet2DModel

    from diffeat.plugins.adm.architecture import AdmArchitecture
    from diffeat.plugins.diffusers_models import quiet_diffusers
    from diffeat.plugins.module_capture import HookTarget, ModuleCapture
    from diffeat.testing.adm import reference_blocks, tiny_official_state_dict

    quiet_diffusers()
    arch = AdmArchitecture()
    state = tiny_official_state_dict(arch, seed=0)
    unet = UNet2DModel.from_pretrained(model).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([101])
    modules = dict(unet.named_modules())
    targets = [HookTarget(b.name, modules[b.module], "output", lambda o: o) for b in arch.blocks()]
    with torch.no_grad():
        ref = reference_blocks(state, x, t, head_channels=arch.num_head_channels)
        with ModuleCapture(targets, stop_early=False) as cap:
            outs = cap.run(lambda: unet(x, t))
    errors = {
        name: float((outs[name] - ref[name]).abs().max() / ref[name].abs().max()) for name in outs
    }
    worst = max(errors, key=errors.__getitem__)
    return {"blocks": len(errors), "worst_block": worst, "worst_relative_error": errors[worst]}


def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    import torch

    from diffeat.core.config import load_config

    overrides = [
        f"extractor.model={json.dumps(str(model))}",
        f"extractor.device={json.dumps(args.device)}",
        f"extractor.dtype={json.dumps(args.dtype)}",
        f"extractor.ensemble_size={args.ensemble}",
        f"extractor.image_size=[{args.size}, {args.size}]",
        f"extractor.layers={json.dumps([args.layer])}",
        f"extractor.stop_early={'false' if args.no_stop_early else 'true'}",
    ]
    cfg = load_config(EXAMPLES / "dift-adm-semantic.toml", overrides)
    ex = cfg.extractor.build()
    sync = device_sync(ex.device.type == "cuda")
    start = time.perf_counter()
    _ = ex.unet
    load_s = time.perf_counter() - start
    gc.collect()
    rss_loaded = rss_mib()
    print(f"loaded in {load_s:.1f} s, RSS {rss_loaded or 0:.0f} MiB", file=sys.stderr, flush=True)
    images = synthetic_images(args.warmup + args.images, IMAGE_SEED)
    for im in images[: args.warmup]:
        ex.extract([im])
    gc.collect()
    peak_ok = reset_peak_rss()
    if ex.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_image, shape = [], None
    cpu0 = cpu_seconds()
    for i, im in enumerate(images[args.warmup :]):
        sync()
        t = time.perf_counter()
        (fs,) = ex.extract([im])
        sync()
        per_image.append(time.perf_counter() - t)
        shape = list(fs.layers[args.layer].shape)
        print(f"image {i + 1}: {per_image[-1]:.1f} s, {shape}", file=sys.stderr, flush=True)
    total = sum(per_image)
    result: dict[str, Any] = {
        "options": {k: v for k, v in cfg.extractor.resolved().items() if k != "model"},
        "device": str(ex.device),
        "torch_threads": torch.get_num_threads(),
        "images": len(per_image),
        "seconds_per_image": total / len(per_image),
        "seconds": per_image,
        "load_s": load_s,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_timed_mib": peak_rss_mib() if peak_ok else None,
        "cpu_busy": (cpu_seconds() - cpu0) / total,
        "layer": [i.to_dict() for i in ex.layers()],
        "layer_shape": shape,
    }
    if ex.device.type == "cuda":
        result.update(cuda_peaks(ex.device))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=OUT / "adm-random")
    p.add_argument("--ensemble", type=int, default=8, help="ensemble size (preset: 8)")
    p.add_argument("--size", type=int, default=512, help="input side in pixels (preset: 512)")
    p.add_argument("--layer", default="output_blocks.4", help="block to capture (preset: 4)")
    p.add_argument("--images", type=int, default=1, help="timed images")
    p.add_argument("--warmup", type=int, default=0, help="untimed images first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--no-stop-early", action="store_true", help="run the whole UNet")
    p.add_argument("--check", action="store_true", help="check the conversion numerically first")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    build = build_adm_random(args.model_dir)
    print(f"model: {build}", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"machine": machine_info(), "build": build}
    if args.check:
        result["check"] = check_conversion(args.model_dir)
        print(f"conversion check: {result['check']}", file=sys.stderr, flush=True)
    result.update(run(args, args.model_dir))
    print(
        f"adm {args.layer} ensemble {args.ensemble} at {args.size} px on {result['device']} "
        f"({args.dtype}): {result['seconds_per_image']:.1f} s/image, peak RSS "
        f"{result['peak_rss_timed_mib'] or 0:.0f} MiB (loaded {result['rss_loaded_mib'] or 0:.0f}"
        f" MiB), CPU busy {result['cpu_busy']:.2f}"
    )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
