"""Evaluation plots (matplotlib, Agg): PCK vs alpha, per-category bars, a qualitative grid.

Each plot has a ``*_figure`` builder returning the matplotlib figure (for tests and
notebooks) and a function that saves it as a PNG at 100 dpi.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffeat.eval.pck import format_alpha, pck_curve
from diffeat.eval.runner import Evaluation

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

CORRECT = "#1a9850"
WRONG = "#d73027"
TRUTH = "#ffffff"
DPI = 100

#: what ``T`` is for each threshold kind (legend text)
THRESHOLD_TEXT = {
    "bbox-target": "T = target box side",
    "bbox-source": "T = source box side",
    "img": "T = target image side",
    "kps-target": "T = target keypoints' extent",
    "kps-source": "T = source keypoints' extent",
}
_MARKERS = ("o", "s", "^", "D", "v")
_AVERAGES = (("per-image", "-", "per image"), ("per-point", "--", "per point"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at :data:`DPI` and close it."""
    plt = _plt()
    path = Path(path)
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def curve_alphas(ev: Evaluation, count: int = 30) -> list[float]:
    """The alphas the PCK-vs-alpha curves are sampled at."""
    top = max(0.3, 2 * max(ev.alphas))
    return np.round(np.linspace(top / count, top, count), 6).tolist()


def pck_vs_alpha_figure(ev: Evaluation) -> Figure:
    """PCK against alpha: one colour and marker per (threshold, average), solid per image,
    dashed per point; markers of the two averages sit on alternate alphas so equal curves
    stay visible."""
    plt = _plt()
    alphas = curve_alphas(ev)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=DPI)
    cmap = plt.get_cmap("tab10")
    index = 0
    from matplotlib.lines import Line2D

    handles = []
    for k, kind in enumerate(ev.thresholds):
        scored = ev.scored(kind)
        marker = _MARKERS[k % len(_MARKERS)]
        for a, (average, style, words) in enumerate(_AVERAGES):
            values = pck_curve(
                scored, alphas, ev.protocol.comparison, average, ev.protocol.arithmetic
            )
            ys = np.array([np.nan if v is None else 100 * v for v in values])
            color = cmap(index % 10)
            ax.plot(alphas, ys, linestyle=style, color=color, linewidth=1.6 - 0.4 * a, zorder=2)
            # markers on alternate alphas, above every line: equal curves both stay visible
            every = slice(a, None, len(_AVERAGES))
            ax.plot(
                alphas[every],
                ys[every],
                linestyle="none",
                marker=marker,
                markersize=5,
                color=color,
                markeredgecolor="white",
                markeredgewidth=0.6,
                zorder=3,
            )
            handles.append(
                Line2D(
                    [],
                    [],
                    color=color,
                    linestyle=style,
                    marker=marker,
                    markersize=5,
                    label=f"{kind}, {words}",
                )
            )
            index += 1
    for alpha in ev.alphas:
        ax.axvline(alpha, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"alpha (correct: {ev.protocol.test()})")
    ax.set_ylabel("PCK (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(0, alphas[-1] * 1.02)
    ax.set_title(f"{ev.dataset}: PCK vs alpha", fontsize=10)
    ax.grid(alpha=0.3)
    kinds = "; ".join(THRESHOLD_TEXT.get(k, k) for k in ev.thresholds)
    ax.legend(
        handles=handles,
        fontsize=8,
        title=f"threshold ({kinds}), average",
        title_fontsize=8,
        loc="lower right",
    )
    fig.tight_layout()
    return fig


def pck_vs_alpha(ev: Evaluation, path: str | Path) -> Path:
    """PCK (per image and per point) against alpha, one line pair per threshold kind."""
    return save(pck_vs_alpha_figure(ev), path)


def _categories(ev: Evaluation) -> dict[str, dict[str, float | None]]:
    kind, alpha = ev.thresholds[0], ev.alphas[0]
    return ev.summaries[kind]["by_alpha"][format_alpha(alpha)]["categories"]


def category_bars_figure(ev: Evaluation) -> Figure:
    """Per-category PCK at the first alpha and threshold, per image and per point."""
    plt = _plt()
    kind, alpha = ev.thresholds[0], ev.alphas[0]
    cats = _categories(ev)
    names = list(cats)
    x = np.arange(len(names))
    per_image = [100 * (cats[n]["per_image"] or 0) for n in names]
    per_point = [100 * (cats[n]["per_point"] or 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(names) + 2), 4), dpi=DPI)
    ax.bar(x - 0.2, per_image, 0.4, label="per image")
    ax.bar(x + 0.2, per_point, 0.4, label="per point")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"PCK@{format_alpha(alpha)} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{ev.dataset}: per category ({kind})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def category_bars(ev: Evaluation, path: str | Path) -> Path:
    """Per-category PCK at the first alpha and threshold, per image and per point."""
    return save(category_bars_figure(ev), path)


def _fraction_correct(ev: Evaluation, index: int) -> float:
    kind, alpha = ev.thresholds[0], ev.alphas[0]
    outcome = ev.outcomes[index]
    ok = ev.protocol.correct(outcome.distances(), ev.pair_thresholds[index][kind], alpha)
    return float(ok.sum()) / max(1, outcome.pair.num_visible)


def _pick(ev: Evaluation, count: int) -> list[int]:
    """Up to ``count`` pair indices: the first pair of each category, then the worst pairs."""
    with_points = [i for i, o in enumerate(ev.outcomes) if o.pair.num_visible]
    chosen: list[int] = []
    seen: set[str] = set()
    for i in with_points:
        cat = ev.outcomes[i].pair.category
        if cat not in seen and len(chosen) < (count + 1) // 2:
            chosen.append(i)
            seen.add(cat)
    rest = sorted(
        (i for i in with_points if i not in chosen), key=lambda i: (_fraction_correct(ev, i), i)
    )
    chosen += rest[: count - len(chosen)]
    return sorted(chosen)


def _wrap(text: str, width: int = 44) -> str:
    """``text`` on as many lines as it needs (long ids break anywhere)."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=True)) or text


def _number(ax, x: float, y: float, i: int, color: str) -> None:
    ax.annotate(
        str(i),
        (x, y),
        xytext=(4, 3),
        textcoords="offset points",
        fontsize=6,
        color="white",
        weight="bold",
        bbox={"boxstyle": "round,pad=0.1", "fc": color, "ec": "none", "alpha": 0.85},
    )


def qualitative_figure(ev: Evaluation, count: int = 6) -> Figure:
    """A few pairs (see :func:`qualitative_grid`); the figure, not saved."""
    from matplotlib.lines import Line2D

    from diffeat.core.images import load_image

    plt = _plt()
    kind, alpha = ev.thresholds[0], ev.alphas[0]
    picks = _pick(ev, count)
    rows = max(1, len(picks))
    fig, axes = plt.subplots(rows, 2, figsize=(7, 3.2 * rows + 0.6), dpi=DPI, squeeze=False)
    for row, index in enumerate(picks):
        outcome = ev.outcomes[index]
        pair = outcome.pair
        vis = pair.visible
        numbers = np.flatnonzero(vis) + 1  # keypoint numbers, 1-based, as in the annotation
        dist = outcome.distances()
        t = ev.pair_thresholds[index][kind]
        ok = ev.protocol.correct(dist, t, alpha)
        colors = [CORRECT if o else WRONG for o in ok[vis]]
        ax_s, ax_t = axes[row]
        ax_s.imshow(load_image(pair.source, orientation="raw"))
        target_image = load_image(pair.target, orientation="raw")
        ax_t.imshow(target_image)
        # predictions off the image are not drawn: every panel shows its whole image
        ax_t.set_xlim(-0.5, target_image.width - 0.5)
        ax_t.set_ylim(target_image.height - 0.5, -0.5)
        src = pair.source_points[vis]
        gt = pair.target_points[vis]
        pred = outcome.predicted[vis]
        ax_s.scatter(src[:, 0], src[:, 1], c=colors, s=22, edgecolors="white", linewidths=0.8)
        for (x, y), c, k in zip(src, colors, numbers):
            _number(ax_s, x, y, int(k), c)
        for (px, py), (gx, gy), c in zip(pred, gt, colors):
            ax_t.plot([px, gx], [py, gy], color=c, linewidth=1)
        ax_t.scatter(gt[:, 0], gt[:, 1], c=TRUTH, s=14, marker="x", linewidths=1)
        ax_t.scatter(pred[:, 0], pred[:, 1], c=colors, s=22, edgecolors="white", linewidths=0.8)
        for (x, y), c, k in zip(pred, colors, numbers):
            if np.isfinite(x) and np.isfinite(y):
                _number(ax_t, x, y, int(k), c)
        n_ok = int(ok[vis].sum())
        ax_s.set_title(_wrap(f"{pair.category}: {pair.id}"), fontsize=8)
        ax_t.set_title(
            _wrap(f"{n_ok}/{len(gt)} correct @{format_alpha(alpha)} ({kind})"), fontsize=8
        )
        for ax in (ax_s, ax_t):
            ax.set_axis_off()
    if not picks:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0][0].set_title("no pair with visible keypoints", fontsize=8)
    handles = [
        Line2D([], [], marker="o", color=CORRECT, linestyle="none", label="correct"),
        Line2D([], [], marker="o", color=WRONG, linestyle="none", label="wrong"),
        Line2D([], [], marker="x", color="black", linestyle="none", label="ground truth"),
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
        title=f"prediction (distance {ev.protocol.comparison} {format_alpha(alpha)} * T, {kind})",
        title_fontsize=8,
    )
    legend_share = 0.6 / (3.2 * rows + 0.6)
    fig.tight_layout(rect=(0, legend_share, 1, 1))
    return fig


def qualitative_grid(ev: Evaluation, path: str | Path, count: int = 6) -> Path:
    """A few pairs: numbered source points, and in the target the predictions (green: correct
    under the first threshold and alpha, red: wrong) joined to their ground truth (x)."""
    return save(qualitative_figure(ev, count), path)


def write_plots(ev: Evaluation, out: str | Path) -> list[Path]:
    """``pck_vs_alpha.png``, ``categories.png`` (only with two categories or more: one bar
    pair would repeat the headline; a stale one is removed) and ``qualitative.png``."""
    out = Path(out)
    written = [pck_vs_alpha(ev, out / "pck_vs_alpha.png")]
    bars = out / "categories.png"
    if len(_categories(ev)) > 1:
        written.append(category_bars(ev, bars))
    else:
        bars.unlink(missing_ok=True)
    written.append(qualitative_grid(ev, out / "qualitative.png"))
    return written
