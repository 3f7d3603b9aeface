"""Plots of the homography task (matplotlib, Agg).

- ``homography_pairs.png``: a few pairs, image 1 and the target side by side;
  matches drawn as lines (green: the target point lies within 3 px of where the
  true homography maps the source point, red: farther), and on the target the
  outline of image 1 warped by the true homography (white, dashed) and by the
  estimate (green when the pair is correct at the middle threshold, red if not).
- ``accuracy.png``: accuracy against the corner-error threshold (0..10 px) for
  all pairs, illumination and viewpoint sequences, the protocol's thresholds marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from diffeat.core.images import load_image
from diffeat.core.sequences import apply_homography
from diffeat.eval.homography_metrics import corners, threshold_key
from diffeat.eval.plots import CORRECT, DPI, WRONG, save

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from diffeat.eval.homography import HomographyEvaluation, PairRecord

MATCH_PX = 3.0  # a match is drawn as correct within this distance of the truth
MAX_LINES = 150  # matches drawn per pair at most (evenly spread)
GAP = 10
TRUTH = "#ffffff"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_pairs(ev: HomographyEvaluation, count: int) -> list[int]:
    """Up to ``count`` record indices spread over the run, illumination and viewpoint alike."""
    if count <= 0 or not ev.records:
        return []
    by_kind = [
        [i for i, r in enumerate(ev.records) if r.kind == k] for k in ("viewpoint", "illumination")
    ]
    picks: list[int] = []
    share = [count - count // 2, count // 2]
    for indices, n in zip(by_kind, share):
        if indices and n:
            step = np.linspace(0, len(indices) - 1, min(n, len(indices)))
            picks += [indices[int(np.rint(s))] for s in step]
    rest = [i for i in range(len(ev.records)) if i not in picks]
    picks += rest[: max(0, count - len(picks))]
    return sorted(set(picks))


def _outline(ax, matrix: np.ndarray, size: tuple[int, int], x0: float, **style) -> None:
    c = corners(size)[[0, 2, 3, 1, 0]]  # around the image
    p = apply_homography(matrix, c)
    if np.isfinite(p).all():
        ax.plot(p[:, 0] + x0, p[:, 1], **style)


def _pair_panel(ax, record: PairRecord, middle: float) -> None:
    ref = load_image(record.reference)
    tgt = load_image(record.target)
    w = ref.width + GAP + tgt.width
    h = max(ref.height, tgt.height)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    canvas.paste(ref, (0, 0))
    x0 = ref.width + GAP
    canvas.paste(tgt, (x0, 0))
    ax.imshow(canvas, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    errors = record.match_errors()
    keep = np.linspace(0, len(errors) - 1, min(MAX_LINES, len(errors))).round().astype(int)
    for i in np.unique(keep) if len(errors) else []:
        (ax_, ay), (bx, by) = record.src[i], record.dst[i]
        color = CORRECT if errors[i] <= MATCH_PX else WRONG
        ax.plot([ax_, bx + x0], [ay, by], color=color, linewidth=0.5, alpha=0.7)
    _outline(ax, record.truth, record.reference_size, x0, color=TRUTH, linestyle="--", lw=1.5)
    if record.estimate is not None:
        color = CORRECT if record.error <= middle else WRONG
        _outline(ax, record.estimate, record.reference_size, x0, color=color, lw=1.5)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    good = int((errors <= MATCH_PX).sum())
    err = "no estimate" if record.estimate is None else f"corner error {record.error:.2f} px"
    ax.set_title(
        f"{record.sequence} 1-{record.index} ({record.kind}): {err}; "
        f"{good}/{len(errors)} matches within {MATCH_PX:g} px",
        fontsize=8,
    )


def pairs_figure(ev: HomographyEvaluation, count: int | None = None) -> Figure:
    """The pairs picked by :func:`pick_pairs`, one row each."""
    from matplotlib.lines import Line2D

    plt = _plt()
    picks = pick_pairs(ev, ev.options.plots if count is None else count)
    rows = max(1, len(picks))
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.4 * rows + 0.6), dpi=DPI, squeeze=False)
    thresholds = sorted(ev.options.thresholds)
    middle = thresholds[len(thresholds) // 2]
    for ax, index in zip(axes[:, 0], picks):
        _pair_panel(ax, ev.records[index], middle)
    if not picks:
        axes[0, 0].set_axis_off()
    handles = [
        Line2D([], [], color=CORRECT, label=f"match within {MATCH_PX:g} px / estimate correct"),
        Line2D([], [], color=WRONG, label="wrong"),
        Line2D([], [], color="black", linestyle="--", label="image 1 by the true homography"),
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=3,
        fontsize=7,
        frameon=False,
        title=f"estimate outline correct at {threshold_key(middle)} px",
        title_fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.6 / (3.4 * rows + 0.6), 1, 1))
    return fig


def accuracy_figure(ev: HomographyEvaluation) -> Figure:
    """Accuracy vs the corner-error threshold, per subset."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=DPI)
    top = max(10.0, max(ev.options.thresholds))
    ts = np.linspace(0, top, 101)
    for name, style in (("all", "-"), ("illumination", "--"), ("viewpoint", ":")):
        errors = np.array([r.error for r in ev.subset(name)], dtype=np.float64)
        if not len(errors):
            continue
        acc = [(errors <= t).mean() * 100 for t in ts]
        ax.plot(ts, acc, style, label=f"{name} ({len(errors)} pairs)")
    for t in ev.options.thresholds:
        ax.axvline(t, color="grey", linewidth=0.5)
    ax.set_xlabel("corner error threshold (px)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_homography_plots(ev: HomographyEvaluation, folder: Path) -> list[Path]:
    """``accuracy.png`` and (with ``plots > 0``) ``homography_pairs.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [save(accuracy_figure(ev), folder / "accuracy.png")]
    pairs = folder / "homography_pairs.png"
    if ev.options.plots > 0:
        written.append(save(pairs_figure(ev), pairs))
    else:
        pairs.unlink(missing_ok=True)
    return written
