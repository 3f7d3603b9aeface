"""Coordinate transforms between the original image, the model input and feature grids.

Convention (one for the whole library): a point is ``(x, y)`` in pixel-index
coordinates, the centre of the top-left pixel being ``(0, 0)`` and the image
covering ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``. Feature grids use the same
convention in cell units, so mapping a point between two rasters of sizes ``A``
and ``B`` that cover the same extent is ``q = (p + 0.5) * B / A - 0.5``, which
is exactly the sampling rule of bilinear interpolation with
``align_corners=False``. Every resize, pad and grid lookup goes through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffeat.core.errors import DiffeatError

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class ImageTransform:
    """Maps original-image points to model-input points, per axis.

    ``model = (image + 0.5) * scale - 0.5 + offset``: ``scale`` is the resize
    factor per axis and ``offset`` a shift in model pixels (positive for
    padding on the left/top, negative for a crop). A plain squash-resize has
    ``scale = model_size / image_size`` and ``offset = 0``.
    """

    image_size: Size
    model_size: Size
    scale: tuple[float, float]
    offset: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def resize(cls, image_size: Size, model_size: Size) -> ImageTransform:
        """The transform of a resize that squashes the image to ``model_size``."""
        (w, h), (mw, mh) = image_size, model_size
        return cls((int(w), int(h)), (int(mw), int(mh)), (mw / w, mh / h))

    def image_to_model(self, points: torch.Tensor) -> torch.Tensor:
        scale = points.new_tensor(self.scale)
        offset = points.new_tensor(self.offset)
        return (points + 0.5) * scale - 0.5 + offset

    def model_to_image(self, points: torch.Tensor) -> torch.Tensor:
        scale = points.new_tensor(self.scale)
        offset = points.new_tensor(self.offset)
        return (points - offset + 0.5) / scale - 0.5

    def image_to_grid(self, points: torch.Tensor, grid_size: Size) -> torch.Tensor:
        """Original-image points to cell coordinates of a grid covering the model input."""
        return rescale_points(self.image_to_model(points), self.model_size, grid_size)

    def grid_to_image(self, points: torch.Tensor, grid_size: Size) -> torch.Tensor:
        return self.model_to_image(rescale_points(points, grid_size, self.model_size))

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "model_size": list(self.model_size),
            "scale": list(self.scale),
            "offset": list(self.offset),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageTransform:
        return cls(
            tuple(int(v) for v in d["image_size"]),  # type: ignore[arg-type]
            tuple(int(v) for v in d["model_size"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["scale"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d.get("offset", (0.0, 0.0))),  # type: ignore[arg-type]
        )


def rescale_points(points: torch.Tensor, from_size: Size, to_size: Size) -> torch.Tensor:
    """Map points between two rasters covering the same extent (align_corners=False)."""
    ratio = points.new_tensor([to_size[0] / from_size[0], to_size[1] / from_size[1]])
    return (points + 0.5) * ratio - 0.5


def grid_size_of(feature_map: torch.Tensor) -> Size:
    """``(width, height)`` of a ``[..., H, W]`` map."""
    return int(feature_map.shape[-1]), int(feature_map.shape[-2])


def _normalised(points: torch.Tensor, grid: Size) -> torch.Tensor:
    size = points.new_tensor([float(grid[0]), float(grid[1])])
    return (points + 0.5) / size * 2.0 - 1.0


def sample_at(feature_map: torch.Tensor, grid_points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``[C, H, W]`` at cell coordinates ``[N, 2]``; returns ``[N, C]``.

    Border padding makes this equal to upsampling with
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` and indexing,
    including at the image edges.
    """
    fmap = feature_map.unsqueeze(0)
    grid = _normalised(grid_points.to(fmap.dtype), grid_size_of(fmap)).view(1, 1, -1, 2)
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0, :].transpose(0, 1)


def sample_rows(feature_map: torch.Tensor, grid_points: torch.Tensor) -> torch.Tensor:
    """Sample ``[C, H, W]`` at a 2-D array of cell coordinates ``[R, W', 2]``; returns ``[C, R, W']``."""
    fmap = feature_map.unsqueeze(0)
    grid = _normalised(grid_points.to(fmap.dtype), grid_size_of(fmap)).unsqueeze(0)
    return F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def resize_map(feature_map: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinearly resize ``[..., C, H, W]`` to ``size = (width, height)``, align_corners=False."""
    if grid_size_of(feature_map) == tuple(size):
        return feature_map
    squeeze = feature_map.ndim == 3
    fmap = feature_map.unsqueeze(0) if squeeze else feature_map
    shape = fmap.shape
    flat = fmap.reshape(-1, *shape[-3:])
    out = F.interpolate(flat, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    out = out.reshape(*shape[:-2], size[1], size[0])
    return out[0] if squeeze else out


def check_points(points: torch.Tensor, image_size: Size, what: str = "point") -> None:
    """Raise a :class:`DiffeatError` naming the first point that lies outside the image."""
    w, h = image_size
    for x, y in points.tolist():
        if not (-0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
            raise DiffeatError(
                f"{what} ({x:g}, {y:g}) lies outside the {w}x{h} image; points are (x, y) "
                f"pixel indices with 0 <= x <= {w - 1} and 0 <= y <= {h - 1}"
            )


def pixel_centres(size: Size, rows: slice | None = None) -> torch.Tensor:
    """Pixel-index coordinates ``[H, W, 2]`` (x, y) of an image of ``size``, optionally some rows."""
    w, h = size
    rows = rows or slice(0, h)
    ys = torch.arange(rows.start, min(rows.stop, h), dtype=torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)
