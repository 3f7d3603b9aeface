"""Throughput and peak memory of the DIFT preset against the naive DIFT recipe, real-size SD 1.5.

Both variants run the ``stable-diffusion`` extractor with DIFT's semantic preset
(``layers=["up_blocks.1"]``, ``timesteps=[261]``, ``ensemble_size=8``) at 512 x 512:

- ``dift``: diffeat's defaults: the VAE encodes each image once and the 8 latents are drawn from
  its posterior; the UNet forward stops after ``up_blocks.1``;
- ``naive``: the original code's recipe: ``encode_per_copy=True`` (the VAE encodes all 8 copies)
  and ``stop_early=False`` (the whole UNet runs).

The model is Stable Diffusion 1.5's architecture at full size (UNet 860M parameters, VAE, CLIP
ViT-L/14 text encoder) with *random* weights, built offline once into ``--model-dir`` (diffusers
layout, safetensors; a ``.bench_complete.json`` marker is written last, a folder without it is
rebuilt). Random weights cost exactly the same FLOPs as the real ones.

Each variant runs in its own subprocess, so its peak memory is its own: one untimed warm-up
image, then ``--images`` timed images (synthetic 640 x 480 colour fields, squash-resized to
512). Reported per variant: images/s, the peak resident set size while the timed images ran
(Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; it includes the
weights, which are mmapped from the safetensors files and count once used), the RSS after the
warm-up, the process-wide ``ru_maxrss``, the CPU utilisation of the timed part (CPU seconds /
wall seconds: below the thread count means something else competed for the cores), and on
CUDA ``torch.cuda.max_memory_allocated``. With ``--stages`` (default on CPU) forward hooks time the
VAE encoder and the UNet's blocks, to show where the time goes. Finally the ``up_blocks.1``
maps of the two variants are compared (cosine similarity per feature vector): the noise is
seeded by image content, so they must agree up to float rounding.

    python benchmarks/bench_dift.py                       # CPU fp32; ~7.5 min on 2 idle cores
    python benchmarks/bench_dift.py --images 1 --json benchmarks/out/dift_cpu.json
    python benchmarks/bench_dift.py --device cuda --dtype float16 --images 20
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    cpu_seconds,
    cuda_peaks,
    device_sync,
    fmt,
    machine_info,
    marker_facts,
    maxrss_mib,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    synthetic_images,
    write_json,
)
from _models import SD15_DIR, build_sd15_random, sd15_is_complete

LAYER = "up_blocks.1"
#: the seed of the first synthetic image (the warm-up one)
IMAGE_SEED = 1000

#: Options of the ``stable-diffusion`` extractor that differ between the two variants.
VARIANTS: dict[str, dict[str, Any]] = {
    "dift": {},  # the defaults: encode_per_copy=False, stop_early=True
    "naive": {"encode_per_copy": True, "stop_early": False},
}

# -- stage timing -----------------------------------------------------------------------------


class StageTimer:
    """Forward pre/post hooks that add up the seconds spent in each module.

    Registered before the extractor's own capture hooks, so the post hook of ``up_blocks.1``
    runs before the early stop ends the forward. On CUDA each hook synchronises.
    """

    def __init__(self, modules: dict[str, Any], sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self.sync()
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.sync()
            self.seconds[name] += time.perf_counter() - self._start.pop(name)

        return hook

    def reset(self) -> None:
        self.seconds = defaultdict(float)
        self._start = {}


def stage_modules(parts: Any) -> dict[str, Any]:
    unet, vae = parts.unet, parts.vae
    mods: dict[str, Any] = {"text_encoder": parts.text_encoder, "vae.encoder": vae.encoder}
    if getattr(vae, "quant_conv", None) is not None:
        mods["vae.quant_conv"] = vae.quant_conv
    mods["unet.conv_in"] = unet.conv_in
    mods["unet.time_embedding"] = unet.time_embedding
    for i, block in enumerate(unet.down_blocks):
        mods[f"unet.down_blocks.{i}"] = block
    mods["unet.mid_block"] = unet.mid_block
    for i, block in enumerate(unet.up_blocks):
        mods[f"unet.up_blocks.{i}"] = block
    mods["unet.conv_norm_out"] = unet.conv_norm_out
    mods["unet.conv_out"] = unet.conv_out
    return mods


def stage_group(name: str) -> str:
    if name.startswith("vae."):
        return "vae_encode"
    if name == "text_encoder":
        return "text_encoder"
    if name.startswith(("unet.down_blocks", "unet.conv_in", "unet.time_embedding")):
        return "unet_down"
    if name == "unet.mid_block":
        return "unet_mid"
    if name.startswith("unet.up_blocks."):
        return "unet_up" + name.rsplit(".", 1)[1]
    return "unet_out"


STAGE_ORDER = [
    "vae_encode",
    "text_encoder",
    "unet_down",
    "unet_mid",
    "unet_up0",
    "unet_up1",
    "unet_up2",
    "unet_up3",
    "unet_out",
    "other",
]


# -- one variant (runs in a subprocess) -------------------------------------------------------


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffeat.core.options import build_options
    from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor

    name = args.variant
    values = {
        "model": str(args.model_dir),
        "layers": [LAYER],
        "timesteps": [args.timestep],
        "ensemble_size": args.ensemble_size,
        "image_size": [args.image_size, args.image_size],
        "dtype": args.dtype,
        "device": args.device,
        "batch_size": 1,
        **VARIANTS[name],
    }
    opts = build_options(StableDiffusionExtractor, values, f"bench_dift[{name}]")
    ext = StableDiffusionExtractor(opts)
    cuda = ext.device.type == "cuda"
    sync = device_sync(cuda)

    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    parts = ext.parts
    ext.module_names  # noqa: B018  (resolves the layer names)
    load_s = time.perf_counter() - start
    gc.collect()
    rss_loaded = rss_mib()
    log(
        f"model loaded in {load_s:.1f} s, RSS {rss_loaded:.0f} MiB; threads {torch.get_num_threads()}"
    )

    use_stages = args.stages == "on" or (args.stages == "auto" and not cuda)
    timer = StageTimer(stage_modules(parts), sync) if use_stages else None
    images = synthetic_images(args.images + 1, IMAGE_SEED)

    sync()
    t = time.perf_counter()
    ext.extract([images[0]])
    sync()
    warmup_s = time.perf_counter() - t
    log(f"warm-up image: {warmup_s:.1f} s")
    warmup_stages = dict(timer.seconds) if timer else {}
    if timer:
        timer.reset()
    rss_warm = rss_mib()  # the weights are mmapped from safetensors: resident once used

    gc.collect()
    peak_reset = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    per_image: list[float] = []
    feature_files: list[str] = []
    all_finite = True
    cpu0, load0 = cpu_seconds(), os.getloadavg()[0]
    for i, im in enumerate(images[1:]):
        sync()
        t = time.perf_counter()
        fs = ext.extract([im])[0]
        sync()
        per_image.append(time.perf_counter() - t)
        maps = fs.layers[LAYER]
        path = Path(args.features_dir) / f"{name}_{i}.pt"
        torch.save(maps.detach().to("cpu", torch.float32).clone(), path)
        feature_files.append(str(path))
        finite = bool(torch.isfinite(maps).all())
        all_finite = all_finite and finite
        log(
            f"image {i + 1}/{args.images}: {per_image[-1]:.3g} s, {LAYER} {tuple(maps.shape)}, "
            f"finite={finite}"
        )
    total = sum(per_image)
    cpu_busy = (cpu_seconds() - cpu0) / total
    result: dict[str, Any] = {
        "variant": name,
        "options": {k: v for k, v in values.items() if k != "model"},
        "device": str(ext.device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "images": len(per_image),
        "seconds_per_image": per_image,
        "images_per_s": len(per_image) / total,
        "warmup_s": warmup_s,
        "load_s": load_s,
        "rss_loaded_mib": rss_loaded,
        "rss_after_warmup_mib": rss_warm,
        "peak_rss_timed_mib": peak_rss_mib() if peak_reset else None,
        "peak_rss_process_mib": maxrss_mib(),
        "cpu_busy": cpu_busy,
        "cpu_s_per_image": cpu_busy * total / len(per_image),
        "loadavg_1min": [load0, os.getloadavg()[0]],
        "feature_files": feature_files,
        "all_finite": all_finite,
    }
    if cuda:
        result.update(cuda_peaks(ext.device))
    if timer:
        per = {k: v / len(per_image) for k, v in timer.seconds.items()}
        groups: dict[str, float] = defaultdict(float)
        for k, v in per.items():
            groups[stage_group(k)] += v
        groups["other"] = total / len(per_image) - sum(groups.values())
        result["stages_s_per_image"] = dict(groups)
        result["modules_s_per_image"] = per
        result["warmup_modules_s"] = warmup_stages
    return result


# -- the driver -------------------------------------------------------------------------------


def compare_features(a_files: list[str], b_files: list[str]) -> dict[str, float]:
    """Cosine similarity per feature vector (over channels) of matching maps, and max |a - b|."""
    import torch

    cos_mean, cos_min, global_cos, max_abs, rel = [], [], [], [], []
    for fa, fb in zip(a_files, b_files):
        a = torch.load(fa).double()  # [T, C, H, W]
        b = torch.load(fb).double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        cos_mean.append(cos.mean().item())
        cos_min.append(cos.min().item())
        global_cos.append(
            torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        )
        max_abs.append((a - b).abs().max().item())
        rel.append(((a - b).norm() / a.norm()).item())
    return {
        "images": len(cos_mean),
        "cosine_mean": min(cos_mean),
        "cosine_min": min(cos_min),
        "cosine_global": min(global_cos),
        "max_abs_diff": max(max_abs),
        "relative_l2_diff": max(rel),
    }


def child_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--model-dir",
        str(args.model_dir),
        "--images",
        str(args.images),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--ensemble-size",
        str(args.ensemble_size),
        "--image-size",
        str(args.image_size),
        "--timestep",
        str(args.timestep),
        "--stages",
        args.stages,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + extra


def print_report(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    cuda = any("cuda_max_allocated_mib" in r for r in results.values())
    head = (
        f"{'variant':<8}{'images':>7}{'s/image':>10}{'images/s':>10}{'peak RSS':>11}{'RSS warm':>11}"
        f"{'ru_maxrss':>11}{'warm-up s':>11}{'CPU busy':>10}"
    )
    if cuda:
        head += f"{'CUDA peak':>11}"
    print(head)
    for name, r in results.items():
        line = (
            f"{name:<8}{r['images']:>7}{1 / r['images_per_s']:>10.{4 if cuda else 2}f}{r['images_per_s']:>10.4f}"
            f"{fmt(r['peak_rss_timed_mib'], '.0f'):>7} MiB{fmt(r['rss_after_warmup_mib'], '.0f'):>7} MiB"
            f"{r['peak_rss_process_mib']:>7.0f} MiB{r['warmup_s']:>11.1f}{r['cpu_busy']:>10.2f}"
        )
        if cuda:
            line += f"{r.get('cuda_max_allocated_mib', 0):>7.0f} MiB"
        print(line)
    print(
        "  peak RSS: high-water mark while the timed images ran (weights included); RSS warm: after"
        " the warm-up image;\n  ru_maxrss: whole process; CPU busy: process CPU seconds / wall seconds"
        " while timed (~torch threads when the machine is otherwise idle)"
    )
    busy = {n: r["loadavg_1min"] for n, r in results.items()}
    print(
        "  1-min load average before/after the timed images: "
        + ", ".join(f"{n} {a:.2f}/{b:.2f}" for n, (a, b) in busy.items())
    )
    stages = [r.get("stages_s_per_image") for r in results.values()]
    if all(stages):
        print("\nseconds per image by stage (forward hooks):")
        print(f"{'stage':<14}" + "".join(f"{n:>10}" for n in results))
        for key in STAGE_ORDER:
            vals = [s.get(key, 0.0) for s in stages]
            if any(abs(v) > 1e-4 for v in vals):
                print(f"{key:<14}" + "".join(f"{v:>10.2f}" for v in vals))
    if "ratio" in summary:
        print(
            f"\nthroughput ratio dift / naive: {summary['ratio']:.2f}x "
            f"(by process CPU seconds per image: {summary['ratio_cpu_time']:.2f}x)"
        )
    cmp = summary.get("features")
    if cmp:
        print(
            f"{LAYER} maps, dift vs naive ({cmp['images']} images): cosine per vector mean "
            f"{cmp['cosine_mean']:.8f}, min {cmp['cosine_min']:.8f}; global {cmp['cosine_global']:.10f}; "
            f"max |diff| {cmp['max_abs_diff']:.3g}, relative L2 {cmp['relative_l2_diff']:.3g}"
        )


def drive(args: argparse.Namespace) -> None:
    wall_start = time.perf_counter()
    info = machine_info()
    print(
        f"machine: {info['platform']}; {info['cpu']}; cpu_count {info['cpu_count']} "
        f"(affinity {info['cpu_affinity']}); memory {fmt(info['memory_mib'], '.0f')} MiB; "
        f"torch {info['torch']} ({info['cpu_capability']}), threads {args.threads or info['torch_threads_default']}"
        f"{'; ' + info['cuda'] if info['cuda'] else ''}",
        flush=True,
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)

    build_s = None
    if sd15_is_complete(args.model_dir):
        print(f"model: {args.model_dir} (cached)", flush=True)
    else:
        print(f"model: building SD 1.5 (random weights) into {args.model_dir} ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--model-dir",
                str(args.model_dir),
                "--build-only",
            ],
            check=True,
        )
        build_s = marker_facts(args.model_dir)["build_s"]
        print(f"model: built in {build_s:.0f} s", flush=True)

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_dift_") as tmp:
        for name in args.variants:
            out = Path(tmp) / f"{name}.json"
            cmd = child_command(
                args, ["--variant", name, "--result-file", str(out), "--features-dir", tmp]
            )
            print(f"\nrunning {name}: {args.images} timed images after 1 warm-up ...", flush=True)
            subprocess.run(cmd, check=True)
            results[name] = json.loads(out.read_text())
        summary: dict[str, Any] = {}
        if "dift" in results and "naive" in results:
            summary["ratio"] = results["dift"]["images_per_s"] / results["naive"]["images_per_s"]
            summary["ratio_cpu_time"] = (
                results["naive"]["cpu_s_per_image"] / results["dift"]["cpu_s_per_image"]
            )
            summary["features"] = compare_features(
                results["dift"]["feature_files"], results["naive"]["feature_files"]
            )
    wall = time.perf_counter() - wall_start
    print()
    print_report(results, summary)
    print(
        f"\nwall time of the whole run: {wall:.0f} s"
        f"{f' (model build {build_s:.0f} s)' if build_s is not None else ''}"
    )
    if args.json:
        for r in results.values():
            r.pop("feature_files", None)
        data = {
            "command": sys.argv,
            "machine": info,
            "model_dir": str(args.model_dir),
            "model_build_s": build_s,
            "wall_s": wall,
            "results": results,
            **summary,
        }
        write_json(args.json, data)
        print(f"results written to {args.json}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=SD15_DIR,
        help="where the random-weight SD 1.5 is built once and cached (default: %(default)s)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=2,
        help="timed images per variant, after 1 warm-up (default: 2)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1, auto (default: cpu)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--ensemble-size", type=int, default=8)
    p.add_argument(
        "--image-size", type=int, default=512, help="square model input in pixels (default: 512)"
    )
    p.add_argument("--timestep", type=int, default=261)
    p.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=list(VARIANTS),
        help="comma-separated subset of: " + ", ".join(VARIANTS),
    )
    p.add_argument(
        "--stages",
        choices=["auto", "on", "off"],
        default="auto",
        help="time the VAE encoder and UNet blocks with hooks (auto: on CPU only, "
        "since on CUDA each hook synchronises)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    # internal: one variant in this process / build the model only
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--features-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be >= 1")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.build_only:
        build_sd15_random(args.model_dir)
    elif args.variant:
        result = run_variant(args)
        args.result_file.write_text(json.dumps(result, indent=2) + "\n")
    else:
        drive(args)


if __name__ == "__main__":
    main()
