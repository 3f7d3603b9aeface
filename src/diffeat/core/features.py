"""The feature data model: per image, per-layer ``[T, C, H, W]`` maps plus metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

_LAYER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")


def check_layer_name(name: str) -> str:
    """Return ``name`` if it is a safe layer name (usable as a store key), else raise."""
    if not _LAYER_NAME.match(name) or ".." in name:
        raise ValueError(
            f"invalid layer name {name!r}: use letters, digits and '_', '.', ':', '-' only"
        )
    return name


@dataclass(frozen=True)
class LayerInfo:
    """What an extractor declares about one of its layers before running.

    ``stride`` is the number of model-input pixels per feature cell (the model
    input is the image after preprocessing, see :mod:`diffeat.core.geometry`).
    """

    name: str
    channels: int
    stride: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "channels": self.channels, "stride": self.stride}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerInfo:
        return cls(name=str(d["name"]), channels=int(d["channels"]), stride=float(d["stride"]))


@dataclass
class FeatureSet:
    """Features of one image.

    ``layers`` maps a layer name to a tensor ``[T, C, H, W]`` whose first axis
    follows ``timesteps``. ``meta`` is JSON-serialisable and carries at least
    ``transform`` (the image -> model-input transform as a dict, see
    :class:`diffeat.core.geometry.ImageTransform`).
    """

    layers: dict[str, torch.Tensor]
    timesteps: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.timesteps = tuple(int(t) for t in self.timesteps)
        for name, tensor in self.layers.items():
            check_layer_name(name)
            if tensor.ndim != 4:
                raise ValueError(
                    f"layer {name!r}: expected [T, C, H, W], got {tuple(tensor.shape)}"
                )
            if tensor.shape[0] != len(self.timesteps):
                raise ValueError(
                    f"layer {name!r} has {tensor.shape[0]} timesteps, metadata lists "
                    f"{len(self.timesteps)}"
                )

    @property
    def transform(self):  # -> ImageTransform, imported lazily to keep this module light
        from diffeat.core.geometry import ImageTransform

        return ImageTransform.from_dict(self.meta["transform"])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FeatureSet:
        """A copy with every layer moved to ``device`` and/or cast to ``dtype``."""
        return FeatureSet(
            {k: v.to(device=device, dtype=dtype) for k, v in self.layers.items()},
            self.timesteps,
            dict(self.meta),
        )

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.layers.values())
