"""What the result-changing speed-ups of the cross-attention matcher (Hedlin et al.) cost and
change: fewer restarts, fewer inference crops, a bfloat16 (or float16) UNet/VAE and a bank of
pre-encoded crops, against the official recipe, on the offline synthetic benchmark.

A small SPair-layout benchmark is made with ``diffeat datasets make-synthetic``'s code from
synthetic textures (known transforms, so the ground truth is exact). Every variant runs the
``hedlin`` evaluation protocol on the same pairs with the same seed; the script reports per
variant the wall seconds per source point (and its split: optimisation, inference), the VAE
encodes and UNet calls per point, the PCK@0.05 / @0.1 on the synthetic set, and the agreement
with the official recipe's predictions: the mean and median distance (in the protocol's 512 x
512 squashed frame) of each variant's points to the official points, the share of points
that are the same, and the Pearson correlation of each point's attention map (the layers' mean
softmax map, whose argmax is the match) with the official one, averaged over the points: a
graded measure where the argmax of a nearly flat map jumps.

On the tiny random-weight model (the default, which runs on a CPU) the matcher cannot find
correspondences: its PCK is near chance, and the agreement figures say only how much a variant
perturbs the official result, not how accurate it is on real images. ``--model sd15`` builds SD
1.5 with random weights at the real size (timings of the real architecture on a GPU), and
``--model DIR`` takes a local diffusers folder with real weights (SD 1.4 is the paper's) for a
run whose PCK and agreement mean something.

    python benchmarks/bench_hedlin_variants.py                       # tiny model, CPU, ~3 min
    python benchmarks/bench_hedlin_variants.py --model sd15 --device cuda --pairs 4 --points 2 \\
        --json benchmarks/out/hedlin_variants_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from _common import EXAMPLES, OUT, cpu_seconds, fmt, machine_info, write_json

#: name -> matcher options changed from the official recipe (``{bank}`` is ``--bank``)
VARIANTS: dict[str, dict[str, Any]] = {
    "official": {},
    "restarts-2": {"restarts": 2},
    "restarts-1": {"restarts": 1},
    "crops-8": {"crops": 8},
    "crops-4": {"crops": 4},
    "bfloat16": {"dtype": "bfloat16"},
    "float16": {"dtype": "float16"},
    "crop-bank": {"crop_bank": "{bank}"},
    "combined": {"restarts": 2, "crops": 8, "dtype": "bfloat16", "crop_bank": "{bank}"},
}
#: run by default (float16 only on CUDA: CPU float16 kernels are slow or missing)
DEFAULT_CPU = [
    "official",
    "restarts-2",
    "restarts-1",
    "crops-8",
    "crops-4",
    "bfloat16",
    "crop-bank",
]


def _model(args: argparse.Namespace) -> Path:
    from _models import hedlin_model

    return hedlin_model(args.model, args.sd_dir)


def _benchmark(folder: Path, pairs: int, points: int, seed: int) -> Path:
    """A synthetic SPair-layout benchmark in ``folder`` (made once; reused when present)."""
    from diffeat.plugins.datasets.synthetic import make_synthetic
    from diffeat.testing import smooth_texture

    bench = folder / "bench"
    if (bench / "PairAnnotation").exists():
        return bench
    photos = folder / "photos" / "texture"
    photos.mkdir(parents=True, exist_ok=True)
    for i in range(max(2, pairs // 2)):
        smooth_texture((160, 120), seed=seed + i, cells=8).save(photos / f"t{i}.png")
    make_synthetic(
        bench, [folder / "photos"], pairs=pairs, points=points, seed=seed,
        kinds=["homography", "flip"], ext="png",
    )  # fmt: skip
    return bench


def _options(name: str, args: argparse.Namespace, model: Path) -> dict[str, Any]:
    changed = {
        k: (args.bank if v == "{bank}" else v) for k, v in VARIANTS[name].items()
    }  # fmt: skip
    return {
        "plugin": "cross-attention",
        "model": str(model),
        "size": args.size,
        "steps": args.steps,
        "device": args.device,
        "max_batch": args.max_batch or args.points * VARIANTS[name].get("restarts", 5),
        "progress": False,
        "return_maps": True,
        **changed,
    }


def _run(name: str, args: argparse.Namespace, model: Path, bench: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from diffeat.core.config import load_config
    from diffeat.core.pipeline import Pipeline
    from diffeat.eval.protocols import get_protocol
    from diffeat.eval.runner import evaluate
    from diffeat.plugins.datasets.spair import SPairOptions
    from diffeat.plugins.datasets.synthetic import Synthetic

    matcher_options = _options(name, args, model)
    preset = load_config(EXAMPLES / "hedlin-sd14.toml").resolved()["matcher"]
    pipe = Pipeline.from_dict({"matcher": {**preset, **matcher_options}})
    matcher = pipe.matcher
    t0 = time.perf_counter()
    _ = matcher.layers  # load the model outside the timing
    load_s = time.perf_counter() - t0
    cuda = matcher.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases = {"optimise": 0.0, "attend": 0.0}
    for phase in phases:
        inner = getattr(matcher, phase)

        def timed(*a: Any, _inner: Any = inner, _phase: str = phase, **k: Any) -> Any:
            sync()
            start = time.perf_counter()
            out = _inner(*a, **k)
            sync()
            phases[_phase] += time.perf_counter() - start
            return out

        setattr(matcher, phase, timed)
    maps: list[Any] = []  # each point's attention map (mean over layers of the softmax maps)
    inner_match = matcher.match

    def match(*a: Any, **k: Any) -> Any:
        result = inner_match(*a, **k)
        maps.extend(result.extras["attention"].mean(dim=1).numpy())
        return result

    matcher.match = match
    encoded: list[int] = []
    matcher.parts.vae.encoder.register_forward_hook(lambda m, a, o: encoded.append(len(a[0])))
    dataset = Synthetic(SPairOptions(root=str(bench)))
    start, cpu0 = time.perf_counter(), cpu_seconds()
    ev = evaluate(pipe, dataset, dataset_name="synthetic", protocol=get_protocol("hedlin"))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    n_points = sum(len(o.predicted) for o in ev.outcomes)
    o = matcher.options
    return {
        "options": {
            k: v
            for k, v in matcher_options.items()
            if k not in ("plugin", "model", "progress", "return_maps")
        },
        "load_s": load_s,
        "seconds": seconds,
        "points": n_points,
        "s_per_point": seconds / n_points,
        "cpu_s_per_point": cpu / n_points,
        "optimise_s_per_point": phases["optimise"] / n_points,
        "attend_s_per_point": phases["attend"] / n_points,
        "vae_encodes_per_point": sum(encoded) / n_points,
        "unet_passes_per_point": o.restarts * (o.steps + o.crops),  # batch rows
        "pck": {str(a): ev.headline(alpha=a) for a in (0.05, 0.1)},
        "predicted": [np.asarray(out.predicted).tolist() for out in ev.outcomes],
        "maps": maps,
        "target_sizes": [list(out.pair.target_size) for out in ev.outcomes],
    }


def _flops(size: int) -> dict[str, float]:
    """FLOPs (``FlopCounterMode``, on the meta device: nothing is allocated or run) of the
    matcher's three kinds of work on SD 1.5's architecture at ``size`` px: one VAE encode, one
    optimisation step's UNet pass (forward to the last read layer, backward to the context)
    and one inference crop's UNet pass (forward to the last read layer)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from diffeat.plugins.cross_attention.attention import (
        TokenAttention,
        resolve_layers,
        select_heads,
    )
    from diffeat.plugins.cross_attention.options import HEDLIN_LAYERS

    from _models import sd15_unet_config, sd_vae_config

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**sd15_unet_config())
        vae = AutoencoderKL(**sd_vae_config())
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    vae.decoder = None

    def count(fn: Any) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    probe = TokenAttention(unet, resolve_layers(unet, HEDLIN_LAYERS), 1)
    latents = torch.zeros((1, 4, size // 8, size // 8), device=meta)
    context = torch.zeros((1, 77, 768), device=meta, requires_grad=True)

    def step() -> None:
        maps = probe(latents, torch.tensor(140, device=meta), context)
        sum(select_heads(m, "upper-half").square().mean() for m in maps).backward()

    pixels = torch.zeros((1, 3, size, size), device=meta)
    vae_flops = count(lambda: vae.encode(pixels).latent_dist.mean)
    step_flops = count(step)
    with torch.no_grad():
        crop_flops = count(lambda: probe(latents, torch.tensor(40, device=meta), context))
    return {"vae_encode": vae_flops, "optimise_step": step_flops, "inference_crop": crop_flops}


def _flops_per_point(flops: dict[str, float], name: str, bank: int) -> dict[str, float]:
    """FLOPs per source point of a variant at the official 129 steps: the optimisation encodes
    one crop a step and restart (or ``bank`` crops), the inference at most one per crop and
    restart (the 4 corner crops are shared by a target's points and restarts: counted once)."""
    o = {"restarts": 5, "crops": 20, "crop_bank": 0, **VARIANTS[name]}
    r, crops = o["restarts"], o["crops"]
    n_bank = bank if o["crop_bank"] else 0
    encodes = n_bank or r * 129
    optimise = r * 129 * flops["optimise_step"] + encodes * flops["vae_encode"]
    inference = r * crops * flops["inference_crop"] + (4 + r * (crops - 4)) * flops["vae_encode"]
    return {"optimise": optimise, "inference": inference, "encodes": encodes}


def _print_flops(flops: dict[str, float], size: int, bank: int) -> dict[str, Any]:
    print(
        f"SD 1.5 at {size} px, counted on the meta device: VAE encode "
        f"{flops['vae_encode'] / 1e9:.0f} GFLOP, optimisation step "
        f"{flops['optimise_step'] / 1e9:.0f} GFLOP, inference crop "
        f"{flops['inference_crop'] / 1e9:.0f} GFLOP"
    )
    print("| variant | optimise TFLOP / point | inference TFLOP / point | x official |")
    print("|---|---|---|---|")
    rows = {n: _flops_per_point(flops, n, bank) for n in VARIANTS if n != "float16"}
    total = {n: v["optimise"] + v["inference"] for n, v in rows.items()}
    for name, v in rows.items():
        print(
            f"| {name} | {v['optimise'] / 1e12:.0f} | {v['inference'] / 1e12:.0f} "
            f"| {total['official'] / total[name]:.2f} |"
        )
    return {"per_pass": flops, "per_point": rows}


def _print_runs(runs: dict[str, dict[str, Any]], cpu_ratio: bool) -> None:
    official = runs["official"]
    key = "cpu_s_per_point" if cpu_ratio else "s_per_point"
    head = (
        "| variant | s / point | CPU s / point | optimise | inference | x official "
        "| VAE encodes / point | UNet passes / point | PCK@0.05 | PCK@0.1 "
        "| to official: mean px | median px | same | map r |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, run in runs.items():
        a = run["agreement"]
        print(
            f"| {name} | {run['s_per_point']:.2f} | {run['cpu_s_per_point']:.2f} "
            f"| {run['optimise_s_per_point']:.2f} | {run['attend_s_per_point']:.2f} "
            f"| {official[key] / run[key]:.2f} "
            f"| {run['vae_encodes_per_point']:.0f} | {run['unet_passes_per_point']} "
            f"| {fmt(run['pck']['0.05'], '.3f')} | {fmt(run['pck']['0.1'], '.3f')} "
            f"| {a['mean_px']:.1f} | {a['median_px']:.1f} | {100 * a['same_share']:.0f}% "
            f"| {a['map_correlation']:.3f} |"
        )


def _agreement(run: dict[str, Any], official: dict[str, Any]) -> dict[str, float]:
    """Distances of ``run``'s points to the official points in the 512 x 512 squashed frame."""
    import numpy as np

    dists = []
    for pred, ref, (w, h) in zip(run["predicted"], official["predicted"], run["target_sizes"]):
        scale = np.array([512 / w, 512 / h])
        dists.append(np.linalg.norm((np.asarray(pred) - np.asarray(ref)) * scale, axis=1))
    d = np.concatenate(dists) if dists else np.zeros(0)
    corr = [np.corrcoef(m.ravel(), r.ravel())[0, 1] for m, r in zip(run["maps"], official["maps"])]
    return {
        "mean_px": float(d.mean()),
        "median_px": float(np.median(d)),
        "same_share": float((d < 1e-6).mean()),
        "map_correlation": float(np.mean(corr)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (default), sd15 (random weights) or a diffusers folder",
    )
    parser.add_argument("--sd-dir", default=str(OUT / "sd15-random"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=2, help="synthetic pairs")
    parser.add_argument("--points", type=int, default=2, help="keypoints per pair")
    parser.add_argument("--size", type=int, default=0, help="0: 64 on tiny, else 512")
    parser.add_argument("--steps", type=int, default=0, help="0: 8 on tiny, else 129")
    parser.add_argument("--bank", type=int, default=16, help="crops in the crop-bank variants")
    parser.add_argument(
        "--max-batch", type=int, default=0, help="jobs per UNet call; 0: a pair's points x restarts"
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic benchmark")
    parser.add_argument("--work", default=str(OUT / "hedlin-variants"))
    parser.add_argument(
        "--flops",
        action="store_true",
        help="only count each variant's FLOPs per point on SD 1.5 at 512 px (meta device, ~1 min)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.flops:
        size = args.size or 512
        report = {"flops": _print_flops(_flops(size), size, args.bank), "size": size}
        if args.json:
            write_json(Path(args.json), {"machine": machine_info(), "bank": args.bank, **report})
        return
    tiny = args.model == "tiny"
    args.size = args.size or (64 if tiny else 512)
    args.steps = args.steps or (8 if tiny else 129)
    cuda = args.device.startswith("cuda")
    names = args.variants or (list(VARIANTS) if cuda else DEFAULT_CPU)
    if "official" not in names:
        names = ["official", *names]
    model = _model(args)
    work = Path(args.work) / f"pairs{args.pairs}-points{args.points}-seed{args.seed}"
    bench = _benchmark(work, args.pairs, args.points, args.seed)
    load_before = os.getloadavg()
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        runs[name] = _run(name, args, model, bench)
    load_after = os.getloadavg()
    official = runs["official"]
    for run in runs.values():
        run["agreement"] = _agreement(run, official)
    for run in runs.values():
        del run["maps"]  # not for the JSON
    print(
        f"\n{args.model} model, {args.size} px, {args.steps} steps, {args.device}, "
        f"{official['points']} source points on {args.pairs} synthetic pairs; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; x official: the ratio of "
        f"{'wall' if cuda else 'CPU'} seconds per point"
    )
    _print_runs(runs, cpu_ratio=not cuda)
    if args.json:
        report = {
            "machine": machine_info(),
            "load_average": {"before": load_before, "after": load_after},
            "model": args.model,
            "recipe": {
                k: getattr(args, k)
                for k in ("size", "steps", "bank", "max_batch", "pairs", "points", "device")
            },
            "runs": runs,
        }
        write_json(Path(args.json), json.loads(json.dumps(report, default=float)))


if __name__ == "__main__":
    main()
