"""PCK@alpha (percentage of correct keypoints) with every protocol option.

A predicted keypoint is correct when its distance ``d`` to the ground truth is
within ``alpha`` of the reference length ``T``. Two settings decide the exact
test, as the official evaluators differ in both:

- the comparison, ``<=`` or (strictly) ``<``;
- the arithmetic: ``multiply`` tests ``d <= alpha * T`` (the CATs/DHPF-derived
  evaluators, Diffusion Hyperfeatures, SD-DINO); ``divide`` tests
  ``d / T <= alpha`` (DIFT's ``eval_spair.py``). They are not the same test in
  floating point: for ``T = 41`` and ``d = 4.1000000000000005``,
  ``d <= 0.1 * 41`` holds and ``d / 41 <= 0.1`` does not, and for
  ``T = 155``, ``d = 15.500000000000002`` the other way round. Such distances
  come from fractional (sub-pixel) predictions; integer (argmax) predictions
  against integer keypoints and boxes rarely reach them.

The reference length ``T`` of a pair is one of:

- ``bbox-target``: ``max(w, h)`` of the target bounding box (DIFT, SD-DINO,
  Hyperfeatures' ``alpha_bbox``);
- ``bbox-source``: the same of the *source* box (the SPair evaluation of
  Hedlin et al.);
- ``img``: ``max(w, h)`` of the target image (``alpha_img``);
- ``kps-target`` / ``kps-source``: ``max(w, h)`` of the extent of the pair's
  scored keypoints in the target / source image (PF-Willow's ``alpha_bbox``);
- ``kps-target-padded``: ``max(x, y) + 1`` over the scored target keypoints:
  the extent as Hedlin et al.'s PF-Willow loader computes it, ``max - min`` over
  keypoints padded with ``-1`` (the padding is the minimum);
- ``bbox-target-wscale``: ``max(w, h)`` of the target box times ``S / W`` (the
  frame over the target image's *width*) in a framed evaluation: Hedlin et
  al.'s CUB loader scales both sides by the width's factor.

The frame: by default distances and thresholds are in the images' own pixels.
A protocol with ``frame = S`` measures them in the ``S x S`` squashed frame of
each image, as Hedlin et al.'s CATs-derived evaluator does: every x is scaled by
``S / W`` and every y by ``S / H`` of its own image (target points and
predictions by the target's, source points and box by the source's) before
distances and thresholds are taken; ``img`` is then ``S``.

A box with ``x1 < x0`` or ``y1 < y0`` is normalised: only ``|x1 - x0|`` and
``|y1 - y0|`` enter. A threshold must be finite and ``>= 0`` (a zero one
counts only exact hits with ``<=`` and ``multiply``, nothing otherwise).

Which keypoints are scored is decided by the ground truth alone: every
keypoint visible in both images. A distance of ``NaN`` marks one that is not.
A scored keypoint whose prediction is unusable (a non-finite coordinate, or
marked ``valid = False`` by the matcher) has the distance ``+inf``: it counts
as wrong under every threshold, as in every official evaluator (none of them
leaves a keypoint out because of its prediction), and it is counted
(``invalid``). A prediction outside the image is scored by its distance, as
the official evaluators do (they never check bounds); moving it onto the image
could only bring it closer to a ground truth inside the image.

Averages:

- per image: the mean over pairs of each pair's fraction correct (pairs with
  no scored keypoint are left out, and counted);
- per point: all correct keypoints / all scored keypoints;
- per category: both of the above within each category; the *mean of
  categories* is their unweighted mean over the categories present, the
  *pair-weighted mean of categories* weights each category by its number of
  pairs (SD-DINO's "Weighted PCK": on the full SPair-71k test set its fixed
  weights are exactly the categories' pair counts).

Everything is plain numpy in float64; values are fractions in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Comparison = Literal["<=", "<"]
COMPARISONS: tuple[str, ...] = ("<=", "<")
Arithmetic = Literal["multiply", "divide"]
#: ``multiply``: ``d <= alpha * T``; ``divide``: ``d / T <= alpha`` (see the module doc)
ARITHMETICS: tuple[str, ...] = ("multiply", "divide")
THRESHOLDS: tuple[str, ...] = (
    "bbox-target",
    "bbox-source",
    "img",
    "kps-target",
    "kps-source",
    "kps-target-padded",
    "bbox-target-wscale",
)
AVERAGES: tuple[str, ...] = (
    "per-image",
    "per-point",
    "category-mean-per-image",
    "category-mean-per-point",
    "category-weighted-per-point",
)


def box_side(box: Sequence[float]) -> float:
    """``max(|x1 - x0|, |y1 - y0|)`` of a box ``(x0, y0, x1, y1)`` (flipped corners allowed)."""
    if box is None or len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    return max(abs(x1 - x0), abs(y1 - y0))


def keypoint_extent(points: Any, mask: Any = None) -> float:
    """``max(w, h)`` of the bounding box of ``points`` ``[N, 2]`` (those with ``mask``)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if mask is not None:
        pts = pts[np.asarray(mask, dtype=bool).reshape(-1)]
    if len(pts) == 0:
        raise ValueError("the keypoint extent needs at least one keypoint")
    span = pts.max(axis=0) - pts.min(axis=0)
    return float(span.max())


def frame_scale(size: Sequence[float] | None, frame: int) -> np.ndarray:
    """``[S / W, S / H]`` of an image of ``size`` ``(W, H)`` for the frame ``S`` (``[1, 1]``
    when ``frame`` is 0: the image's own pixels)."""
    if not frame:
        return np.ones(2)
    if size is None:
        raise ValueError(f"measuring in the {frame} x {frame} frame needs the image size")
    w, h = (float(v) for v in list(size)[:2])
    return np.array([frame / w, frame / h])


def _scaled_box(box: Sequence[float] | None, scale: np.ndarray) -> tuple[float, ...] | None:
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1])


def threshold_of(
    kind: str,
    *,
    source_bbox: Sequence[float] | None = None,
    target_bbox: Sequence[float] | None = None,
    target_size: Sequence[int] | None = None,
    source_points: Any = None,
    target_points: Any = None,
    visible: Any = None,
    source_size: Sequence[int] | None = None,
    frame: int = 0,
) -> float:
    """The reference length ``T`` of one pair for a threshold ``kind`` (see module doc), in
    the images' own pixels or, with ``frame = S``, in the ``S x S`` squashed frame (which
    needs ``target_size`` and, for the source's box or points, ``source_size``)."""
    if frame:
        t_scale = frame_scale(target_size, frame)
        if kind == "bbox-target-wscale":
            if target_bbox is None:
                raise ValueError(f"threshold {kind!r} needs the target bounding box")
            return box_side(target_bbox) * float(t_scale[0])
        if kind == "img":
            return float(frame)
        s_scale = frame_scale(source_size, frame) if kind.endswith("source") else t_scale
        return threshold_of(
            kind,
            source_bbox=_scaled_box(source_bbox, s_scale),
            target_bbox=_scaled_box(target_bbox, t_scale),
            source_points=None
            if source_points is None
            else np.asarray(source_points, dtype=np.float64).reshape(-1, 2) * s_scale,
            target_points=None
            if target_points is None
            else np.asarray(target_points, dtype=np.float64).reshape(-1, 2) * t_scale,
            visible=visible,
        )
    if kind == "bbox-target-wscale":
        kind = "bbox-target"  # in the images' own pixels, the plain target box
    if kind == "kps-target-padded":
        if target_points is None:
            raise ValueError(f"threshold {kind!r} needs the target keypoints")
        pts = np.asarray(target_points, dtype=np.float64).reshape(-1, 2)
        if visible is not None:
            pts = pts[np.asarray(visible, dtype=bool).reshape(-1)]
        if len(pts) == 0:
            raise ValueError(f"threshold {kind!r} needs at least one keypoint")
        return float(pts.max()) + 1.0
    if kind == "bbox-target":
        if target_bbox is None:
            raise ValueError("threshold 'bbox-target' needs the target bounding box")
        return box_side(target_bbox)
    if kind == "bbox-source":
        if source_bbox is None:
            raise ValueError("threshold 'bbox-source' needs the source bounding box")
        return box_side(source_bbox)
    if kind == "img":
        if target_size is None:
            raise ValueError("threshold 'img' needs the target image size")
        w, h = (float(v) for v in list(target_size)[:2])
        return max(w, h)
    if kind == "kps-target":
        if target_points is None:
            raise ValueError("threshold 'kps-target' needs the target keypoints")
        return keypoint_extent(target_points, visible)
    if kind == "kps-source":
        if source_points is None:
            raise ValueError("threshold 'kps-source' needs the source keypoints")
        return keypoint_extent(source_points, visible)
    raise ValueError(f"unknown PCK threshold {kind!r}: use one of {', '.join(THRESHOLDS)}")


def usable_predictions(predicted: Any, valid: Any = None) -> np.ndarray:
    """Which predictions ``[N, 2]`` can be scored: finite coordinates and (if given) ``valid``."""
    pred = np.asarray(predicted, dtype=np.float64).reshape(-1, 2)
    ok = np.isfinite(pred).all(axis=1)
    if valid is not None:
        flags = np.asarray(valid, dtype=bool).reshape(-1)
        if len(flags) != len(ok):
            raise ValueError(f"validity has {len(flags)} entries for {len(ok)} points")
        ok &= flags
    return ok


def distances(
    predicted: Any,
    target: Any,
    visible: Any = None,
    valid: Any = None,
    *,
    scale: Sequence[float] | None = None,
) -> np.ndarray:
    """Euclidean distances ``[N]``: ``NaN`` where ``visible`` is false (not scored), ``+inf``
    where the keypoint is scored but the prediction is unusable (a non-finite coordinate, or
    ``valid`` false): such a keypoint counts as wrong. ``scale`` ``(sx, sy)`` multiplies both
    point sets first (a framed evaluation, :func:`frame_scale`)."""
    pred = np.asarray(predicted, dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(target, dtype=np.float64).reshape(-1, 2)
    if scale is not None:
        factor = np.asarray(scale, dtype=np.float64).reshape(1, 2)
        pred, gt = pred * factor, gt * factor
    if pred.shape != gt.shape:
        raise ValueError(f"{len(pred)} predicted points for {len(gt)} ground-truth points")
    usable = usable_predictions(pred, valid)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.linalg.norm(np.where(usable[:, None], pred, 0.0) - gt, axis=1)
    d = np.where(usable, d, np.inf)
    if visible is not None:
        mask = np.asarray(visible, dtype=bool).reshape(-1)
        if len(mask) != len(d):
            raise ValueError(f"visibility has {len(mask)} entries for {len(d)} points")
        d = np.where(mask, d, np.nan)
    return d


def outside_image(predicted: Any, size: Sequence[float] | None) -> np.ndarray:
    """Which predictions lie outside an image of ``size`` ``(w, h)``: beyond its pixels'
    area ``[-0.5, w - 0.5] x [-0.5, h - 0.5]`` (pixel centres are integers). Non-finite
    predictions are not "outside" (they are unusable); no size: nothing is outside."""
    pred = np.asarray(predicted, dtype=np.float64).reshape(-1, 2)
    if size is None:
        return np.zeros(len(pred), dtype=bool)
    w, h = (float(v) for v in list(size)[:2])
    with np.errstate(invalid="ignore"):
        out = (pred[:, 0] < -0.5) | (pred[:, 0] > w - 0.5) | (pred[:, 1] < -0.5)
        out |= pred[:, 1] > h - 0.5
    return out & np.isfinite(pred).all(axis=1)


def _check(threshold: float, alpha: float, comparison: str, arithmetic: str) -> None:
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be '<=' or '<', got {comparison!r}")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be 'multiply' or 'divide', got {arithmetic!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"a PCK threshold must be finite and >= 0, got {threshold!r}")


def correct(
    dist: Any,
    threshold: float,
    alpha: float,
    comparison: Comparison | str = "<=",
    arithmetic: Arithmetic | str = "multiply",
) -> np.ndarray:
    """Which keypoints are correct: ``dist <= alpha * threshold`` (``multiply``) or
    ``dist / threshold <= alpha`` (``divide``), or with ``<``; ``NaN`` and ``inf`` -> False."""
    threshold = float(threshold)
    _check(threshold, alpha, comparison, arithmetic)
    d = np.asarray(dist, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if arithmetic == "divide":
            lhs, rhs = d / threshold, float(alpha)
        else:
            lhs, rhs = d, alpha * threshold
        ok = lhs <= rhs if comparison == "<=" else lhs < rhs
    return ok & np.isfinite(d)


@dataclass
class ScoredPair:
    """What PCK needs of one pair: its category, distances and ``T``.

    A distance of ``NaN`` marks a keypoint that is not scored; ``+inf`` one that is scored
    but has no usable prediction (it counts as wrong; see :func:`distances`).
    """

    id: str
    category: str
    distances: np.ndarray
    threshold: float

    def __post_init__(self) -> None:
        self.distances = np.asarray(self.distances, dtype=np.float64).reshape(-1)
        self.threshold = float(self.threshold)

    @property
    def scored(self) -> int:
        """Keypoints scored (visible in both images), usable prediction or not."""
        return int((~np.isnan(self.distances)).sum())

    @property
    def invalid(self) -> int:
        """Scored keypoints without a usable prediction (counted as wrong)."""
        return int(np.isposinf(self.distances).sum())


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _weighted(values: list[tuple[float, int]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total else None


def summarize(
    pairs: Sequence[ScoredPair],
    alphas: Sequence[float],
    comparison: Comparison | str = "<=",
    arithmetic: Arithmetic | str = "multiply",
) -> dict[str, Any]:
    """PCK of ``pairs`` at each alpha: per image, per point, per category, mean of categories.

    Returns ``{"comparison", "arithmetic", "alphas", "pairs", "points", "invalid_points",
    "pairs_without_points", "by_alpha": {"<alpha>": {"per_image", "per_point",
    "category_mean_per_image", "category_mean_per_point", "category_weighted_per_point",
    "correct", "categories": {category: {"per_image", "per_point", "pairs", "points",
    "invalid_points", "correct"}}}}}``; an average over nothing is ``None``.
    ``invalid_points`` counts the scored keypoints without a usable prediction: they are
    in ``points`` and never in ``correct``.
    """
    scored = [p for p in pairs if p.scored > 0]
    out: dict[str, Any] = {
        "comparison": comparison,
        "arithmetic": arithmetic,
        "alphas": [float(a) for a in alphas],
        "pairs": len(scored),
        "points": int(sum(p.scored for p in scored)),
        "invalid_points": int(sum(p.invalid for p in scored)),
        "pairs_without_points": len(pairs) - len(scored),
        "by_alpha": {},
    }
    categories = sorted({p.category for p in scored})
    for alpha in alphas:
        per_pair: list[tuple[str, int, int]] = []  # (category, correct, scored)
        for p in scored:
            ok = correct(p.distances, p.threshold, alpha, comparison, arithmetic)
            per_pair.append((p.category, int(ok.sum()), p.scored))
        cats: dict[str, Any] = {}
        for cat in categories:
            rows = [(c, n) for k, c, n in per_pair if k == cat]
            cats[cat] = {
                "per_image": _mean([c / n for c, n in rows]),
                "per_point": sum(c for c, _ in rows) / sum(n for _, n in rows),
                "pairs": len(rows),
                "points": sum(n for _, n in rows),
                "invalid_points": sum(p.invalid for p in scored if p.category == cat),
                "correct": sum(c for c, _ in rows),
            }
        total = sum(n for _, _, n in per_pair)
        out["by_alpha"][format_alpha(alpha)] = {
            "alpha": float(alpha),
            "per_image": _mean([c / n for _, c, n in per_pair]),
            "per_point": (sum(c for _, c, _ in per_pair) / total) if total else None,
            "category_mean_per_image": _mean([v["per_image"] for v in cats.values()]),
            "category_mean_per_point": _mean([v["per_point"] for v in cats.values()]),
            "category_weighted_per_point": _weighted(
                [(v["per_point"], v["pairs"]) for v in cats.values()]
            ),
            "correct": sum(c for _, c, _ in per_pair),
            "categories": cats,
        }
    return out


def headline(summary: dict[str, Any], alpha: float, average: str) -> float | None:
    """One number of a :func:`summarize` result: ``average`` is one of :data:`AVERAGES`."""
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}: use one of {', '.join(AVERAGES)}")
    return summary["by_alpha"][format_alpha(alpha)][average.replace("-", "_")]


def pck_curve(
    pairs: Sequence[ScoredPair],
    alphas: Sequence[float],
    comparison: Comparison | str = "<=",
    average: str = "per-point",
    arithmetic: Arithmetic | str = "multiply",
) -> list[float | None]:
    """PCK at each alpha under one average (for PCK-vs-alpha plots)."""
    summary = summarize(pairs, alphas, comparison, arithmetic)
    return [headline(summary, a, average) for a in alphas]


def format_alpha(alpha: float) -> str:
    """The key of an alpha in results: ``0.1`` -> ``"0.1"``."""
    return f"{float(alpha):g}"
