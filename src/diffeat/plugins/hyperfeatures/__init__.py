"""Diffusion Hyperfeatures (Luo et al., NeurIPS 2023): the aggregation network and aggregator.

:class:`AggregationNetwork` reproduces the official network (per-layer
bottlenecks, softmaxed mixing weights over layers x timesteps);
:class:`Hyperfeatures` is the ``hyperfeatures`` aggregator; checkpoints are
single safetensors files (:func:`save_checkpoint`, :func:`load_checkpoint`).

As a plugin it registers the ``hyperfeatures`` aggregator and the commands
``diffeat checkpoint info|import-official`` and ``diffeat plot mixing-weights``
(:mod:`diffeat.plugins.hyperfeatures.commands`).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from diffeat.core.hookspecs import Register, hookimpl

# Public names and the module each lives in: imported on first use (they need
# torch), so loading the plugin to list its commands stays fast.
_EXPORTS = {
    "Hyperfeatures": "aggregator",
    "HyperfeaturesOptions": "aggregator",
    "Checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "network_from_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "FORMAT": "network",
    "AggregationNetwork": "network",
    "BottleneckBlock": "network",
    "Conv2dNorm": "network",
}

__all__ = [
    "FORMAT",
    "AggregationNetwork",
    "BottleneckBlock",
    "Checkpoint",
    "Conv2dNorm",
    "Hyperfeatures",
    "HyperfeaturesOptions",
    "load_checkpoint",
    "network_from_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


if TYPE_CHECKING:
    import click

    from diffeat.plugins.hyperfeatures.aggregator import Hyperfeatures, HyperfeaturesOptions
    from diffeat.plugins.hyperfeatures.checkpoint import (
        Checkpoint,
        load_checkpoint,
        network_from_checkpoint,
        save_checkpoint,
    )
    from diffeat.plugins.hyperfeatures.network import (
        FORMAT,
        AggregationNetwork,
        BottleneckBlock,
        Conv2dNorm,
    )


@hookimpl
def register_aggregators(register: Register) -> None:
    from diffeat.plugins.hyperfeatures.aggregator import Hyperfeatures

    register("hyperfeatures", Hyperfeatures)


@hookimpl
def register_commands(cli: click.Group) -> None:
    from diffeat.plugins.hyperfeatures.commands import add_commands

    add_commands(cli)
