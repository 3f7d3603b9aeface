"""Render one figure of each plot kind into docs/figures/ from known synthetic data.

    python tools/render_doc_figures.py [--out docs/figures]

Nothing is downloaded and no model is run: the images are drawn here, the matches and
evaluation outcomes are made up (stated below), the mixing weights are set by hand and
the feature map comes from the offline test extractor ``color-blur``. Rerun after a
change to a plot and commit the PNGs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]


def scene(size: tuple[int, int], shift: tuple[int, int] = (0, 0)) -> Image.Image:
    """A gradient with a few coloured shapes (a "photo" with parts to match)."""
    w, h = size
    dx, dy = shift
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([90 + 60 * x / w, 110 + 50 * y / h, 150 - 40 * x / w], -1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20 + dx, 20 + dy, 70 + dx, 70 + dy), fill=(220, 60, 50))
    draw.rectangle((95 + dx, 30 + dy, 140 + dx, 95 + dy), fill=(240, 200, 40))
    draw.polygon(
        [(40 + dx, 110 + dy), (80 + dx, 85 + dy), (110 + dx, 120 + dy)], fill=(40, 90, 200)
    )
    return image


def match_figure(out: Path) -> Path:
    """Four matches on a shifted scene; the third rejected by a mutual check."""
    from diffeat.viz import plot_matches, rejection_reasons

    source, target = scene((160, 128)), scene((160, 128), shift=(12, 6))
    src = [(45, 45), (118, 60), (75, 105), (150, 20)]
    tgt = [(57, 51), (130, 66), (20, 20), (158, 28)]
    valid = [True, True, False, True]
    reasons = rejection_reasons(valid, {"reason": "not mutual"})
    return plot_matches(
        source,
        target,
        src,
        tgt,
        out / "match.png",
        valid=valid,
        scores=[0.93, 0.88, 0.41, 0.67],
        reasons=reasons,
    )


def evaluation(tmp: Path):  # -> diffeat.eval.runner.Evaluation
    """Three categories, four pairs each, eight keypoints; predictions are the ground truth
    plus noise growing with the pair (some correct, some wrong)."""
    from diffeat.core.datasets import Pair
    from diffeat.eval.protocols import get_protocol
    from diffeat.eval.runner import Evaluation, PairOutcome, RunStats, score

    rng = np.random.default_rng(0)
    source_path, target_path = tmp / "source.png", tmp / "target.png"
    scene((160, 128)).save(source_path)
    scene((160, 128), shift=(12, 6)).save(target_path)
    src = np.array(
        [[45, 45], [30, 30], [118, 60], [100, 35], [75, 105], [45, 112], [105, 118], [135, 90]],
        dtype=float,
    )
    gt = src + [12, 6]
    outcomes = []
    for c, category in enumerate(("ellipse", "rectangle", "triangle")):
        for k in range(4):
            noise = rng.normal(0, 4 + 6 * k + 4 * c, gt.shape)
            pred = np.clip(gt + noise, 0, [159, 127])  # a matcher answers inside the image
            pair = Pair(
                f"{category}-{k:02d}:source.png-target.png",
                source_path,
                target_path,
                category,
                src,
                gt,
                source_bbox=(10, 10, 150, 125),
                target_bbox=(22, 16, 160, 128),
            )
            outcomes.append(PairOutcome(pair, pred, np.ones(len(gt)), np.ones(len(gt), bool), 0.0))
    protocol = get_protocol("dift")
    kinds, per_pair, summaries = score(outcomes, protocol, "synthetic")
    return Evaluation(
        "synthetic", {}, protocol, protocol.alphas, kinds, outcomes, RunStats(), summaries, per_pair
    )


def mixing_figure(out: Path) -> Path:
    """A network whose weights favour one layer at the small timesteps."""
    from diffeat.plugins.hyperfeatures.network import AggregationNetwork
    from diffeat.plugins.hyperfeatures.plot import plot_mixing_weights

    layers = [("down_blocks.2", 8), ("mid_block", 8), ("up_blocks.1", 8), ("up_blocks.2", 8)]
    net = AggregationNetwork(layers, [0, 100, 250, 500], projection_dim=16, norm_groups=4)
    logits = torch.tensor(
        [  # rows: timesteps, columns: layers (the network's timestep-major order)
            [0.2, 0.5, 1.6, 1.0],
            [0.1, 0.4, 1.3, 0.8],
            [0.0, 0.2, 0.7, 0.4],
            [-0.3, 0.0, 0.2, 0.1],
        ]
    )
    with torch.no_grad():
        net.mixing_weights.copy_(logits.flatten())
    return plot_mixing_weights(net, out / "mixing_weights.png", title="mixing weights (example)")


def features_figure(out: Path) -> Path:
    """The ``color`` layer of the test extractor ``color-blur`` on the scene."""
    from diffeat.core.images import as_input
    from diffeat.testing import ColorBlurExtractor, ColorBlurOptions
    from diffeat.viz_features import plot_features

    image = scene((160, 128))
    extractor = ColorBlurExtractor(
        ColorBlurOptions(image_size=[64, 64], sigmas=[0, 2, 6], stride=2)
    )
    (fs,) = extractor.extract([as_input(image)])
    plot_features(image, fs, out / "features.png", layer="color", timestep=0)
    return out / "features.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import tempfile

    from diffeat.eval.plots import category_bars, pck_vs_alpha, qualitative_grid

    written = [match_figure(args.out), mixing_figure(args.out), features_figure(args.out)]
    with tempfile.TemporaryDirectory() as tmp:
        ev = evaluation(Path(tmp))
        written += [
            pck_vs_alpha(ev, args.out / "pck_vs_alpha.png"),
            category_bars(ev, args.out / "categories.png"),
            qualitative_grid(ev, args.out / "qualitative.png", count=2),
        ]
    for path in written:
        print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
