"""The Diffusion Hyperfeatures aggregation network (Luo et al., NeurIPS 2023).

A reproduction of ``archs/aggregation_network.py`` of the official code: one
detectron2 ``BottleneckBlock`` (GroupNorm) per layer, shared across timesteps,
and one learned mixing weight per (timestep, layer), softmaxed jointly. The
module and parameter names follow the official ``state_dict`` (e.g.
``bottleneck_layers.0.0.conv1.weight``, ``bottleneck_layers.0.0.conv1.norm.weight``,
``mixing_weights``), so its weights can be converted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the ``format`` of :meth:`AggregationNetwork.describe`; bumped on incompatible changes
FORMAT = "diffeat-hyperfeatures/1"


class Conv2dNorm(nn.Conv2d):
    """``nn.Conv2d`` followed by its ``norm`` submodule and an optional activation.

    detectron2's ``Conv2d`` wrapper: the norm lives inside the convolution, so
    its parameters are named ``<conv>.norm.weight`` / ``<conv>.norm.bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        norm: nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _msra_fill(conv: nn.Conv2d) -> None:
    """fvcore's ``c2_msra_fill``: He-normal weights (fan_out, ReLU gain), zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)


class BottleneckBlock(nn.Module):
    """detectron2's ResNet bottleneck block (stride 1, GroupNorm).

    ``relu(conv3(relu(conv2(relu(conv1(x))))) + shortcut(x))`` with 1x1, 3x3
    (padding 1) and 1x1 bias-free convolutions, each followed by its GroupNorm;
    the shortcut is a 1x1 convolution + GroupNorm when the channel count
    changes, else the identity (``shortcut`` is then ``None``, as upstream).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels

        def gn(channels: int) -> nn.GroupNorm:
            return nn.GroupNorm(norm_groups, channels)

        self.shortcut: Conv2dNorm | None = None
        if in_channels != out_channels:
            self.shortcut = Conv2dNorm(
                in_channels, out_channels, 1, bias=False, norm=gn(out_channels)
            )
        self.conv1 = Conv2dNorm(
            in_channels, bottleneck_channels, 1, bias=False, norm=gn(bottleneck_channels)
        )
        self.conv2 = Conv2dNorm(
            bottleneck_channels,
            bottleneck_channels,
            3,
            padding=1,
            bias=False,
            norm=gn(bottleneck_channels),
        )
        self.conv3 = Conv2dNorm(
            bottleneck_channels, out_channels, 1, bias=False, norm=gn(out_channels)
        )
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is not None:
                _msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut)


def _layer_list(layers: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    out = [(str(name), int(channels)) for name, channels in layers]
    if not out:
        raise ValueError("the aggregation network needs at least one layer")
    names = [name for name, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"layer names must be unique; {dupes} appear more than once")
    bad = [(n, c) for n, c in out if c < 1]
    if bad:
        raise ValueError(f"layers need a positive channel count, got {bad}")
    return out


class AggregationNetwork(nn.Module):
    """Per-layer bottlenecks, shared across timesteps, mixed by softmaxed learned weights.

    ``layers`` are ``(name, channels)`` in the extractor's order; ``timesteps``
    the values along the features' timestep axis; ``size`` the output grid
    ``(width, height)`` every input map is bilinearly resized to first.
    Mixing weight ``i`` (of ``T * L``, timestep-major) belongs to layer
    ``i % L`` at timestep ``i // L``.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, int]],
        timesteps: Sequence[int],
        projection_dim: int = 384,
        norm_groups: int = 32,
        size: tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__()
        self.layers = _layer_list(layers)
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps:
            raise ValueError("the aggregation network needs at least one timestep")
        if projection_dim < 1 or projection_dim % (4 * norm_groups):
            raise ValueError(
                f"projection_dim must be a positive multiple of 4 * norm_groups "
                f"(= {4 * norm_groups}) so both GroupNorms divide evenly, got {projection_dim}"
            )
        if len(size) != 2 or any(int(v) < 1 for v in size):
            raise ValueError(f"size must be (width, height) with positive values, got {size}")
        self.projection_dim = int(projection_dim)
        self.norm_groups = int(norm_groups)
        self.size = (int(size[0]), int(size[1]))
        self.bottleneck_layers = nn.ModuleList(
            nn.Sequential(
                BottleneckBlock(
                    channels,
                    self.projection_dim,
                    bottleneck_channels=self.projection_dim // 4,
                    norm_groups=self.norm_groups,
                )
            )
            for _, channels in self.layers
        )
        self.mixing_weights = nn.Parameter(torch.ones(len(self.timesteps) * len(self.layers)))

    # -- description -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The architecture as JSON-able data (stored in checkpoints)."""
        return {
            "format": FORMAT,
            "layers": [{"name": name, "channels": channels} for name, channels in self.layers],
            "timesteps": list(self.timesteps),
            "projection_dim": self.projection_dim,
            "norm_groups": self.norm_groups,
            "size": list(self.size),
        }

    @classmethod
    def from_description(cls, desc: Mapping[str, Any]) -> AggregationNetwork:
        """A freshly initialised network of the architecture :meth:`describe` returned."""
        if desc.get("format") != FORMAT:
            raise ValueError(f"unknown network format {desc.get('format')!r}; expected {FORMAT!r}")
        try:
            layers = [(str(d["name"]), int(d["channels"])) for d in desc["layers"]]
            return cls(
                layers,
                [int(t) for t in desc["timesteps"]],
                projection_dim=int(desc["projection_dim"]),
                norm_groups=int(desc["norm_groups"]),
                size=(int(desc["size"][0]), int(desc["size"][1])),
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"incomplete network description: {exc!r}") from None

    def mixing_weight_grid(self) -> torch.Tensor:
        """Softmaxed mixing weights as ``[L, T]`` (rows: layers, columns: timesteps), on CPU."""
        t, n = len(self.timesteps), len(self.layers)
        with torch.no_grad():
            return F.softmax(self.mixing_weights.float(), dim=0).view(t, n).T.contiguous().cpu()

    # -- forward -------------------------------------------------------------------------------

    def _checked(self, maps: Mapping[str, torch.Tensor], name: str, channels: int) -> torch.Tensor:
        if name not in maps:
            raise ValueError(
                f"layer {name!r} is missing from the input; the network takes "
                f"{[n for n, _ in self.layers]}, got {list(maps)}"
            )
        x = maps[name]
        if x.ndim != 5:
            raise ValueError(f"layer {name!r}: expected [B, T, C, H, W], got {tuple(x.shape)}")
        if x.shape[1] != len(self.timesteps):
            raise ValueError(
                f"layer {name!r} has {x.shape[1]} timesteps; the network was built for "
                f"{len(self.timesteps)} ({self.timesteps})"
            )
        if x.shape[2] != channels:
            raise ValueError(
                f"layer {name!r} has {x.shape[2]} channels; the network was built for {channels}"
            )
        return x

    def forward(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``maps[name]`` is ``[B, T, C, h, w]``; returns ``[B, projection_dim, H, W]``.

        Every layer's block runs once on all of its timesteps (``[B*T, C, H, W]``).
        """
        w_grid = F.softmax(self.mixing_weights, dim=0).view(len(self.timesteps), len(self.layers))
        width, height = self.size
        out: torch.Tensor | None = None
        for index, ((name, channels), block) in enumerate(zip(self.layers, self.bottleneck_layers)):
            x = self._checked(maps, name, channels)
            x = x.to(device=self.mixing_weights.device, dtype=self.mixing_weights.dtype)
            b, t = x.shape[:2]
            x = x.reshape(b * t, *x.shape[2:])
            if tuple(x.shape[-2:]) != (height, width):
                x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
            y = block(x).view(b, t, self.projection_dim, height, width)
            part = (y * w_grid[:, index].view(1, t, 1, 1, 1)).sum(dim=1)
            out = part if out is None else out + part
        assert out is not None  # at least one layer, checked in __init__
        return out
