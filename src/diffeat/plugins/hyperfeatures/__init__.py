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

from typing import TYPE_CHECKING

from diffeat.core.hookspecs import Register, hookimpl
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

if TYPE_CHECKING:
    import click


@hookimpl
def register_aggregators(register: Register) -> None:
    register("hyperfeatures", Hyperfeatures)


@hookimpl
def register_commands(cli: click.Group) -> None:
    from diffeat.plugins.hyperfeatures.commands import add_commands

    add_commands(cli)
