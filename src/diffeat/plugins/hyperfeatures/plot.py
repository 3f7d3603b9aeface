"""The mixing-weights heat map of a hyperfeatures network (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffeat.plugins.hyperfeatures.checkpoint import load_checkpoint, network_from_checkpoint
from diffeat.plugins.hyperfeatures.network import AggregationNetwork

_MAX_LABEL = 28


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_name(name: str, limit: int = _MAX_LABEL) -> str:
    """``name`` cut to ``limit`` characters from the left (the end says the most)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def as_network(network_or_path: AggregationNetwork | str | os.PathLike[str]) -> AggregationNetwork:
    """The network itself, or the one stored in a checkpoint file."""
    if isinstance(network_or_path, AggregationNetwork):
        return network_or_path
    return network_from_checkpoint(load_checkpoint(network_or_path))


def mixing_weights_table(network: AggregationNetwork) -> dict[str, Any]:
    """``{"layers", "timesteps", "weights"}``: the softmaxed ``[L, T]`` grid with its labels."""
    return {
        "layers": [name for name, _ in network.layers],
        "timesteps": list(network.timesteps),
        "weights": network.mixing_weight_grid().tolist(),
    }


def color_range(grid: Any) -> tuple[float, float]:
    """``(vmin, vmax)`` of the colour scale: fitted to the weights; a flat grid (an untrained
    network's uniform softmax) gets a small range around its value, so it reads mid-scale."""
    import numpy as np

    values = np.asarray(grid, dtype=float)
    if not values.size:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-6 * max(abs(high), 1e-12):
        spread = max(abs(high) * 0.05, 1e-6)
        return low - spread, high + spread
    return low, high


def mixing_weights_figure(
    network_or_checkpoint_path: AggregationNetwork | str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Any:
    """The heat-map figure (a matplotlib ``Figure``, not saved); see :func:`plot_mixing_weights`."""
    network = as_network(network_or_checkpoint_path)
    grid = network.mixing_weight_grid().numpy()
    n_layers, n_steps = grid.shape
    plt = _plt()
    fig, ax = plt.subplots(
        figsize=(
            min(14.0, max(4.0, 0.8 * n_steps + 3.5)),
            min(12.0, max(3.0, 0.42 * n_layers + 1.6)),
        ),
        dpi=100,
    )
    vmin, vmax = color_range(grid)
    cmap = plt.get_cmap("viridis")
    image = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_steps))
    ax.set_xticklabels([str(t) for t in network.timesteps], fontsize=8)
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels(
        [f"{i + 1} {short_name(name)}" for i, (name, _) in enumerate(network.layers)], fontsize=8
    )
    ax.set_xlabel("timestep")
    ax.set_ylabel("layer")
    flat = grid.size and float(grid.max() - grid.min()) <= 1e-6 * float(abs(grid.max()) or 1)
    heading = title or "hyperfeatures mixing weights"
    if flat:
        heading += f"\nall equal ({float(grid.flat[0]):.3g}): an untrained network?"
    ax.set_title(heading, fontsize=10)
    fig.colorbar(image, ax=ax, label="mixing weight (softmax)")
    fig.tight_layout()
    _write_values(fig, ax, grid, cmap, vmin, vmax)
    return fig


def _write_values(fig: Any, ax: Any, grid: Any, cmap: Any, vmin: float, vmax: float) -> None:
    """The value on each cell, when a cell is big enough for it (dark text on light cells)."""
    n_layers, n_steps = grid.shape
    fig.canvas.draw()
    box = ax.get_window_extent()
    cell_w, cell_h = box.width / max(1, n_steps), box.height / max(1, n_layers)
    if cell_w < 30 or cell_h < 11:
        return
    fontsize = 7 if cell_w < 40 else 8
    for row in range(n_layers):
        for col in range(n_steps):
            value = float(grid[row, col])
            r, g, b, _ = cmap((value - vmin) / (vmax - vmin))
            light = 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5
            ax.text(
                col,
                row,
                f"{value:.3f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="black" if light else "white",
            )


def plot_mixing_weights(
    network_or_checkpoint_path: AggregationNetwork | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Save a PNG heat map of the mixing weights: layers (rows) x timesteps (columns).

    The colour scale spans the weights' own range (the colour bar says it), and each
    cell carries its value when the cell is big enough to hold it.
    """
    fig = mixing_weights_figure(network_or_checkpoint_path, title=title)
    plt = _plt()
    out = Path(out_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out
