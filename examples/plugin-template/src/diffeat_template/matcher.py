"""A ratio-test matcher: nearest neighbour, kept only when clearly better than the second.

Lowe's ratio test on cosine distances: a match is valid when the distance to
the nearest target cell is below ``ratio`` times the distance to the nearest
cell outside its neighbourhood. Invalid matches still return their nearest
point (``valid = False``); evaluation counts them as not matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diffeat.core.components import Matcher, MatchResult, View
from diffeat.core.geometry import sample_at


@dataclass
class RatioOptions:
    """Options of ``[matcher] plugin = "template-ratio"``."""

    ratio: float = field(default=0.9, metadata={"help": "valid when d1 < ratio * d2"})
    exclude: int = field(
        default=1, metadata={"help": "cells around the nearest one left out of the second search"}
    )

    def validate(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.exclude < 0:
            raise ValueError(f"exclude must be >= 0, got {self.exclude}")


class RatioMatcher(Matcher):
    """Cosine nearest neighbour on the target grid with a ratio test."""

    Options = RatioOptions

    def __init__(self, options: RatioOptions | None = None) -> None:
        self.options = options or RatioOptions()
        self.options.validate()

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        assert source.descriptors is not None and target.descriptors is not None
        query = F.normalize(sample_at(source.descriptors, source.image_to_grid(points)), dim=1)
        c, h, w = target.descriptors.shape
        cells = F.normalize(target.descriptors.reshape(c, -1).T, dim=1)
        dist = 1 - query @ cells.T  # [N, h * w] cosine distances
        d1, idx = dist.min(dim=1)
        x, y = idx % w, idx // w
        gx = torch.arange(w).view(1, -1).expand(h, -1).reshape(-1)
        gy = torch.arange(h).view(-1, 1).expand(-1, w).reshape(-1)
        near = ((gx[None] - x[:, None]).abs() <= self.options.exclude) & (
            (gy[None] - y[:, None]).abs() <= self.options.exclude
        )
        d2 = dist.masked_fill(near, float("inf")).min(dim=1).values
        valid = d1 < self.options.ratio * d2
        grid = torch.stack([x.float(), y.float()], dim=1)
        return MatchResult(target.grid_to_image(grid), 1 - d1, valid)
