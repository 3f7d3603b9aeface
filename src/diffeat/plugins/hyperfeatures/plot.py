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


def plot_mixing_weights(
    network_or_checkpoint_path: AggregationNetwork | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Save a PNG heat map of the mixing weights: layers (rows) x timesteps (columns)."""
    network = as_network(network_or_checkpoint_path)
    grid = network.mixing_weight_grid().numpy()
    n_layers, n_steps = grid.shape
    plt = _plt()
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.8 * n_steps + 3.5), max(3.0, 0.42 * n_layers + 1.6)), dpi=100
    )
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(n_steps))
    ax.set_xticklabels([str(t) for t in network.timesteps], fontsize=8)
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels(
        [f"{i + 1} {short_name(name)}" for i, (name, _) in enumerate(network.layers)], fontsize=8
    )
    ax.set_xlabel("timestep")
    ax.set_ylabel("layer")
    top = float(grid.max()) if grid.size else 0.0
    for row in range(n_layers):
        for col in range(n_steps):
            value = float(grid[row, col])
            color = "black" if value > 0.6 * top else "white"
            ax.text(col, row, f"{value:.3f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="mixing weight (softmax)")
    ax.set_title(title or "hyperfeatures mixing weights", fontsize=10)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
