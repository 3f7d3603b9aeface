"""Evaluation plots (matplotlib, Agg): PCK vs alpha, per-category bars, a qualitative grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffeat.eval.pck import format_alpha, pck_curve
from diffeat.eval.runner import Evaluation

CORRECT = "#1a9850"
WRONG = "#d73027"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pck_vs_alpha(ev: Evaluation, path: str | Path) -> Path:
    """PCK (per image and per point) against alpha, one line pair per threshold kind."""
    plt = _plt()
    top = max(0.3, 2 * max(ev.alphas))
    alphas = np.round(np.linspace(top / 30, top, 30), 6).tolist()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for kind in ev.thresholds:
        scored = ev.scored(kind)
        for average, style in (("per-image", "-"), ("per-point", "--")):
            values = pck_curve(
                scored, alphas, ev.protocol.comparison, average, ev.protocol.arithmetic
            )
            ys = [np.nan if v is None else 100 * v for v in values]
            ax.plot(alphas, ys, style, label=f"{kind}, {average}")
    for alpha in ev.alphas:
        ax.axvline(alpha, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"alpha (distance {ev.protocol.comparison} alpha * T)")
    ax.set_ylabel("PCK (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{ev.dataset}: PCK vs alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def category_bars(ev: Evaluation, path: str | Path) -> Path:
    """Per-category PCK at the first alpha and threshold, per image and per point."""
    plt = _plt()
    kind, alpha = ev.thresholds[0], ev.alphas[0]
    cats = ev.summaries[kind]["by_alpha"][format_alpha(alpha)]["categories"]
    names = list(cats)
    x = np.arange(len(names))
    per_image = [100 * (cats[n]["per_image"] or 0) for n in names]
    per_point = [100 * (cats[n]["per_point"] or 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(names) + 2), 4), dpi=100)
    ax.bar(x - 0.2, per_image, 0.4, label="per image")
    ax.bar(x + 0.2, per_point, 0.4, label="per point")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"PCK@{format_alpha(alpha)} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{ev.dataset}: per category ({kind})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


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


def qualitative_grid(ev: Evaluation, path: str | Path, count: int = 6) -> Path:
    """A few pairs: source points, and in the target the predictions (green: correct under
    the first threshold and alpha, red: wrong) joined to their ground truth (white)."""
    from diffeat.core.images import load_image

    plt = _plt()
    kind, alpha = ev.thresholds[0], ev.alphas[0]
    picks = _pick(ev, count)
    rows = max(1, len(picks))
    fig, axes = plt.subplots(rows, 2, figsize=(7, 3.2 * rows), dpi=100, squeeze=False)
    for row, index in enumerate(picks):
        outcome = ev.outcomes[index]
        pair = outcome.pair
        vis = pair.visible
        dist = outcome.distances()
        t = ev.pair_thresholds[index][kind]
        ok = ev.protocol.correct(dist, t, alpha)
        colors = [CORRECT if o else WRONG for o in ok[vis]]
        ax_s, ax_t = axes[row]
        ax_s.imshow(load_image(pair.source))
        ax_t.imshow(load_image(pair.target))
        src = pair.source_points[vis]
        gt = pair.target_points[vis]
        pred = outcome.predicted[vis]
        ax_s.scatter(src[:, 0], src[:, 1], c=colors, s=22, edgecolors="white", linewidths=0.8)
        for (px, py), (gx, gy), c in zip(pred, gt, colors):
            ax_t.plot([px, gx], [py, gy], color=c, linewidth=1)
        ax_t.scatter(gt[:, 0], gt[:, 1], c="white", s=12, marker="x", linewidths=1)
        ax_t.scatter(pred[:, 0], pred[:, 1], c=colors, s=22, edgecolors="white", linewidths=0.8)
        n_ok = int(ok[vis].sum())
        ax_s.set_title(f"{pair.category}: {pair.id}"[:48], fontsize=8)
        ax_t.set_title(f"{n_ok}/{len(gt)} correct @{format_alpha(alpha)} ({kind})", fontsize=8)
        for ax in (ax_s, ax_t):
            ax.set_axis_off()
    if not picks:
        for ax in axes[0]:
            ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(ev: Evaluation, out: str | Path) -> list[Path]:
    out = Path(out)
    return [
        pck_vs_alpha(ev, out / "pck_vs_alpha.png"),
        category_bars(ev, out / "categories.png"),
        qualitative_grid(ev, out / "qualitative.png"),
    ]
