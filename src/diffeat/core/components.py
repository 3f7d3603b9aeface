"""The component contracts: extractor, aggregator, matcher, and the views they exchange.

Components are plain classes; these base classes document the protocol and
give sensible defaults. A third-party component need not inherit from them,
but must provide the same methods (``diffeat.testing.ExtractorConformance``
checks an extractor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size, grid_size_of
from diffeat.core.images import ImageInput


class Extractor:
    """Turns images into per-layer, per-timestep feature maps.

    Subclasses set ``Options`` (a dataclass, see :mod:`diffeat.core.options`)
    and implement :meth:`layers`, :meth:`timesteps`, :meth:`model_identity`
    and :meth:`extract`.
    """

    #: images per call of :meth:`extract` the pipeline should aim for
    batch_size: int = 1

    def layers(self) -> list[LayerInfo]:
        """The layers this extractor returns, known before running on any image."""
        raise NotImplementedError

    def timesteps(self) -> tuple[int, ...]:
        """The timesteps along the first axis of every layer's ``[T, C, H, W]`` map."""
        return (0,)

    def model_identity(self) -> dict[str, Any]:
        """What identifies the weights (id and revision, or a content fingerprint)."""
        return {}

    def transform_for(self, image_size: Size) -> ImageTransform:
        """The image -> model-input transform applied to an image of ``image_size``."""
        raise NotImplementedError

    def extract(self, images: Sequence[ImageInput]) -> list[FeatureSet]:
        """Features for each image; ``meta["transform"]`` must be set."""
        raise NotImplementedError

    def conditioning(self, image: ImageInput) -> str:
        """What, besides the pixels and the config, this image's features depend on.

        Empty for most extractors; a category-aware one returns e.g. its
        per-image prompt. The store keys the image by its content plus this.
        """
        return ""


class Aggregator:
    """Turns a :class:`FeatureSet` into one descriptor map ``[C, H, W]``."""

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class View:
    """One image as a matcher sees it.

    ``descriptors`` (``[C, h, w]``, a grid covering the model input) is set when
    the pipeline has an extractor and aggregator; query-conditioned matchers
    use ``image`` (and their own model) instead.
    """

    image: Image.Image
    transform: ImageTransform
    descriptors: torch.Tensor | None = None
    features: FeatureSet | None = None
    source: str = "<memory>"

    @property
    def image_size(self) -> Size:
        return self.image.size

    @property
    def grid_size(self) -> Size:
        if self.descriptors is None:
            raise ValueError("this view carries no descriptors")
        return grid_size_of(self.descriptors)

    def image_to_grid(self, points: torch.Tensor) -> torch.Tensor:
        return self.transform.image_to_grid(points, self.grid_size)

    def grid_to_image(self, points: torch.Tensor) -> torch.Tensor:
        return self.transform.grid_to_image(points, self.grid_size)


@dataclass
class MatchResult:
    """Target points ``[N, 2]`` (x, y, target pixel indices), scores ``[N]`` and validity ``[N]``."""

    points: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "target": [round(float(x), 3), round(float(y), 3)],
                "score": float(s),
                "valid": bool(v),
            }
            for (x, y), s, v in zip(self.points.tolist(), self.scores.tolist(), self.valid.tolist())
        ]


class Matcher:
    """Finds target points for source points.

    Set ``needs_descriptors = False`` for a query-conditioned method that works
    from the views' images alone; the pipeline then skips extraction.
    """

    needs_descriptors: bool = True

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        raise NotImplementedError
