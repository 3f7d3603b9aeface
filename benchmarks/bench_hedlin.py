"""Seconds per source point and per target of the cross-attention matcher (Hedlin et al.),
batched against one-at-a-time, on SD 1.5-size random weights (or the tiny test model).

The official code runs one point, one restart, one crop per UNet call. ``max_batch = 1``
runs the matcher exactly so: every optimisation step and every inference crop of each
(point, restart) is its own UNet call (``tests/test_cross_attention.py`` checks that the
matcher's arithmetic equals a written-out copy of the official loops, and that batching
changes no result). ``max_batch = B`` puts up to B independent (point, restart) jobs in one
UNet call. Both runs use the same seed and must give identical points (the losses agree to
float32 rounding: a batched convolution sums in another order); the script checks that and reports the speed-up, the split between the optimisation (per source point) and
the inference on the target, and the peak memory (RSS on the CPU, ``max_memory_allocated``
on CUDA).

The official recipe is 129 steps x 5 restarts and 20 crops at 512 px per point: hours per
pair on a CPU. ``--steps``, ``--restarts``, ``--crops`` and ``--size`` shrink it (the ratio of
batched to one-at-a-time per UNet call does not depend on the number of steps); the JSON
records what ran.

    python benchmarks/bench_hedlin.py --small                 # CPU: SD 1.5 size, 128 px, few steps
    python benchmarks/bench_hedlin.py --device cuda --points 4 --json benchmarks/out/hedlin_cuda.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _common import (
    OUT,
    cpu_seconds,
    cuda_peaks,
    fmt,
    machine_info,
    peak_rss_mib,
    reset_peak_rss,
    write_json,
)


def _model(args: argparse.Namespace) -> Path:
    from _models import hedlin_model

    return hedlin_model(args.model, args.sd_dir)


def _run(folder: Path, args: argparse.Namespace, max_batch: int) -> dict[str, Any]:
    import torch

    from diffeat.core.images import as_input
    from diffeat.plugins.cross_attention.matcher import CrossAttentionMatcher
    from diffeat.plugins.cross_attention.options import CrossAttentionOptions
    from diffeat.testing import smooth_texture

    options = CrossAttentionOptions(
        model=str(folder),
        size=args.size,
        steps=args.steps,
        restarts=args.restarts,
        crops=args.crops,
        max_batch=max_batch,
        device=args.device,
    )
    matcher = CrossAttentionMatcher(options)
    start = time.perf_counter()
    _ = matcher.layers  # load the model
    load_s = time.perf_counter() - start
    cuda = matcher.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases = {"optimise": 0.0, "attend": 0.0}
    cpu_phases = {"optimise": 0.0, "attend": 0.0}
    for name in phases:
        inner = getattr(matcher, name)

        def timed(*a: Any, _inner: Any = inner, _name: str = name, **k: Any) -> Any:
            sync()
            t0, c0 = time.perf_counter(), cpu_seconds()
            out = _inner(*a, **k)
            sync()
            phases[_name] += time.perf_counter() - t0
            cpu_phases[_name] += cpu_seconds() - c0
            return out

        setattr(matcher, name, timed)
    from diffeat.core.components import View
    from diffeat.core.geometry import ImageTransform

    def view(size: tuple[int, int], seed: int) -> View:
        inp = as_input(smooth_texture(size, seed=seed))
        return View(inp.image, ImageTransform.resize(inp.size, inp.size))

    src, tgt = view((640, 480), 1), view((375, 500), 2)
    points = torch.tensor([[40.0 + 97 * i % 560, 30.0 + 61 * i % 420] for i in range(args.points)])
    if cuda:
        torch.cuda.reset_peak_memory_stats(matcher.device)
    reset_peak_rss()
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = matcher.match(src, tgt, points)
    sync()
    total, cpu_total = time.perf_counter() - t0, cpu_seconds() - c0
    return {
        "max_batch": max_batch,
        "load_s": load_s,
        "seconds": total,
        "cpu_seconds": cpu_total,
        "optimise_cpu_s_per_point": cpu_phases["optimise"] / args.points,
        "attend_cpu_s_per_point": cpu_phases["attend"] / args.points,
        "optimise_s_per_point": phases["optimise"] / args.points,
        "attend_s_per_point": phases["attend"] / args.points,
        "points": result.points.tolist(),
        "losses_last": result.extras["losses"][..., -1].tolist() if args.steps else [],
        "peak_rss_mib": peak_rss_mib(),
        **({"cuda": cuda_peaks(matcher.device)} if cuda else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--sd-dir", default=str(OUT / "sd15-random"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=129)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--crops", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=0, help="0: points x restarts")
    parser.add_argument(
        "--small", action="store_true", help="CPU run: 128 px, 3 steps, 2 restarts, 5 crops"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); with 1, CPU seconds measure the work "
        "even while other jobs share the cores",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.small:
        args.size, args.steps, args.restarts, args.crops = 128, 3, 2, 5
    batch = args.max_batch or args.points * args.restarts
    folder = _model(args)
    one = _run(folder, args, 1)
    batched = _run(folder, args, batch)
    same = one["points"] == batched["points"]
    import numpy as np

    loss_diff = float(
        np.max(np.abs(np.subtract(one["losses_last"], batched["losses_last"])), initial=0.0)
    )
    report = {
        "machine": machine_info(),
        "model": args.model,
        "recipe": {
            k: getattr(args, k) for k in ("size", "steps", "restarts", "crops", "points", "device")
        },
        "one_at_a_time": one,
        "batched": batched,
        "identical_points": same,
        "max_final_loss_difference": loss_diff,
        "speedup": one["seconds"] / batched["seconds"],
        "speedup_cpu_seconds": one["cpu_seconds"] / batched["cpu_seconds"],
        "threads": args.threads or None,
    }
    for name, run in (("one at a time", one), (f"max_batch {batch}", batched)):
        print(
            f"{name:>14}: {fmt(run['seconds'], '.2f')} s  optimise {fmt(run['optimise_s_per_point'], '.2f')}"
            f" s/point  attend {fmt(run['attend_s_per_point'], '.2f')} s/point"
            f"  peak RSS {fmt(run['peak_rss_mib'], '.0f')} MiB  CPU {fmt(run['cpu_seconds'], '.2f')} s"
        )
    print(
        f"speed-up {report['speedup']:.2f}x wall, {report['speedup_cpu_seconds']:.2f}x CPU "
        f"seconds, identical points: {same}, "
        f"final losses differ by at most {loss_diff:.2e} (batched convolutions round differently)"
    )
    if args.json:
        write_json(Path(args.json), report)


if __name__ == "__main__":
    main()
