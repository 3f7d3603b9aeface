"""Diffusion Hyperfeatures (Luo et al., NeurIPS 2023): the aggregation network and aggregator.

:class:`AggregationNetwork` reproduces the official network (per-layer
bottlenecks, softmaxed mixing weights over layers x timesteps);
:class:`Hyperfeatures` is the ``hyperfeatures`` aggregator; checkpoints are
single safetensors files (:func:`save_checkpoint`, :func:`load_checkpoint`).
"""

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
