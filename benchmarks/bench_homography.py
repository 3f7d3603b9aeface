"""Seconds per pair of the homography task's own work at HPatches scale (features excluded).

What ``diffeat eval --dataset hpatches`` does per pair besides computing the two descriptor
maps (which the extractor benchmarks measure): sample both maps at 1000 keypoints (DIFT's
half-cell call and the centred one), remove repeated keypoints, mutual nearest neighbours
(cosine and L2), ``cv2.findHomography`` (LMEDS and RANSAC 3 px) and the corner error. The
inputs have DIFT's SD shapes: an 800 x 600 image (a typical HPatches size), a 640-channel
96 x 96 descriptor map (``up_blocks.2`` at 768 x 768), 1000 keypoints per image, of which
``--inliers`` (60 %) correspond through a known homography and carry the same descriptor
plus noise; the rest are random.

    python benchmarks/bench_homography.py                 # CPU, 20 repetitions
    python benchmarks/bench_homography.py --repeat 5 --json benchmarks/out/homography.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _common import machine_info, write_json


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    from diffeat.core.components import View
    from diffeat.core.geometry import ImageTransform
    from diffeat.core.sequences import apply_homography
    from diffeat.eval.homography_metrics import (
        corner_error,
        estimate_homography,
        mutual_nearest,
        sample_descriptors,
        unique_keypoints,
    )

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    size, grid, channels, n = (800, 600), (96, 96), 640, args.keypoints
    truth = np.array([[1.05, 0.04, 20.0], [-0.03, 0.97, -12.0], [2e-5, -3e-5, 1.0]])
    fmap_a = torch.randn(channels, grid[1], grid[0])
    fmap_b = torch.randn(channels, grid[1], grid[0])
    image = Image.new("RGB", size)
    view_a = View(image, ImageTransform.resize(size, (768, 768)), descriptors=fmap_a)
    view_b = View(image, ImageTransform.resize(size, (768, 768)), descriptors=fmap_b)
    kps_a = rng.uniform([40, 40], [size[0] - 40, size[1] - 40], size=(n, 2)).astype(np.float32)
    k = int(args.inliers * n)
    kps_b = np.concatenate(
        [
            apply_homography(truth, kps_a[:k]) + rng.normal(0, 0.5, size=(k, 2)),
            rng.uniform([0, 0], [size[0] - 1, size[1] - 1], size=(n - k, 2)),
        ]
    ).astype(np.float32)
    stages: dict[str, list[float]] = {}

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        stages.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    errors = {}
    for _ in range(args.repeat):
        ua, ia = timed("unique keypoints", unique_keypoints, kps_a)
        ub, ib = unique_keypoints(kps_b)
        da = timed("sample, half-cell (DIFT)", sample_descriptors, view_a, ua)
        timed("sample, centred", sample_descriptors, view_a, ua, half_cell_offset=False)
        db = sample_descriptors(view_b, ub)
        # the first k keypoints correspond: the target's descriptor is the source's plus noise
        pos_a, pos_b = np.empty(n, dtype=int), np.empty(n, dtype=int)
        pos_a[ia], pos_b[ib] = np.arange(len(ia)), np.arange(len(ib))
        noise = 0.3 * rng.standard_normal((k, channels)).astype(np.float32)
        db[pos_b[:k]] = da[pos_a[:k]] + noise
        pairs = timed("mutual NN, cosine", mutual_nearest, da, db, "cosine")
        timed("mutual NN, l2", mutual_nearest, da, db, "l2")
        src, dst = ua[pairs[:, 0]], ub[pairs[:, 1]]
        for method in ("lmeds", "ransac"):
            est, _ = timed(f"findHomography {method}", estimate_homography, src, dst, method)
            errors[method] = timed("corner error", corner_error, est, truth, size)
    med = {name: float(np.median(v)) for name, v in stages.items()}
    # per pair, as the runner does it: the target's keypoints and descriptors, a fifth of the
    # reference's (shared by the sequence's 5 pairs), matching, the fit and the error
    per_pair = (
        1.2 * (med["unique keypoints"] + med["sample, half-cell (DIFT)"])
        + med["mutual NN, cosine"]
        + med["findHomography lmeds"]
        + med["corner error"]
    )
    return {
        "machine": machine_info(),
        "threads": args.threads,
        "keypoints": n,
        "inlier_share": args.inliers,
        "descriptor_map": [channels, grid[1], grid[0]],
        "matches": len(pairs),
        "corner_error_px": errors,
        "median_seconds": med,
        "seconds_per_pair_dift_settings": per_pair,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="repetitions (medians reported)")
    parser.add_argument("--keypoints", type=int, default=1000, help="keypoints per image")
    parser.add_argument("--inliers", type=float, default=0.6, help="share of true correspondences")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    res = measure(args)
    print(
        f"{res['keypoints']} keypoints, {res['matches']} mutual matches, map {res['descriptor_map']}"
    )
    for stage, sec in res["median_seconds"].items():
        print(f"  {stage:28s} {1000 * sec:8.2f} ms")
    print(f"per pair with DIFT's settings: {1000 * res['seconds_per_pair_dift_settings']:.1f} ms")
    print(f"corner errors (px): {res['corner_error_px']}")
    if args.json:
        write_json(Path(args.json), res)


if __name__ == "__main__":
    main()
