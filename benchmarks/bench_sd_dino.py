"""Seconds per image pair and peak memory of the SD-DINO preset, end to end, real-size models.

Runs ``examples/sd-dino.toml`` as shipped (SD 1.5 decoder features at 960 x 960 padded on
512 px tiles at stride 512 with ODISE's implicit captioner, DINOv2 ViT-B/14 at 840 px, the
``fuse`` aggregator with a per-pair low-rank PCA to 256 channels, nearest neighbour on
DINOv2's 60 x 60 grid) with every model swapped for the same architecture at full size with
*random* weights (same FLOPs as the real ones), built offline once:

- SD 1.5 (UNet 860M, VAE, CLIP text encoder): ``bench_dift.py``'s folder (``--sd-dir``,
  default ``benchmarks/out/sd15-random``), built there when missing;
- DINOv2 ViT-B/14: ``bench_baselines.py``'s folder (``--dino-dir``, default
  ``benchmarks/out/vit-random/dinov2-b14``), built there when missing;
- the captioner's CLIP tower (open_clip's built-in ``ViT-L-14-336-quickgelu``, the whole CLIP stored as
  float16, 428M parameters, loaded as ``pretrained=<file>``) and random implicit-captioner
  weights in ODISE's layout (``diffeat.testing.sd.build_tiny_captioner`` at SD 1.5's
  sizes: CLIP embedding 768, prompt 77 x 768, time embedding 1280): ``--model-dir``
  (default ``benchmarks/out/sd-dino-random``).

A folder is rebuilt when its ``.bench_complete.json`` marker is missing or stale.

Configurations (each in its own subprocess, so its peak memory is its own; by default all of
them on CUDA and the float32 ones elsewhere, since torch's float16 convolutions on the CPU are
orders of magnitude slower):

- ``captioner-fp32``: the preset as shipped (captioner on), float32;
- ``no-captioner-fp32``: ``extractor.sd.captioner=""`` (the empty prompt), float32;
- ``captioner-fp16``: the captioner on, ``extractor.sd.dtype`` and ``extractor.dino.dtype``
  float16 (the captioner's CLIP tower runs in float32 whatever the dtype).

Per configuration: the models are loaded (timed), one untimed warm-up pair runs, then
``--pairs`` timed ``Pipeline.match(source, target, points)`` calls, each on a new pair of
synthetic images (``smooth_texture``; source 640 x 480, target 375 x 500, so both resize rules
pad) with ``--points`` keypoints, and no feature store (``store=None``: every call extracts
both images with both extractors). Wrappers around the pipeline's own calls split each pair's
time into stages at no extra cost (on CUDA each stage boundary synchronises): ``sd`` (the SD
extractor on both images) with its parts ``sd.vae_encode``, ``sd.captioner`` (CLIP tower +
projections) and ``sd.unet`` (the noised UNet passes), ``dino``, ``fuse`` (the pair PCA and
fusion), ``match`` (the nearest-neighbour matcher) and ``other``. Reported: seconds per pair,
the stage table, load and warm-up time, peak RSS of the timed part (Linux ``VmHWM`` after a
reset), CPU utilisation, on CUDA ``torch.cuda.max_memory_allocated`` (reset after the warm-up;
the warm-up's peak is kept too), the descriptor shapes and whether they are finite, and the
ratios: captioner-fp32 / no-captioner-fp32 (the captioner's cost) and captioner-fp32 /
captioner-fp16.

``--small`` shrinks the inputs for a CPU smoke run (SD 512 x 512 on 256 px tiles, DINOv2
224 x 224, PCA to 64 channels since a pair then has only 128 cells of the 1/64 layer); the
models stay full size.

    python benchmarks/bench_sd_dino.py --small --pairs 1                     # CPU smoke, ~3 min
    python benchmarks/bench_sd_dino.py --pairs 1 --only captioner-fp32       # CPU, ~4.5 min
    python benchmarks/bench_sd_dino.py --device cuda --pairs 10 --json benchmarks/out/sd_dino_cuda.json
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
    EXAMPLES,
    OUT,
    ROOT,
    cpu_seconds,
    cuda_peaks,
    device_sync,
    fmt,
    fresh_folder,
    machine_info,
    marker_complete,
    marker_facts,
    maxrss_mib,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    write_json,
    write_marker,
)
from _models import SD15_DIR, VIT_DIR, build_vit, sd15_is_complete, vit_is_complete

PRESET = EXAMPLES / "sd-dino.toml"
DEFAULT_MODEL_DIR = OUT / "sd-dino-random"
DEFAULT_DINO_DIR = VIT_DIR / "dinov2-b14"
#: Bump when the built files change, so old folders are rebuilt.
RECIPE_VERSION = 1
CLIP_ARCH = "ViT-L-14-336-quickgelu"  # as the preset: the OpenAI weights use QuickGELU
CLIP_FILE = "clip-vit-l-14-336.safetensors"
CAPTIONER_FILE = "odise_captioner.safetensors"
#: SD 1.5's text-encoder width and UNet time-embedding width (320 * 4).
SD15_PROMPT_WIDTH = 768
SD15_TIME_DIM = 1280
SOURCE_SIZE = (640, 480)
TARGET_SIZE = (375, 500)

#: Per configuration: whether the captioner runs, and the dtype of the SD and DINO models.
CONFIGS: dict[str, dict[str, Any]] = {
    "captioner-fp32": {"captioner": True, "dtype": "float32"},
    "no-captioner-fp32": {"captioner": False, "dtype": "float32"},
    "captioner-fp16": {"captioner": True, "dtype": "float16"},
}
#: ``--small``: SD 512 x 512 on four 256 px tiles, DINOv2 224 x 224 (16 x 16 tokens), PCA to
#: 64 channels (the 1/64 layer has 8 x 8 cells per image, 128 per pair: fewer than 256).
SMALL_OVERRIDES = [
    "extractor.sd.image_size=[512, 512]",
    "extractor.sd.tile_size=[256, 256]",
    "extractor.sd.tile_stride=[256, 256]",
    "extractor.dino.image_size=[224, 224]",
    "aggregator.pca_dim=64",
]
STAGE_ORDER = [
    "sd",
    "sd.vae_encode",
    "sd.captioner",
    "sd.unet",
    "sd.other",
    "dino",
    "fuse",
    "match",
    "other",
]

# -- the models ------------------------------------------------------------------------------


def build_clip_and_captioner(folder: Path, seed: int = 0) -> float:
    """Write a random ``ViT-L-14-336`` CLIP (float16 safetensors) and random captioner weights
    into ``folder``; return the seconds it took."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from diffeat.testing.sd import build_tiny_captioner

    start = time.perf_counter()
    fresh_folder(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.create_model(CLIP_ARCH, pretrained=None)
    params = sum(p.numel() for p in clip.parameters())
    visual = sum(p.numel() for p in clip.visual.parameters())
    state = {k: v.detach().half().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(folder / CLIP_FILE))
    embed_dim = int(open_clip.get_model_config(CLIP_ARCH)["embed_dim"])
    del clip, state
    gc.collect()
    build_tiny_captioner(
        folder / CAPTIONER_FILE,
        clip_dim=embed_dim,
        prompt_width=SD15_PROMPT_WIDTH,
        time_dim=SD15_TIME_DIM,
        seed=seed,
    )
    seconds = time.perf_counter() - start
    write_marker(
        folder,
        RECIPE_VERSION,
        seed=seed,
        clip=CLIP_ARCH,
        clip_parameters=params,
        clip_visual_parameters=visual,
        clip_embed_dim=embed_dim,
        build_s=seconds,
    )
    return seconds


def ensure_models(args: argparse.Namespace) -> dict[str, Any]:
    """Build what is missing; return the model paths and the build seconds of each."""
    built: dict[str, float] = {}
    if not sd15_is_complete(args.sd_dir):
        print(f"model: building SD 1.5 (random weights) into {args.sd_dir} ...", flush=True)
        bench_dift = ROOT / "bench_dift.py"
        cmd = [sys.executable, str(bench_dift), "--model-dir", str(args.sd_dir), "--build-only"]
        subprocess.run(cmd, check=True)  # its own process: the parent stays small
        built["sd15"] = marker_facts(args.sd_dir)["build_s"]
    if not vit_is_complete(args.dino_dir):
        print(f"model: building DINOv2 ViT-B/14 (random weights) into {args.dino_dir} ...")
        build_vit("dinov2-b14", args.dino_dir)
        built["dinov2"] = marker_facts(args.dino_dir)["build_s"]
    if not marker_complete(args.model_dir, RECIPE_VERSION):
        print(f"model: building {CLIP_ARCH} + captioner (random) into {args.model_dir} ...")
        built["clip_captioner"] = build_clip_and_captioner(args.model_dir)
    gc.collect()
    for name, seconds in built.items():
        print(f"model: {name} built in {seconds:.0f} s", flush=True)
    return {
        "sd": str(args.sd_dir),
        "dino": str(args.dino_dir),
        "captioner": str(args.model_dir / CAPTIONER_FILE),
        "captioner_clip": CLIP_ARCH,
        "captioner_clip_pretrained": str(args.model_dir / CLIP_FILE),
        "build_s": built,
    }


# -- one configuration (runs in a subprocess) ------------------------------------------------


def config_overrides(name: str, models: dict[str, Any], device: str, small: bool) -> list[str]:
    """``--set``-style overrides of the preset for configuration ``name``."""
    cfg = CONFIGS[name]

    def q(value: str) -> str:
        return json.dumps(value)  # a TOML basic string

    captioner = models["captioner"] if cfg["captioner"] else ""
    overrides = [
        f"extractor.sd.model={q(models['sd'])}",
        f"extractor.sd.captioner={q(captioner)}",
        f"extractor.sd.captioner_clip={q(models['captioner_clip'])}",
        f"extractor.sd.captioner_clip_pretrained={q(models['captioner_clip_pretrained'])}",
        f"extractor.sd.dtype={q(cfg['dtype'])}",
        f"extractor.sd.device={q(device)}",
        f"extractor.dino.model={q(models['dino'])}",
        f"extractor.dino.dtype={q(cfg['dtype'])}",
        f"extractor.dino.device={q(device)}",
    ]
    return overrides + (SMALL_OVERRIDES if small else [])


def bench_pairs(n: int) -> list[tuple[Any, Any]]:
    """``n`` deterministic image pairs (index 0 is the warm-up pair), all images distinct."""
    from diffeat.testing import smooth_texture

    return [
        (
            smooth_texture(SOURCE_SIZE, seed=3000 + 2 * i, cells=12),
            smooth_texture(TARGET_SIZE, seed=3001 + 2 * i, cells=12),
        )
        for i in range(n)
    ]


def keypoints(size: tuple[int, int], n: int) -> list[tuple[float, float]]:
    """``n`` source points spread over a grid inside an image of ``size`` ``(w, h)``."""
    w, h = size
    cols = max(1, (n + 1) // 2)
    rows = max(1, -(-n // cols))
    pts = [(w * (c + 0.5) / cols, h * (r + 0.5) / rows) for r in range(rows) for c in range(cols)]
    return [(float(int(x)), float(int(y))) for x, y in pts[:n]]


class Stopwatch:
    """Adds up the seconds spent in wrapped calls, per stage name; synchronises CUDA around
    each call so the time is the device's too."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.last: dict[str, Any] = {}

    def wrap(self, obj: Any, attr: str, stage: str, keep: bool = False) -> None:
        """Replace ``obj.attr`` (a bound method) by a timed instance attribute; with ``keep``
        the last return value is kept in ``self.last[stage]``."""
        original = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            t = time.perf_counter()
            out = original(*args, **kwargs)
            self.sync()
            self.seconds[stage] += time.perf_counter() - t
            if keep:
                self.last[stage] = out
            return out

        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.seconds = defaultdict(float)


def instrument(pipe: Any, watch: Stopwatch) -> None:
    """Time the pipeline's stages by wrapping the calls ``Pipeline.match`` makes."""
    sd, dino = _source(pipe, "sd"), _source(pipe, "dino")
    watch.wrap(sd, "features", "sd")
    watch.wrap(dino, "features", "dino")
    ext = sd.extractor
    watch.wrap(ext, "encode", "sd.vae_encode")
    watch.wrap(ext.recipe, "run", "sd.unet")
    if ext.captioner is not None:
        watch.wrap(ext.captioner, "condition", "sd.captioner")
    watch.wrap(pipe.aggregator, "fuse_pair", "fuse", keep=True)
    watch.wrap(pipe.matcher, "match", "match")


def _source(pipe: Any, name: str) -> Any:
    for src in pipe.sources:
        if src.name == name:
            return src
    raise KeyError(f"the preset has no extractor named {name!r}")


def load_models(pipe: Any) -> float:
    """Load every model of the pipeline now (outside the timed part); return the seconds."""
    start = time.perf_counter()
    ext = _source(pipe, "sd").extractor
    _ = ext.parts, ext.module_names, ext.captioner
    _ = _source(pipe, "dino").extractor.model
    _ = pipe.aggregator, pipe.matcher
    return time.perf_counter() - start


def stage_table(seconds: dict[str, float], pairs: int, total: float) -> dict[str, float]:
    """Seconds per pair by stage, with the unaccounted rests ``sd.other`` and ``other``."""
    per = {k: v / pairs for k, v in seconds.items()}
    sd_parts = sum(per.get(k, 0.0) for k in ("sd.vae_encode", "sd.captioner", "sd.unet"))
    per["sd.other"] = per.get("sd", 0.0) - sd_parts
    top = sum(per.get(k, 0.0) for k in ("sd", "dino", "fuse", "match"))
    per["other"] = total / pairs - top
    return {k: per[k] for k in STAGE_ORDER if k in per}


def descriptor_info(fused: Any) -> dict[str, Any]:
    """Shapes and finiteness of the last pair's fused descriptors."""
    import torch

    (src_desc, _), (tgt_desc, _) = fused
    return {
        "source_shape": list(src_desc.shape),
        "target_shape": list(tgt_desc.shape),
        "finite": bool(torch.isfinite(src_desc).all() and torch.isfinite(tgt_desc).all()),
    }


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up and time one configuration; the result as a JSON-able dict."""
    import torch

    from diffeat.core.pipeline import Pipeline
    from diffeat.plugins.modelfiles import quiet_transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    name = args.config
    models = json.loads(args.models)
    overrides = config_overrides(name, models, args.device, args.small)
    pipe = Pipeline.from_file(PRESET, overrides=overrides, store=None)
    ext = _source(pipe, "sd").extractor
    cuda = ext.device.type == "cuda"
    sync = device_sync(cuda)

    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    load_s = load_models(pipe)
    gc.collect()
    rss_loaded = rss_mib()
    log(f"models loaded in {load_s:.1f} s, RSS {rss_loaded or 0:.0f} MiB")
    watch = Stopwatch(sync)
    instrument(pipe, watch)
    pairs = bench_pairs(args.pairs + 1)
    points = keypoints(SOURCE_SIZE, args.points)

    sync()
    t = time.perf_counter()
    pipe.match(*pairs[0], points)
    sync()
    warmup_s = time.perf_counter() - t
    log(f"warm-up pair: {warmup_s:.2f} s")
    warmup_stages = dict(watch.seconds)
    watch.reset()
    cuda_warm = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    gc.collect()
    peak_ok = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    per_pair: list[float] = []
    finite_points = True
    cpu0 = cpu_seconds()
    for i, (src, tgt) in enumerate(pairs[1:]):
        sync()
        t = time.perf_counter()
        res = pipe.match(src, tgt, points)
        sync()
        per_pair.append(time.perf_counter() - t)
        finite_points = finite_points and bool(torch.isfinite(res.points).all())
        log(f"pair {i + 1}/{args.pairs}: {per_pair[-1]:.3f} s")
    total = sum(per_pair)
    sd_layers = [i.to_dict() for i in _source(pipe, "sd").layers()]
    result: dict[str, Any] = {
        "config": name,
        **CONFIGS[name],
        "overrides": overrides,
        "device": str(ext.device),
        "torch_threads": torch.get_num_threads(),
        "pairs": len(per_pair),
        "points": len(points),
        "seconds_per_pair": total / len(per_pair),
        "seconds_per_pair_each": per_pair,
        "pairs_per_s": len(per_pair) / total,
        "stages_s_per_pair": stage_table(watch.seconds, len(per_pair), total),
        "warmup_s": warmup_s,
        "warmup_stages_s": warmup_stages,
        "load_s": load_s,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_timed_mib": peak_rss_mib() if peak_ok else None,
        "peak_rss_process_mib": maxrss_mib(),
        "cpu_busy": (cpu_seconds() - cpu0) / total,
        "sd_layers": sd_layers,
        "sd_tiles": len(ext.tile_origins()),
        "descriptors": descriptor_info(watch.last["fuse"]),
        "matched_points_finite": finite_points,
    }
    if cuda:
        result.update(cuda_peaks(ext.device), cuda_max_allocated_warmup_mib=cuda_warm)
    return result


# -- the driver ------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_configs(device: str) -> list[str]:
    """Every configuration on CUDA; on other devices the float32 ones."""
    if device.startswith("cuda"):
        return list(CONFIGS)
    return [n for n, c in CONFIGS.items() if c["dtype"] == "float32"]


def child_command(
    args: argparse.Namespace, name: str, models: dict[str, Any], out: Path
) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--config",
        name,
        "--models",
        json.dumps({k: v for k, v in models.items() if k != "build_s"}),
        "--result-file",
        str(out),
        "--device",
        args.device,
        "--pairs",
        str(args.pairs),
        "--points",
        str(args.points),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + (["--small"] if args.small else [])


def summary_of(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ratios between configurations that ran."""
    out: dict[str, Any] = {}
    a, b, c = (results.get(n) for n in CONFIGS)
    if a and b:
        out["captioner_cost_ratio"] = a["seconds_per_pair"] / b["seconds_per_pair"]
        cap = a["stages_s_per_pair"].get("sd.captioner", 0.0)
        out["captioner_share_of_pair"] = cap / a["seconds_per_pair"]
    if a and c:
        out["fp32_over_fp16"] = a["seconds_per_pair"] / c["seconds_per_pair"]
    return out


def print_report(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    cuda = any("cuda_max_allocated_mib" in r for r in results.values())
    prec = 3 if cuda else 2
    head = (
        f"{'config':<19}{'pairs':>6}{'s/pair':>9}{'pairs/s':>9}{'load s':>8}{'warm-up s':>10}"
        f"{'peak RSS':>11}{'CPU busy':>9}{'finite':>7}"
    )
    print(head + (f"{'CUDA peak':>11}{'warm-up':>10}" if cuda else ""))
    for name, r in results.items():
        line = (
            f"{name:<19}{r['pairs']:>6}{r['seconds_per_pair']:>9.{prec}f}{r['pairs_per_s']:>9.3f}"
            f"{r['load_s']:>8.1f}{r['warmup_s']:>10.1f}"
            f"{fmt(r['peak_rss_timed_mib'], '.0f'):>7} MiB{r['cpu_busy']:>9.2f}"
            f"{'yes' if r['descriptors']['finite'] and r['matched_points_finite'] else 'NO':>7}"
        )
        if cuda:
            line += (
                f"{fmt(r.get('cuda_max_allocated_mib'), '.0f'):>7} MiB"
                f"{fmt(r.get('cuda_max_allocated_warmup_mib'), '.0f'):>6} MiB"
            )
        print(line)
    print(
        "  peak RSS: high-water mark while the timed pairs ran (weights included); CUDA peak: "
        "max_memory_allocated\n  while timed (warm-up: the load + warm-up pair); finite: "
        "descriptors and matched points"
    )
    print("\nseconds per pair by stage:")
    print(f"{'stage':<15}" + "".join(f"{n:>19}" for n in results))
    for key in STAGE_ORDER:
        vals = [r["stages_s_per_pair"].get(key) for r in results.values()]
        if any(v is not None and abs(v) > 1e-5 for v in vals):
            print(f"{key:<15}" + "".join(f"{fmt(v, f'.{prec + 1}f'):>19}" for v in vals))
    first = next(iter(results.values()))
    d = first["descriptors"]
    print(
        f"\nSD tiles per image {first['sd_tiles']}; SD layers "
        + ", ".join(
            f"{i['name']} ({i['channels']} ch, /{i['stride']:g})" for i in first["sd_layers"]
        )
        + f"; fused descriptors: source {d['source_shape']}, target {d['target_shape']}"
    )
    if "captioner_cost_ratio" in summary:
        print(
            f"captioner cost: captioner-fp32 / no-captioner-fp32 = "
            f"{summary['captioner_cost_ratio']:.3f}x; the captioner stage is "
            f"{100 * summary['captioner_share_of_pair']:.1f}% of a captioner-fp32 pair"
        )
    if "fp32_over_fp16" in summary:
        print(f"fp16 speed-up: captioner-fp32 / captioner-fp16 = {summary['fp32_over_fp16']:.3f}x")


def drive(args: argparse.Namespace) -> None:
    wall_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.device = resolve_device(args.device)
    info = machine_info()
    print(
        f"machine: {info['platform']}; {info['cpu']}; cpu_count {info['cpu_count']}; "
        f"torch {info['torch']}{'; ' + info['cuda'] if info['cuda'] else ''}; device {args.device}",
        flush=True,
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    args.only = args.only or default_configs(args.device)
    if not args.device.startswith("cuda") and any(
        CONFIGS[n]["dtype"] == "float16" for n in args.only
    ):
        print(
            "note: float16 on the CPU is very slow (torch's half convolutions: the VAE encoder "
            "of one 256 px tile takes minutes)",
            flush=True,
        )
    models = ensure_models(args)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_sd_dino_") as tmp:
        for name in args.only:
            out = Path(tmp) / f"{name}.json"
            print(
                f"\nrunning {name}{' (--small)' if args.small else ''}: "
                f"{args.pairs} timed pair(s) after 1 warm-up ...",
                flush=True,
            )
            subprocess.run(child_command(args, name, models, out), check=True)
            results[name] = json.loads(out.read_text())
    summary = summary_of(results)
    wall = time.perf_counter() - wall_start
    print()
    print_report(results, summary)
    print(f"\nwall time of the whole run: {wall:.0f} s")
    if args.json:
        data = {
            "command": sys.argv,
            "machine": info,
            "preset": str(PRESET),
            "small": args.small,
            "models": models,
            "source_size": SOURCE_SIZE,
            "target_size": TARGET_SIZE,
            "wall_s": wall,
            "results": results,
            **summary,
        }
        write_json(args.json, data)
        print(f"results written to {args.json}")


def parse_only(text: str) -> list[str]:
    names = [n for n in text.replace(",", " ").split() if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--pairs", type=int, default=3, help="timed pairs per config (default: 3)")
    p.add_argument("--points", type=int, default=10, help="keypoints per pair (default: 10)")
    p.add_argument(
        "--only",
        type=parse_only,
        default=None,
        help="comma-separated configs to run: " + ", ".join(CONFIGS) + " (default: all on "
        "CUDA, the float32 ones on CPU, where torch's float16 convolutions are far too slow)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="smoke run: SD 512 px on 256 px tiles, DINOv2 224 px, pca_dim 64 (models stay "
        "full size)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="random CLIP ViT-L-14-336 + captioner weights (default: %(default)s)",
    )
    p.add_argument(
        "--sd-dir",
        type=Path,
        default=SD15_DIR,
        help="random SD 1.5, shared with bench_dift.py (default: %(default)s)",
    )
    p.add_argument(
        "--dino-dir",
        type=Path,
        default=DEFAULT_DINO_DIR,
        help="random DINOv2-B/14, shared with bench_baselines.py (default: %(default)s)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    # internal: one configuration in this process
    p.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    if args.points < 1:
        p.error("--points must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.config:
        result = run_config(args)
        args.result_file.write_text(json.dumps(result, indent=2) + "\n")
    else:
        drive(args)


if __name__ == "__main__":
    main()
