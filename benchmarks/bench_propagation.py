"""Frames per second of label propagation at DAVIS size (the step after feature extraction).

The propagation of DIFT's DAVIS protocol (``diffeat.eval.labelprop``) on feature maps of
the real shape: SD 2.1 ``up_blocks.2`` at 832x480 is 640 channels on a 104x60 grid; the
context is the first frame plus the last 28 predictions (29 frames once full); top-k 15,
temperature 0.2, window radius 15; a few objects' soft masks. Features are random (smooth
fields): the arithmetic and its cost do not depend on the values. It times ``Propagator.step``
(affinities, top-k, labels) plus the upsampling / min-max / argmax / resize to 854x480
(``labels_to_ids``), per frame with a full context, and the official dense computation
(``dense_reference``: a ``[29*hw, hw]`` affinity) for comparison where memory allows.

    python benchmarks/bench_propagation.py                      # CPU, reduced: 2 timed frames
    python benchmarks/bench_propagation.py --device cuda --frames 20 --json out.json
    python benchmarks/bench_propagation.py --channels 64 --frames 3   # a smaller CPU check
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import cpu_seconds, device_sync, machine_info, write_json


def smooth(c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    low = torch.randn(1, c, max(1, h // 6), max(1, w // 6), generator=gen)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    return x + 0.1 * torch.randn(c, h, w, generator=gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels", type=int, default=640)
    ap.add_argument("--grid", type=int, nargs=2, default=[104, 60], metavar=("W", "H"))
    ap.add_argument("--frame-size", type=int, nargs=2, default=[854, 480], metavar=("W", "H"))
    ap.add_argument("--objects", type=int, default=3)
    ap.add_argument("--context", type=int, default=28)
    ap.add_argument("--frames", type=int, default=2, help="timed frames (full context)")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--dense", action="store_true", help="also time the dense official form")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from diffeat.eval.labelprop import (
        PropagationSettings,
        Propagator,
        dense_reference,
        labels_to_ids,
        one_hot,
    )

    dev = torch.device(args.device)
    sync = device_sync(dev.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    (gw, gh), c = args.grid, args.channels
    settings = PropagationSettings(context=args.context, block=args.block)
    first_ids = torch.randint(0, args.objects + 1, (gh, gw), generator=gen)
    prop = Propagator(settings)
    prop.start(smooth(c, gh, gw, gen).to(dev), one_hot(first_ids, args.objects + 1).to(dev))
    model_size = (gw * 8, gh * 8)
    # fill the context queue so every timed frame sees the first frame + `context` others
    # (cheap on a GPU; on a CPU the queue is filled with copies, which costs the same per step)
    warm = smooth(c, gh, gw, gen).to(dev)
    soft = prop.step(warm)
    while len(prop.queue) < args.context:
        prop.queue.append(prop.queue[-1])
    feats = [smooth(c, gh, gw, gen).to(dev) for _ in range(args.frames)]
    times, post, cpu = [], [], []
    for f in feats:
        sync()
        t0, c0 = time.perf_counter(), cpu_seconds()
        soft = prop.step(f)
        sync()
        t1 = time.perf_counter()
        cpu.append(cpu_seconds() - c0)
        labels_to_ids(soft, model_size, tuple(args.frame_size))
        sync()
        times.append(t1 - t0)
        post.append(time.perf_counter() - t1)
    step = min(times)
    result = {
        "device": str(dev),
        "channels": c,
        "grid": [gw, gh],
        "context_frames": 1 + len(prop.queue),
        "settings": asdict(settings),
        "seconds_per_frame_step": step,
        "seconds_per_frame_upsample_argmax": min(post),
        "frames_per_second": 1.0 / (step + min(post)),
        "all_step_seconds": times,
        "process_cpu_seconds_per_step": cpu,
        "machine": machine_info(),
    }
    if dev.type == "cuda":
        result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if args.dense:
        items = [prop.first, *list(prop.queue)[-args.context :]]
        ctx_f = torch.stack([a for a, _ in items])
        ctx_l = torch.stack([b for _, b in items])
        tgt = F.normalize(feats[0].reshape(c, -1).T, dim=1)
        try:
            sync()
            t0 = time.perf_counter()
            dense_reference(tgt, ctx_f, ctx_l, settings)
            sync()
            result["dense_seconds_per_frame"] = time.perf_counter() - t0
        except (RuntimeError, MemoryError) as exc:  # out of memory
            result["dense_seconds_per_frame"] = None
            result["dense_error"] = str(exc).splitlines()[0]
    print(
        f"{dev} C={c} grid {gw}x{gh} context {result['context_frames']}: "
        f"step {step:.3f} s + upsample/argmax {min(post):.3f} s per frame "
        f"= {result['frames_per_second']:.3f} frames/s (process CPU {min(cpu):.1f} s per step)"
        + (
            f"; dense official form {result['dense_seconds_per_frame']:.3f} s"
            if result.get("dense_seconds_per_frame")
            else ""
        )
    )
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
