"""Fixed aggregators: ``select``, ``mean`` and ``concat``.

``fuse`` and ``hyperfeatures`` are plugins of their own (:mod:`diffeat.plugins.fuse`,
:mod:`diffeat.plugins.hyperfeatures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from diffeat.core.components import Aggregator
from diffeat.core.errors import ConfigError
from diffeat.core.features import FeatureSet
from diffeat.core.geometry import Size, grid_size_of, resize_map
from diffeat.core.hookspecs import Register, hookimpl
from diffeat.core.options import opt


def _layer(features: FeatureSet, name: str) -> torch.Tensor:
    if not name:
        return next(iter(features.layers.values()))
    try:
        return features.layers[name]
    except KeyError:
        raise ConfigError(
            f"aggregator asks for layer {name!r}; the features have {list(features.layers)}"
        ) from None


def _chosen(features: FeatureSet, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: _layer(features, n) for n in names} if names else dict(features.layers)


def _target_size(maps: list[torch.Tensor], size: list[int]) -> Size:
    if size:
        return (int(size[0]), int(size[1]))
    return max((grid_size_of(m) for m in maps), key=lambda s: s[0] * s[1])


@dataclass
class SelectOptions:
    layer: str = opt("", "layer name; empty: the first (or only) layer")
    timestep_index: int = opt(0, "index along the timestep axis (negative counts from the end)")


class Select(Aggregator):
    """One layer at one timestep, as DIFT uses it."""

    Options = SelectOptions

    def __init__(self, options: SelectOptions | None = None) -> None:
        self.options = options or SelectOptions()

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        return _layer(features, self.options.layer)[self.options.timestep_index]


@dataclass
class MeanOptions:
    layers: list[str] = opt([], "layers to average (same channel count); empty: all")
    size: list[int] = opt([], "common grid [width, height]; empty: the finest layer's grid")


class Mean(Aggregator):
    """Mean over timesteps and over layers of equal width, on a common grid."""

    Options = MeanOptions

    def __init__(self, options: MeanOptions | None = None) -> None:
        self.options = options or MeanOptions()

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        maps = [m.mean(dim=0) for m in _chosen(features, self.options.layers).values()]
        channels = {m.shape[0] for m in maps}
        if len(channels) > 1:
            raise ConfigError(
                f"mean aggregator: layers have different channel counts {sorted(channels)}; "
                f"use the concat aggregator or choose layers of equal width"
            )
        size = _target_size(maps, self.options.size)
        return torch.stack([resize_map(m, size) for m in maps]).mean(dim=0)


@dataclass
class ConcatOptions:
    layers: list[str] = opt([], "layers to concatenate, in order; empty: all")
    normalize: bool = opt(True, "L2-normalise each layer over channels before concatenating")
    timesteps: Literal["mean", "concat"] = opt("mean", "average timesteps, or concatenate them")
    size: list[int] = opt([], "common grid [width, height]; empty: the finest layer's grid")


class Concat(Aggregator):
    """Per-layer L2 normalisation, resize to a common grid, channel concatenation."""

    Options = ConcatOptions

    def __init__(self, options: ConcatOptions | None = None) -> None:
        self.options = options or ConcatOptions()

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        parts = []
        for m in _chosen(features, self.options.layers).values():
            if self.options.timesteps == "mean":
                parts.append(m.mean(dim=0))
            else:
                parts.extend(m.unbind(dim=0))
        size = _target_size(parts, self.options.size)
        out = []
        for m in parts:
            m = resize_map(m, size)
            out.append(F.normalize(m, dim=0) if self.options.normalize else m)
        return torch.cat(out, dim=0)


@hookimpl
def register_aggregators(register: Register) -> None:
    register("select", Select)
    register("mean", Mean)
    register("concat", Concat)
