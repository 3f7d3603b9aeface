"""Deterministic test extractors and test images.

- :func:`smooth_texture` is a smooth random colour field: locally distinctive,
  no edges, so known-transform tests have something to match.
- :func:`photo_like` adds random shapes to such fields: edges and corners for
  keypoint detectors (homography tests), colours for local descriptors.
- :class:`ColorBlurExtractor` (``color-blur``) is a deterministic
  local-descriptor extractor (colour blurred at several scales: invariant to
  shifts and flips) for known-transform tests of a whole pipeline;
  :class:`MultiColorBlurExtractor` (``color-blur-multi``) gives it several
  layers and timesteps, the shape of the features a trainable aggregator
  learns from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffeat.core.components import Extractor
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size
from diffeat.core.images import ImageInput, resize, to_tensor
from diffeat.core.options import opt

__all__ = [
    "ColorBlurExtractor",
    "ColorBlurOptions",
    "MultiColorBlurExtractor",
    "MultiColorBlurOptions",
    "photo_like",
    "smooth_texture",
]


def smooth_texture(size: Size, *, seed: int = 0, cells: int = 6) -> Image.Image:
    """A smooth random colour field (bicubic-upsampled noise): locally distinctive, no edges."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    small = Image.fromarray(coarse, "RGB")
    return small.resize((w, h), Image.Resampling.BICUBIC)


def photo_like(size: Size, *, seed: int = 0, shapes: int = 40) -> Image.Image:
    """A textured, photo-like test image: smooth colour fields at two scales under
    ``shapes`` random rectangles and ellipses of random colours (corners to detect,
    colours to describe). Deterministic in ``seed``."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    coarse = np.asarray(smooth_texture(size, seed=seed, cells=4), dtype=np.float64)
    fine = np.asarray(smooth_texture(size, seed=seed + 1000, cells=16), dtype=np.float64)
    image = Image.fromarray((0.6 * coarse + 0.4 * fine).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    side = min(w, h)
    for _ in range(shapes):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.03, 0.12, size=2) * side
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        if rng.random() < 0.5:
            draw.rectangle(box, fill=color)
        else:
            draw.ellipse(box, fill=color)
    return image


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@dataclass
class ColorBlurOptions:
    image_size: list[int] = opt([64, 64], "model input [width, height] (squash resize)")
    sigmas: list[float] = opt([0.0, 2.0, 4.0], "blur scales in model pixels")
    stride: int = opt(1, "feature cells per model pixel side (average pooling)")


@dataclass
class MultiColorBlurOptions(ColorBlurOptions):
    layers: int = opt(2, "number of layers: color, color1, ...; layer k is pooled to stride * 2**k")
    timesteps: list[int] = opt(
        [0, 100], "one map per timestep t: the image blurred by t / 100 model pixels first"
    )

    def validate(self) -> None:
        if self.layers < 1:
            raise ValueError(f"layers must be at least 1, got {self.layers}")
        if not self.timesteps or any(t < 0 for t in self.timesteps):
            raise ValueError(
                f"timesteps must be a non-empty list of ints >= 0, got {self.timesteps}"
            )


class ColorBlurExtractor(Extractor):
    """Colour blurred at several scales, one layer ``color`` ``[1, 3*S, H/stride, W/stride]``.

    With :class:`MultiColorBlurOptions` (``layers``, ``timesteps``), layer ``k``
    (``color``, ``color1``, ...) is pooled to stride ``stride * 2**k`` and
    timestep ``t`` blurs the image by ``t / 100`` model pixels first; one layer
    at timestep 0 is exactly the plain extractor.
    """

    Options = ColorBlurOptions
    calls = 0  # counts images extracted across instances, so tests can assert store hits

    def __init__(self, options: ColorBlurOptions | None = None) -> None:
        self.options = options or self.Options()

    @property
    def model_size(self) -> Size:
        w, h = self.options.image_size
        return (int(w), int(h))

    def _layer_strides(self) -> list[tuple[str, int]]:
        count = int(getattr(self.options, "layers", 1))
        stride = int(self.options.stride)
        return [("color" if k == 0 else f"color{k}", stride * 2**k) for k in range(count)]

    def layers(self) -> list[LayerInfo]:
        channels = 3 * len(self.options.sigmas)
        return [LayerInfo(name, channels, float(s)) for name, s in self._layer_strides()]

    def timesteps(self) -> tuple[int, ...]:
        return tuple(int(t) for t in getattr(self.options, "timesteps", [0]))

    def model_identity(self) -> dict[str, Any]:
        return {"model": "color-blur", "version": 1}

    def transform_for(self, image_size: Size) -> ImageTransform:
        return ImageTransform.resize(image_size, self.model_size)

    def extract(self, images: Sequence[ImageInput]) -> list[FeatureSet]:
        out = []
        for im in images:
            type(self).calls += 1
            x = to_tensor(resize(im.image, self.model_size, "bilinear")).unsqueeze(0)
            per_step = []
            for t in self.timesteps():
                xt = _gaussian_blur(x, t / 100.0)  # t = 0: the image itself
                per_step.append(torch.cat([_gaussian_blur(xt, s) for s in self.options.sigmas], 1))
            maps = torch.cat(per_step, dim=0)  # [T, 3*S, H, W]
            layers = {
                name: (F.avg_pool2d(maps, stride) if stride > 1 else maps)
                for name, stride in self._layer_strides()
            }
            meta = {"transform": self.transform_for(im.size).to_dict()}
            out.append(FeatureSet(layers, self.timesteps(), meta))
        return out


class MultiColorBlurExtractor(ColorBlurExtractor):
    """:class:`ColorBlurExtractor` with several layers and timesteps (``color-blur-multi``)."""

    Options = MultiColorBlurOptions
