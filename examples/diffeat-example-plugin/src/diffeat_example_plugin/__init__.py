"""An example diffeat plugin: one extractor and one matcher, registered by entry point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from diffeat import hookimpl
from diffeat.core.components import Extractor, Matcher, MatchResult, View
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, sample_at
from diffeat.core.images import ImageInput, resize, to_tensor

__version__ = "0.1.0"


@dataclass
class PatchOptions:
    image_size: list[int] = field(
        default_factory=lambda: [64, 64], metadata={"help": "model input [w, h]"}
    )
    patch: int = field(default=3, metadata={"help": "odd neighbourhood side in pixels"})

    def validate(self) -> None:
        if self.patch < 1 or self.patch % 2 == 0:
            raise ValueError(f"patch must be a positive odd number, got {self.patch}")


class PatchExtractor(Extractor):
    """Descriptor of a pixel: the colours of its patch x patch neighbourhood."""

    Options = PatchOptions

    def __init__(self, options: PatchOptions) -> None:
        self.options = options

    def layers(self) -> list[LayerInfo]:
        return [LayerInfo("patches", 3 * self.options.patch**2, 1.0)]

    def model_identity(self) -> dict[str, Any]:
        return {"model": "pixel-patches", "version": __version__}

    def transform_for(self, image_size: tuple[int, int]) -> ImageTransform:
        w, h = self.options.image_size
        return ImageTransform.resize(image_size, (w, h))

    def extract(self, images: Sequence[ImageInput]) -> list[FeatureSet]:
        w, h = self.options.image_size
        k = self.options.patch
        out = []
        for im in images:
            x = to_tensor(resize(im.image, (w, h))).unsqueeze(0)
            x = F.pad(x, (k // 2,) * 4, mode="replicate")
            patches = F.unfold(x, k).view(1, 3 * k * k, h, w)
            meta = {"transform": self.transform_for(im.size).to_dict()}
            out.append(FeatureSet({"patches": patches}, (0,), meta))
        return out


class L2Matcher(Matcher):
    """Euclidean nearest neighbour over the target grid."""

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        q = sample_at(source.descriptors, source.image_to_grid(points))
        c, _, w = target.descriptors.shape
        d = torch.cdist(q, target.descriptors.reshape(c, -1).T)
        dist, idx = d.min(dim=1)
        cells = torch.stack([(idx % w).float(), (idx // w).float()], dim=1)
        return MatchResult(
            target.grid_to_image(cells), -dist, torch.ones(len(idx), dtype=torch.bool)
        )


@hookimpl
def register_extractors(register):
    register("example-patches", PatchExtractor)


@hookimpl
def register_matchers(register):
    register("example-l2", L2Matcher)
