"""Validation during training: PCK of the network being trained, through the pipeline's matcher.

For each pair the stored features of both images go through the network
(no gradients), become :class:`~diffeat.core.components.View` objects as
``Pipeline.view`` builds them (descriptors + the features' transform), and the
pipeline's matcher predicts the target points of the visible source points
(clipped into the source image, as the evaluation does). Scoring is the
evaluation's (:mod:`diffeat.eval.pck`), per point: a point is correct when its
distance is ``<= alpha * T``, ``T`` the longest side of the target image
(``img``) or of the target box (``bbox-target``), pooled over all points of all
pairs (the official ``compute_pck``). A point the matcher gives no usable
prediction for (``NaN`` coordinates or ``valid = False``) counts as wrong, as
in the evaluation; their number is reported (``invalid_points``). The
validation loss is the training loss on the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffeat.core.components import Matcher, TrainableAggregator, View
from diffeat.core.datasets import Pair
from diffeat.core.features import FeatureSet
from diffeat.core.geometry import Size
from diffeat.core.images import ImageInput
from diffeat.core.sources import FeatureSource
from diffeat.eval.pck import ScoredPair, distances, headline, summarize, threshold_of
from diffeat.eval.runner import ImageCache, pair_threshold
from diffeat.train.loss import correspondence_loss
from diffeat.train.progress import Bar


@dataclass(frozen=True)
class ValPair:
    """A validation pair with its images' store keys and keypoint cells."""

    pair: Pair
    source_key: str
    target_key: str
    source_cells: np.ndarray
    target_cells: np.ndarray
    target_size: Size


def val_subset(pairs: Sequence[Pair], per_category: int) -> list[Pair]:
    """The first ``per_category`` pairs with keypoints of each category, in dataset order
    (``0``: every pair with keypoints)."""
    out: list[Pair] = []
    counts: dict[str, int] = {}
    for pair in pairs:
        if pair.num_visible == 0:
            continue
        if per_category and counts.get(pair.category, 0) >= per_category:
            continue
        counts[pair.category] = counts.get(pair.category, 0) + 1
        out.append(pair)
    return out


def has_boxes(items: Sequence[ValPair]) -> bool:
    """Whether every validation pair has a target box (then ``bbox`` PCK picks the best step)."""
    return bool(items) and all(item.pair.target_bbox is not None for item in items)


#: the per-point average of :func:`diffeat.eval.pck.summarize` (all correct / all scored)
PER_POINT = "per-point"


@dataclass
class _Predicted:
    """One validated pair: its loss and the distances of its predicted target points."""

    loss: float
    distances: np.ndarray


class Validator:
    """PCK@alpha and loss of the network being trained, on fixed validation pairs.

    ``metric`` names the number that picks the best step: ``pck_bbox`` when
    every pair has a target box, else ``pck_img`` (``None`` without pairs).
    """

    def __init__(
        self,
        source: FeatureSource,
        matcher: Matcher,
        aggregator: TrainableAggregator,
        items: Sequence[ValPair],
        *,
        alpha: float,
        temperature: float,
        device: torch.device | str = "cpu",
    ) -> None:
        self.source = source
        self.matcher = matcher
        self.aggregator = aggregator
        self.items = list(items)
        self.alpha = alpha
        self.temperature = temperature
        self.device = device
        self.boxes = has_boxes(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def metric(self) -> str | None:
        if not self.items:
            return None
        return "pck_bbox" if self.boxes else "pck_img"

    def __call__(self, progress: Bar | None = None) -> dict[str, Any]:
        """``{"pck_img", "pck_bbox", "loss", "pairs", "points", "invalid_points", "alpha"}``
        over every pair.

        Features are read onto the validator's device (the store casts them there).
        """
        images = ImageCache(64)
        scored: dict[str, list[ScoredPair]] = {"img": [], "bbox": []}
        losses: list[float] = []
        with torch.no_grad():
            for item in self.items:
                predicted = self._predict(item, images)
                losses.append(predicted.loss)
                pair = item.pair
                t_img = threshold_of("img", target_size=item.target_size)
                scored["img"].append(ScoredPair(pair.id, pair.category, predicted.distances, t_img))
                if self.boxes:
                    t_box = pair_threshold(pair, "bbox-target")
                    scored["bbox"].append(
                        ScoredPair(pair.id, pair.category, predicted.distances, t_box)
                    )
                if progress is not None:
                    progress.update(1)
        img = summarize(scored["img"], [self.alpha])
        return {
            "pck_img": headline(img, self.alpha, PER_POINT),
            "pck_bbox": self._pck(scored["bbox"]) if self.boxes else None,
            "loss": float(np.mean(losses)) if losses else None,
            "pairs": len(self.items),
            "points": img["points"],
            "invalid_points": img["invalid_points"],
            "alpha": self.alpha,
        }

    def _pck(self, pairs: list[ScoredPair]) -> float | None:
        return headline(summarize(pairs, [self.alpha]), self.alpha, PER_POINT)

    def _predict(self, item: ValPair, images: ImageCache) -> _Predicted:
        """The pair's loss and, for its visible source points, the predicted target points'
        distances to the ground truth."""
        pair = item.pair
        src_fs = self.source.read(item.source_key, device=self.device)
        tgt_fs = self.source.read(item.target_key, device=self.device)
        desc = self.aggregator.forward_features([src_fs, tgt_fs]).float()
        loss = correspondence_loss(
            desc[0],
            desc[1],
            torch.from_numpy(item.source_cells),
            torch.from_numpy(item.target_cells),
            self.temperature,
        )
        src_img, tgt_img = images.get(pair.source), images.get(pair.target)
        vis = np.flatnonzero(pair.visible)
        w, h = src_img.size
        query = np.clip(pair.source_points[vis], 0, [w - 1, h - 1])
        result = self.matcher.match(
            _view(src_img, src_fs, desc[0], pair.source),
            _view(tgt_img, tgt_fs, desc[1], pair.target),
            torch.as_tensor(query, dtype=torch.float32),
        )
        points = result.points.detach().cpu().double().numpy().reshape(-1, 2)
        valid = result.valid.detach().cpu().numpy().reshape(-1).astype(bool)
        return _Predicted(float(loss), distances(points, pair.target_points[vis], valid=valid))


def _view(image: ImageInput, features: FeatureSet, descriptors: torch.Tensor, path: object) -> View:
    """The matcher's view of a validation image, as ``Pipeline.view`` builds it."""
    return View(image.image, features.transform, descriptors, features, str(path))
