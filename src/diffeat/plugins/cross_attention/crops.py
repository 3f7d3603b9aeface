"""The official recipe's image arithmetic: squashing, random crops with the margin rule,
the Gaussian target and the argmax, each as Hedlin et al.'s code computes it."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def squashed(image: Image.Image, size: int) -> torch.Tensor:
    """``[3, size, size]`` in [0, 1]: the image resized (PIL bilinear) to a square, as the
    official datasets' ``Resize((512, 512))`` then ``ToTensor``."""
    rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div(255)


def crop_side(size: int, crop_percent: float) -> int:
    """The crop side in pixels: ``int(size * percent / 100)``."""
    return int(size * crop_percent / 100)


def crop_bounds(p: float, size: int, crop: int, margin: float) -> tuple[int, int]:
    """The range ``[lo, hi]`` of crop starts along one axis that keep ``p`` at least
    ``int(crop * margin)`` pixels from the crop's border where the slack allows."""
    safe = int(crop * margin)
    lo = min(max(0.0, p - crop + safe), size - crop)
    hi = min(max(0.0, p - safe), size - crop)
    return int(lo), int(hi)


def draw_crop(
    point: tuple[float, float], size: int, crop: int, margin: float, generator: torch.Generator
) -> tuple[int, int]:
    """A random crop start ``(x0, y0)``: one ``randint`` for x, then one for y."""
    (xl, xh), (yl, yh) = (crop_bounds(p, size, crop, margin) for p in point)
    x0 = int(torch.randint(xl, xh + 1, (1,), generator=generator).item())
    y0 = int(torch.randint(yl, yh + 1, (1,), generator=generator).item())
    return x0, y0


def crop_resized(image: torch.Tensor, x0: int, y0: int, crop: int) -> torch.Tensor:
    """``[3, S, S]`` -> the crop at ``(x0, y0)`` resized back to ``S`` (bilinear, no antialias)."""
    size = image.shape[-1]
    part = image[None, :, y0 : y0 + crop, x0 : x0 + crop]
    return F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False)[0]


def gaussian_target(
    point: tuple[float, float], x0: int, y0: int, crop: int, size: int, sigma: float
) -> torch.Tensor:
    """``[S, S]``: an unnormalised Gaussian (peak 1) at the point in the resized crop's frame,
    pixel ``(i, j)`` at integer coordinates, as the official ``gaussian_circle``."""
    pos = (torch.tensor(point, dtype=torch.float32) - torch.tensor([x0, y0])) / crop * size
    grid = torch.arange(size)
    dist = (grid[None, :] - pos[0]) ** 2 + (grid[:, None] - pos[1]) ** 2
    return torch.exp(-1 * dist / (2.0 * sigma**2.0))


def argmax_point(canvas: torch.Tensor) -> tuple[float, float]:
    """The pixel ``(x, y)`` of the maximum of a square ``[S, S]`` map, as float32 values."""
    side = canvas.shape[-1]
    idx = torch.argmax(canvas.reshape(-1))
    pix = torch.stack([idx % side, torch.div(idx, side, rounding_mode="floor")])
    loc = pix / side * side
    return float(loc[0]), float(loc[1])


def stream_seed(seed: int, kind: str, point: tuple[float, float], restart: int) -> int:
    """The seed of one optimisation's (or one inference's) draws: a point's stream does not
    depend on which other points or restarts share its UNet calls."""
    text = f"{seed}:{kind}:{point[0]!r}:{point[1]!r}:{restart}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
