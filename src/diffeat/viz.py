"""Pictures: matches drawn side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image


def plot_matches(
    source: Image.Image,
    target: Image.Image,
    source_points: Sequence[Sequence[float]],
    target_points: Sequence[Sequence[float]],
    out: str | Path,
    *,
    valid: Sequence[bool] | None = None,
) -> Path:
    """Draw source and target side by side with numbered points joined by lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gap = 10
    height = max(source.height, target.height)
    canvas = Image.new("RGB", (source.width + gap + target.width, height), "white")
    canvas.paste(source, (0, 0))
    canvas.paste(target, (source.width + gap, 0))
    dpi = 100
    fig = plt.figure(figsize=(canvas.width / dpi, canvas.height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas)
    ax.set_axis_off()
    cmap = plt.get_cmap("tab10")
    offset = source.width + gap
    for i, ((sx, sy), (tx, ty)) in enumerate(zip(source_points, target_points)):
        color = cmap(i % 10)
        style = "-" if valid is None or valid[i] else ":"
        ax.plot([sx, tx + offset], [sy, ty], style, color=color, linewidth=1.5)
        for x, y in ((sx, sy), (tx + offset, ty)):
            ax.scatter([x], [y], s=40, color=color, edgecolors="white", linewidths=1, zorder=3)
            ax.annotate(
                str(i + 1),
                (x, y),
                xytext=(4, -4),
                textcoords="offset points",
                color="white",
                fontsize=9,
                weight="bold",
                bbox={"boxstyle": "round,pad=0.15", "fc": color, "ec": "none"},
            )
    out = Path(out)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
