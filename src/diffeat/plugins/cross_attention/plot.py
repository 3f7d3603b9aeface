"""The attention figure of Hedlin et al.: per query point, the source with the point and
the target under each layer's softmax attention map, with the argmax (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention(
    source: Image.Image,
    target: Image.Image,
    points: Sequence[tuple[float, float]],
    found: Sequence[tuple[float, float]],
    attention: torch.Tensor,
    layers: Sequence[str],
    out: str | os.PathLike[str],
) -> Path:
    """Write one row per point: the source with the point, then the target under each
    layer's map ``attention[n, l]`` (``[N, L, S, S]`` softmax probabilities in the
    ``S x S`` squashed frame, resized to the target), then under their mean, with the match."""
    plt = _plt()
    n_points, n_layers = int(attention.shape[0]), int(attention.shape[1])
    cols = n_layers + 2
    tw, th = target.size
    fig, axes = plt.subplots(n_points, cols, figsize=(2.6 * cols, 2.6 * n_points), squeeze=False)
    maps = attention.float()
    for n in range(n_points):
        ax = axes[n][0]
        ax.imshow(source)
        ax.scatter([points[n][0]], [points[n][1]], s=60, c="red", marker="x")
        ax.set_title(f"source ({points[n][0]:g}, {points[n][1]:g})", fontsize=8)
        panels = [*(maps[n, i] for i in range(n_layers)), maps[n].mean(dim=0)]
        names = [*layers, "mean of layers"]
        for j, (panel, name) in enumerate(zip(panels, names), start=1):
            ax = axes[n][j]
            heat = torch.nn.functional.interpolate(
                panel[None, None], size=(th, tw), mode="bilinear", align_corners=False
            )[0, 0].numpy()
            ax.imshow(target)
            ax.imshow(heat, cmap="jet", alpha=0.5)
            y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
            ax.scatter([x], [y], s=40, c="white", marker="+")
            if j == cols - 1:
                ax.scatter([found[n][0]], [found[n][1]], s=60, c="red", marker="x")
            ax.set_title(name if len(name) <= 26 else "…" + name[-25:], fontsize=8)
    for row in axes:
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
