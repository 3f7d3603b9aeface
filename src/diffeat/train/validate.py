"""Validation during training: PCK of the network being trained, through the pipeline's matcher.

For each pair the stored features of both images go through the network
(no gradients), become :class:`~diffeat.core.components.View` objects as
``Pipeline.view`` builds them (descriptors + the features' transform), and the
pipeline's matcher predicts the target points of the visible source points
(clipped into the source image, as the evaluation does). PCK is the official
``compute_pck``: a point is correct when its distance is ``<= alpha * T``,
``T`` the longest side of the target image (``img``) or of the target box
(``bbox``), pooled over all points of all pairs. The validation loss is the
training loss on the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffeat.core.components import View
from diffeat.core.datasets import Pair
from diffeat.core.geometry import Size
from diffeat.eval.pck import correct, distances, threshold_of
from diffeat.eval.runner import ImageCache
from diffeat.train.loss import correspondence_loss


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


def validate(
    pipeline: Any,
    aggregator: Any,
    items: Sequence[ValPair],
    *,
    alpha: float,
    temperature: float,
    device: torch.device | str = "cpu",
    progress: Any = None,
) -> dict[str, Any]:
    """PCK@alpha (img and, where every pair has one, bbox) and mean loss over ``items``.

    Features are read onto ``device`` (the store casts them there).
    """
    store, key, matcher = pipeline.store, pipeline.cache_key, pipeline.matcher
    images = ImageCache(64)
    hits = {"img": 0, "bbox": 0}
    points = 0
    losses: list[float] = []
    boxes = has_boxes(items)
    with torch.no_grad():
        for item in items:
            pair = item.pair
            src_fs = store.get(key, item.source_key, device=device)
            tgt_fs = store.get(key, item.target_key, device=device)
            desc = aggregator.forward_features([src_fs, tgt_fs]).float()
            losses.append(
                float(
                    correspondence_loss(
                        desc[0],
                        desc[1],
                        torch.from_numpy(item.source_cells),
                        torch.from_numpy(item.target_cells),
                        temperature,
                    )
                )
            )
            src_img, tgt_img = images.get(pair.source), images.get(pair.target)
            vis = np.flatnonzero(pair.visible)
            w, h = src_img.size
            query = np.clip(pair.source_points[vis], 0, [w - 1, h - 1])
            src_view = View(src_img.image, src_fs.transform, desc[0], src_fs, str(pair.source))
            tgt_view = View(tgt_img.image, tgt_fs.transform, desc[1], tgt_fs, str(pair.target))
            result = matcher.match(src_view, tgt_view, torch.as_tensor(query, dtype=torch.float32))
            predicted = result.points.detach().cpu().double().numpy().reshape(-1, 2)
            dist = distances(predicted, pair.target_points[vis])
            points += len(dist)
            t_img = threshold_of("img", target_size=item.target_size)
            hits["img"] += int(correct(dist, t_img, alpha).sum())
            if boxes:
                t_box = threshold_of("bbox-target", target_bbox=pair.target_bbox)
                hits["bbox"] += int(correct(dist, t_box, alpha).sum())
            if progress is not None:
                progress.update(1)
    return {
        "pck_img": hits["img"] / points if points else None,
        "pck_bbox": (hits["bbox"] / points if points else None) if boxes else None,
        "loss": float(np.mean(losses)) if losses else None,
        "pairs": len(items),
        "points": points,
        "alpha": alpha,
    }
