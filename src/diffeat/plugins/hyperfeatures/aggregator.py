"""The ``hyperfeatures`` aggregator: a (trained) aggregation network over every layer and timestep."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffeat.core.components import Aggregator, TrainingCheckpoint
from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.features import FeatureSet
from diffeat.core.options import opt
from diffeat.plugins.hyperfeatures.checkpoint import (
    load_checkpoint,
    network_from_checkpoint,
    save_checkpoint,
)
from diffeat.plugins.hyperfeatures.network import AggregationNetwork

Layers = list[tuple[str, int]]


@dataclass
class HyperfeaturesOptions:
    checkpoint: str = opt(
        "",
        "safetensors checkpoint written by `diffeat train`; empty: a freshly initialised "
        "network from `seed` (for training and tests)",
    )
    projection_dim: int = opt(
        384, "output channels (bottleneck: a quarter); with a checkpoint, the checkpoint's"
    )
    norm_groups: int = opt(32, "GroupNorm groups; with a checkpoint, the checkpoint's")
    size: list[int] = opt(
        [64, 64],
        "output grid [width, height] every layer is resized to; with a checkpoint, the "
        "checkpoint's",
    )
    seed: int = opt(0, "initialisation seed of a fresh network (no checkpoint)")
    device: str = opt("auto", "torch device; auto: cuda if available, else cpu", cache=False)

    def validate(self) -> None:
        if self.projection_dim < 1 or self.norm_groups < 1:
            raise ValueError("projection_dim and norm_groups must be positive")
        if self.projection_dim % (4 * self.norm_groups):
            raise ValueError(
                f"projection_dim ({self.projection_dim}) must be a multiple of 4 * norm_groups "
                f"(= {4 * self.norm_groups}) so both GroupNorms divide evenly"
            )
        if len(self.size) != 2 or any(v < 1 for v in self.size):
            raise ValueError(f"size must be [width, height] with positive values, got {self.size}")


def _fmt_layers(layers: Sequence[tuple[str, int]]) -> str:
    return "[" + ", ".join(f"{name} ({channels} ch)" for name, channels in layers) + "]"


def layers_of(features: FeatureSet) -> Layers:
    """``(name, channels)`` of the feature set's layers, in order."""
    return [(name, int(t.shape[1])) for name, t in features.layers.items()]


class Hyperfeatures(Aggregator):
    """Diffusion Hyperfeatures: per-layer bottlenecks mixed over layers and timesteps.

    The network is built (seeded) or loaded from ``checkpoint`` on first use and
    reused; a checkpoint trained on other layers or timesteps is refused.
    """

    Options = HyperfeaturesOptions
    #: the option naming the checkpoint to start from (the trainable-aggregator contract)
    checkpoint_option = "checkpoint"

    def __init__(self, options: HyperfeaturesOptions | None = None) -> None:
        self.options = options or HyperfeaturesOptions()
        self.options.validate()
        self.device = pick_device(self.options.device)
        self._network: AggregationNetwork | None = None

    @property
    def network(self) -> AggregationNetwork | None:
        """The network, or ``None`` until :meth:`network_for` (or a call) built it."""
        return self._network

    def _fresh(self, layers: Layers, timesteps: list[int]) -> AggregationNetwork:
        o = self.options
        with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG stays untouched
            torch.manual_seed(o.seed)
            return AggregationNetwork(
                layers,
                timesteps,
                projection_dim=o.projection_dim,
                norm_groups=o.norm_groups,
                size=(int(o.size[0]), int(o.size[1])),
            )

    def _load(self, layers: Layers, timesteps: list[int]) -> AggregationNetwork:
        path = self.options.checkpoint
        ckpt = load_checkpoint(path)
        if ckpt.layers != layers or ckpt.timesteps != timesteps:
            raise ConfigError(
                f"checkpoint {path} was trained on layers {_fmt_layers(ckpt.layers)} at "
                f"timesteps {ckpt.timesteps}; these features have layers {_fmt_layers(layers)} "
                f"at timesteps {timesteps} — train a checkpoint for this extractor with "
                f"`diffeat train` or use the matching config"
            )
        return network_from_checkpoint(ckpt)

    def network_for(
        self, layers: Sequence[tuple[str, int]], timesteps: Sequence[int]
    ) -> AggregationNetwork:
        """The network for features with these ``(name, channels)`` layers and timesteps.

        Built or loaded once, then cached; features of another shape are refused.
        """
        layers = [(str(n), int(c)) for n, c in layers]
        timesteps = [int(t) for t in timesteps]
        if self._network is None:
            if self.options.checkpoint:
                network = self._load(layers, timesteps)
            else:
                network = self._fresh(layers, timesteps)
            self._network = network.to(self.device)
        elif self._network.layers != layers or self._network.timesteps != timesteps:
            origin = self.options.checkpoint or "fresh network"
            raise ConfigError(
                f"hyperfeatures aggregator: the network ({origin}) was built for layers "
                f"{_fmt_layers(self._network.layers)} at timesteps {self._network.timesteps}; "
                f"these features have layers {_fmt_layers(layers)} at timesteps {timesteps}. "
                f"Use one aggregator per extractor config"
            )
        return self._network

    @staticmethod
    def maps_of(features: FeatureSet) -> dict[str, torch.Tensor]:
        """The network input of one image: ``{name: [1, T, C, h, w]}``."""
        return {name: t.unsqueeze(0) for name, t in features.layers.items()}

    def _batch(self, batch: Sequence[FeatureSet]) -> tuple[AggregationNetwork, dict]:
        if not batch:
            raise ValueError("forward_features needs at least one feature set")
        first = batch[0]
        layers, timesteps = layers_of(first), list(first.timesteps)
        for i, fs in enumerate(batch[1:], start=1):
            if layers_of(fs) != layers or list(fs.timesteps) != timesteps:
                raise ValueError(
                    f"feature set {i} has layers {_fmt_layers(layers_of(fs))} at timesteps "
                    f"{list(fs.timesteps)}; feature set 0 has {_fmt_layers(layers)} at {timesteps}"
                )
        network = self.network_for(layers, timesteps)
        width, height = network.size
        maps = {}
        for name, _ in layers:
            parts = [fs.layers[name].to(self.device, torch.float32) for fs in batch]
            if len({tuple(p.shape) for p in parts}) > 1:  # grids differ: resize each first
                parts = [
                    torch.nn.functional.interpolate(
                        p, size=(height, width), mode="bilinear", align_corners=False
                    )
                    for p in parts
                ]
            maps[name] = torch.stack(parts)
        return network, maps

    def forward_features(self, batch: Sequence[FeatureSet]) -> torch.Tensor:
        """Descriptors ``[B, C, H, W]`` of several images, with gradients, on the network's device.

        For training: the network's mode (train/eval) is left as it is.
        """
        network, maps = self._batch(batch)
        return network(maps)

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        """One image's descriptor map ``[projection_dim, H, W]`` (float32, on CPU)."""
        with torch.no_grad():
            network, maps = self._batch([features])
            was_training = network.training
            network.eval()
            try:
                out = network(maps)[0]
            finally:
                network.train(was_training)
        return out.float().cpu()

    def save(
        self,
        path: str | os.PathLike[str],
        extra: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the network to a checkpoint (see :func:`save_checkpoint`)."""
        if self._network is None:
            raise DiffeatError(
                "hyperfeatures aggregator: no network to save yet; it is built on first use "
                "(call network_for(layers, timesteps) or aggregate some features first)"
            )
        return save_checkpoint(path, self._network, extra=extra, tensors=tensors)

    def read_checkpoint(self, path: str | os.PathLike[str]) -> TrainingCheckpoint:
        """The weights, extra tensors and metadata of a file written by :meth:`save`.

        Anything else (a missing file, another format, a safetensors file
        without diffeat metadata) is refused with :func:`load_checkpoint`'s message.
        """
        ckpt = load_checkpoint(path)
        return TrainingCheckpoint(ckpt.state_dict, ckpt.tensors, ckpt.extra)
