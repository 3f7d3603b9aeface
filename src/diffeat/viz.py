"""Pictures: matches drawn side by side, with a legend of scores and rejection reasons.

The image part of a match plot maps pixels exactly: source pixel ``(x, y)`` is drawn
at ``((x + 0.5) * scale, (y + 0.5) * scale)`` of the PNG and target pixel ``(x, y)`` at
``((x + 0.5 + offset) * scale, (y + 0.5) * scale)``, with ``scale`` and ``offset`` from
:func:`match_layout`. The legend lies below the images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: the label of a match the matcher marked invalid without saying why
REJECTED = "rejected"
GAP = 10  # pixels between the two images
MIN_WIDTH = 480  # small images are scaled up (integer factor) to at least this width
LINE_PX = 17  # height of one legend row at 100 dpi
MAX_ENTRIES = 40  # legend rows beyond this are summarised as "... N more"


def match_colors(count: int) -> list[tuple[float, float, float, float]]:
    """The colour of match ``i`` (tab10, cycling): point, line and legend entry."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]


def rejection_reasons(
    valid: Sequence[bool], extras: Mapping[str, object] | None = None
) -> list[str | None]:
    """Per match, ``None`` when valid, else why the matcher rejected it.

    A matcher says why in ``MatchResult.extras["reason"]``: one string for every
    rejected match or a sequence with one entry per match. Without it a rejected
    match reads :data:`REJECTED`.
    """
    reason = (extras or {}).get("reason")
    out: list[str | None] = []
    for i, ok in enumerate(valid):
        if ok:
            out.append(None)
            continue
        text: object = reason
        if isinstance(reason, Sequence) and not isinstance(reason, str):
            text = reason[i] if i < len(reason) else None
        out.append(str(text) if text else REJECTED)
    return out


@dataclass(frozen=True)
class MatchLayout:
    """Where things are in a match plot (pixels of the saved PNG at 100 dpi)."""

    scale: int  # PNG pixels per image pixel
    offset: int  # x of the target image's first column, in image pixels of the canvas
    canvas: tuple[int, int]  # (width, height) of source + gap + target, in image pixels
    legend_height: int  # PNG pixels below the images
    columns: int  # legend columns

    @property
    def size(self) -> tuple[int, int]:
        """The PNG's (width, height)."""
        w, h = self.canvas
        return w * self.scale, h * self.scale + self.legend_height

    def source_pixel(self, x: float, y: float) -> tuple[int, int]:
        """The PNG pixel where source pixel ``(x, y)`` is drawn."""
        return int((x + 0.5) * self.scale), int((y + 0.5) * self.scale)

    def target_pixel(self, x: float, y: float) -> tuple[int, int]:
        """The PNG pixel where target pixel ``(x, y)`` is drawn."""
        return self.source_pixel(x + self.offset, y)


def _label(i: int, score: float | None, reason: str | None) -> str:
    text = f"{i + 1}"
    if score is not None and math.isfinite(score):
        text += f"  score {score:.3f}"
    if reason is not None:
        text += f"  ({reason})"
    return text


def _labels(count: int, scores: Sequence[float] | None, reasons: Sequence[str | None]) -> list[str]:
    return [
        _label(i, None if scores is None else float(scores[i]), reasons[i]) for i in range(count)
    ]


def match_layout(
    source_size: tuple[int, int], target_size: tuple[int, int], labels: Sequence[str]
) -> MatchLayout:
    """The layout of a match plot of two images of these (width, height) sizes."""
    width = source_size[0] + GAP + target_size[0]
    height = max(source_size[1], target_size[1])
    scale = max(1, math.ceil(MIN_WIDTH / width))
    shown = min(len(labels), MAX_ENTRIES) + (1 if len(labels) > MAX_ENTRIES else 0)
    entry_px = 40 + 7 * max([len(t) for t in labels] + [16])
    columns = max(1, min(shown, (width * scale - 20) // entry_px)) if shown else 1
    rows = math.ceil(shown / columns) + 1  # + the key row
    return MatchLayout(scale, source_size[0] + GAP, (width, height), rows * LINE_PX + 14, columns)


def match_figure(
    source: Image.Image,
    target: Image.Image,
    source_points: Sequence[Sequence[float]],
    target_points: Sequence[Sequence[float]],
    *,
    valid: Sequence[bool] | None = None,
    scores: Sequence[float] | None = None,
    reasons: Sequence[str | None] | None = None,
) -> tuple[Figure, MatchLayout]:
    """The match figure (not saved) and its layout; see :func:`plot_matches`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n = len(source_points)
    if len(target_points) != n:
        raise ValueError(f"{n} source points but {len(target_points)} target points")
    for name, values in (("valid", valid), ("scores", scores), ("reasons", reasons)):
        if values is not None and len(values) != n:
            raise ValueError(f"{n} points but {len(values)} {name}")
    valid = [True] * n if valid is None else [bool(v) for v in valid]
    if reasons is None:
        reasons = rejection_reasons(valid)
    labels = _labels(n, scores, reasons)
    layout = match_layout(source.size, target.size, labels)
    canvas = Image.new("RGB", layout.canvas, "white")
    canvas.paste(source.convert("RGB"), (0, 0))
    canvas.paste(target.convert("RGB"), (layout.offset, 0))
    dpi = 100
    fig_w, fig_h = layout.size
    fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    ax = fig.add_axes((0, layout.legend_height / fig_h, 1, 1 - layout.legend_height / fig_h))
    ax.imshow(canvas, interpolation="nearest", aspect="auto")
    ax.set_xlim(-0.5, layout.canvas[0] - 0.5)
    ax.set_ylim(layout.canvas[1] - 0.5, -0.5)
    ax.set_axis_off()
    colors = match_colors(n)
    handles = []
    for i, ((sx, sy), (tx, ty)) in enumerate(zip(source_points, target_points)):
        color = colors[i]
        ok = valid[i]
        tx = tx + layout.offset
        if math.isfinite(tx) and math.isfinite(ty):
            ax.plot([sx, tx], [sy, ty], "-" if ok else ":", color=color, linewidth=1.5)
        ends = [(sx, sy, "o")] + ([(tx, ty, "o" if ok else "X")] if math.isfinite(tx) else [])
        for x, y, marker in ends:
            ax.scatter(
                [x],
                [y],
                s=50,
                marker=marker,
                color=color,
                edgecolors="white",
                linewidths=1,
                zorder=3,
            )
            ax.annotate(
                str(i + 1),
                (x, y),
                xytext=(5, -5),
                textcoords="offset points",
                color="white",
                fontsize=8,
                weight="bold",
                bbox={"boxstyle": "round,pad=0.15", "fc": color, "ec": "none"},
            )
        if i < MAX_ENTRIES:
            handles.append(
                Line2D(
                    [],
                    [],
                    color=color,
                    marker="o" if ok else "X",
                    linestyle="-" if ok else ":",
                    label=labels[i],
                )
            )
    if n > MAX_ENTRIES:
        handles.append(Line2D([], [], linestyle="none", label=f"... {n - MAX_ENTRIES} more"))
    key = [
        Line2D([], [], color="black", marker="o", linestyle="-", label="match"),
        Line2D(
            [],
            [],
            color="black",
            marker="X",
            linestyle=":",
            label="rejected by the matcher (reason in brackets)",
        ),
    ]
    legend_ax = fig.add_axes((0, 0, 1, layout.legend_height / fig_h))
    legend_ax.set_axis_off()
    first = (
        legend_ax.legend(
            handles=handles,
            loc="upper left",
            ncol=layout.columns,
            fontsize=8,
            frameon=False,
            handlelength=1.8,
            borderaxespad=0.2,
            columnspacing=1.0,
        )
        if handles
        else None
    )
    if first is not None:
        legend_ax.add_artist(first)
    legend_ax.legend(
        handles=key,
        loc="lower left",
        ncol=2,
        fontsize=7,
        frameon=False,
        handlelength=1.8,
        borderaxespad=0.2,
    )
    return fig, layout


def plot_matches(
    source: Image.Image,
    target: Image.Image,
    source_points: Sequence[Sequence[float]],
    target_points: Sequence[Sequence[float]],
    out: str | Path,
    *,
    valid: Sequence[bool] | None = None,
    scores: Sequence[float] | None = None,
    reasons: Sequence[str | None] | None = None,
) -> Path:
    """Draw source and target side by side with numbered points joined by lines.

    Below the images a legend gives each match's number, score and, for a match the
    matcher rejected (``valid`` false), the reason (``reasons``, e.g. from
    :func:`rejection_reasons`; ``"rejected"`` when none is given). Rejected matches are
    dotted and end in a cross.
    """
    fig, _ = match_figure(
        source, target, source_points, target_points, valid=valid, scores=scores, reasons=reasons
    )
    import matplotlib.pyplot as plt

    out = Path(out)
    try:
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out
