"""One evaluation loop for every dataset.

For each pair: load both images (decoded once per run and kept in a bounded
in-memory cache keyed by path), tag them with the pair's category (so a
``{category}`` prompt template sees it, as DIFT's SPair protocol does), and
call ``pipeline.match(source, target, visible_source_points)``. Then score
with a :class:`~diffeat.eval.protocols.PCKProtocol`.

Source keypoints are clipped into the source image (``0 <= x <= W - 1``);
the number of clipped points is reported, never hidden. A prediction without a
usable point (``NaN``/``inf`` coordinates or ``valid = False``) is scored as
wrong and counted (``invalid_predictions``); a prediction outside the target
image is scored by its distance, as the official evaluators do, and counted
(``outside_image_predictions``). Features computed
versus read from the pipeline's store are counted per image use.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffeat.core.components import needs_descriptors
from diffeat.core.datasets import Dataset, Pair, description_of
from diffeat.core.errors import DiffeatError
from diffeat.core.images import ImageInput, as_input
from diffeat.eval.pck import (
    ScoredPair,
    distances,
    frame_scale,
    outside_image,
    summarize,
    threshold_of,
)
from diffeat.eval.protocols import PCKProtocol

if TYPE_CHECKING:
    from diffeat.core.pipeline import Pipeline
    from diffeat.core.sources import Progress

log = logging.getLogger(__name__)

IMAGE_CACHE = 256  # decoded images kept per run (pairs come grouped by category)


@dataclass
class PairOutcome:
    """The prediction for one pair: ``predicted`` ``[N, 2]`` (NaN where not matched)."""

    pair: Pair
    predicted: np.ndarray
    scores: np.ndarray
    valid: np.ndarray
    seconds: float
    clipped: int = 0
    #: measure distances in the frame x frame squashed target (0: the image's own pixels)
    frame: int = 0

    def distances(self) -> np.ndarray:
        """Distances to the ground truth: ``NaN`` where not scored (not visible in both
        images), ``+inf`` where scored without a usable prediction (counts as wrong); in
        the protocol's frame (see :mod:`diffeat.eval.pck`)."""
        scale = frame_scale(self.pair.target_size, self.frame) if self.frame else None
        return distances(
            self.predicted, self.pair.target_points, self.pair.visible, self.valid, scale=scale
        )

    def invalid(self) -> np.ndarray:
        """``[N]``: scored keypoints without a usable prediction (counted as wrong)."""
        return np.isposinf(self.distances())

    def outside(self) -> np.ndarray:
        """``[N]``: scored keypoints whose usable prediction lies outside the target image
        (scored by their distance)."""
        scored = np.isfinite(self.distances())
        return outside_image(self.predicted, self.pair.target_size) & scored


@dataclass
class RunStats:
    pairs: int = 0
    pairs_without_points: int = 0
    computed: int = 0
    read_from_store: int = 0
    clipped_source_points: int = 0
    invalid_predictions: int = 0
    outside_image_predictions: int = 0
    image_loads: int = 0
    seconds: float = 0.0
    match_seconds: list[float] = field(default_factory=list)
    size_mismatches: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        times = np.asarray(self.match_seconds, dtype=np.float64)
        return {
            "pairs": self.pairs,
            "pairs_without_points": self.pairs_without_points,
            "features": {"computed": self.computed, "read_from_store": self.read_from_store},
            "clipped_source_points": self.clipped_source_points,
            "invalid_predictions": self.invalid_predictions,
            "outside_image_predictions": self.outside_image_predictions,
            "images_decoded": self.image_loads,
            "seconds_total": round(self.seconds, 4),
            "seconds_per_pair_mean": float(times.mean()) if len(times) else None,
            "seconds_per_pair_median": float(np.median(times)) if len(times) else None,
            "size_mismatches": self.size_mismatches,
        }


class ImageCache:
    """Decoded images by path, least recently used dropped beyond ``size``."""

    def __init__(self, size: int = IMAGE_CACHE) -> None:
        self.size = size
        self.loads = 0
        self._items: OrderedDict[str, ImageInput] = OrderedDict()

    def get(self, path: Path) -> ImageInput:
        key = str(path)
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            return item
        item = as_input(path, orientation="raw")
        self.loads += 1
        self._items[key] = item
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return item


def _feature_source(pipeline: Pipeline, inp: ImageInput, seen: set[str], stats: RunStats) -> None:
    """Count whether ``inp``'s features will be computed or read from the store (read:
    stored for every extractor of the pipeline)."""
    if not needs_descriptors(pipeline.matcher):
        return
    if pipeline.store is None:
        stats.computed += 1
        return
    key = pipeline.image_key(inp)
    if key in seen or pipeline.is_stored(inp):
        stats.read_from_store += 1  # every extractor's entry is there
    else:
        stats.computed += 1
    seen.add(key)


def run_pairs(
    pipeline: Pipeline,
    pairs: Iterable[Pair],
    *,
    limit: int | None = None,
    progress: Progress | None = None,
    cache_size: int = IMAGE_CACHE,
) -> tuple[list[PairOutcome], RunStats]:
    """Match every pair (at most ``limit``); returns the outcomes and run statistics."""
    cache = ImageCache(cache_size)
    stats = RunStats()
    outcomes: list[PairOutcome] = []
    stored_keys: set[str] = set()
    start = time.perf_counter()
    for pair in pairs:
        if limit is not None and stats.pairs >= limit:
            break
        stats.pairs += 1
        src = cache.get(pair.source).with_category(pair.category)
        tgt = cache.get(pair.target).with_category(pair.category)
        for inp, given, what in (
            (src, pair.source_size, "source"),
            (tgt, pair.target_size, "target"),
        ):
            if given is not None and tuple(given) != tuple(inp.size):
                stats.size_mismatches.append(
                    {
                        "pair": pair.id,
                        "image": what,
                        "annotation": list(given),
                        "file": list(inp.size),
                    }
                )
        if pair.source_size is None:
            pair.source_size = src.size
        if pair.target_size is None:
            pair.target_size = tgt.size
        assert pair.visible is not None
        n = pair.num_points
        predicted = np.full((n, 2), np.nan)
        scores = np.full(n, np.nan)
        valid = np.zeros(n, dtype=bool)
        index = np.flatnonzero(pair.visible)
        clipped = 0
        seconds = 0.0
        if len(index):
            pts = pair.source_points[index].copy()
            w, h = src.size
            inside = np.clip(pts, 0, [w - 1, h - 1])
            clipped = int((np.abs(inside - pts) > 0).any(axis=1).sum())
            _feature_source(pipeline, src, stored_keys, stats)
            _feature_source(pipeline, tgt, stored_keys, stats)
            t0 = time.perf_counter()
            result = pipeline.match(src, tgt, inside.astype(np.float32))
            seconds = time.perf_counter() - t0
            predicted[index] = result.points.detach().cpu().double().numpy().reshape(-1, 2)
            scores[index] = result.scores.detach().cpu().double().numpy().reshape(-1)
            valid[index] = result.valid.detach().cpu().numpy().reshape(-1).astype(bool)
            stats.match_seconds.append(seconds)
        else:
            stats.pairs_without_points += 1
        stats.clipped_source_points += clipped
        outcome = PairOutcome(pair, predicted, scores, valid, seconds, clipped)
        stats.invalid_predictions += int(outcome.invalid().sum())
        stats.outside_image_predictions += int(outcome.outside().sum())
        outcomes.append(outcome)
        if progress is not None:
            progress.update(1)
    stats.seconds = time.perf_counter() - start
    stats.image_loads = cache.loads
    return outcomes, stats


def pair_threshold(pair: Pair, kind: str, frame: int = 0) -> float:
    """The reference length of ``pair`` for threshold ``kind`` (in the ``frame`` x ``frame``
    squashed frame when ``frame`` is set), with errors naming the pair."""
    try:
        return threshold_of(
            kind,
            source_bbox=pair.source_bbox,
            target_bbox=pair.target_bbox,
            target_size=pair.target_size,
            source_points=pair.source_points,
            target_points=pair.target_points,
            visible=pair.visible,
            source_size=pair.source_size,
            frame=frame,
        )
    except ValueError as exc:
        raise DiffeatError(f"pair {pair.id}: {exc}") from None


@dataclass
class Evaluation:
    """Everything an evaluation produced: outcomes, statistics, PCK per threshold kind."""

    dataset: str
    dataset_info: dict[str, Any]
    protocol: PCKProtocol
    alphas: tuple[float, ...]
    thresholds: tuple[str, ...]
    outcomes: list[PairOutcome]
    stats: RunStats
    summaries: dict[str, dict[str, Any]]
    pair_thresholds: list[dict[str, float]]
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    pipeline_digest: str = ""
    pipeline_source: str = ""
    store: dict[str, Any] | None = None

    def scored(self, kind: str) -> list[ScoredPair]:
        return scored_pairs(self.outcomes, self.pair_thresholds, kind)

    def headline(self, kind: str | None = None, alpha: float | None = None) -> float | None:
        from diffeat.eval.pck import headline

        kind = kind or self.thresholds[0]
        alpha = self.alphas[0] if alpha is None else alpha
        return headline(self.summaries[kind], alpha, self.protocol.average)


def scored_pairs(
    outcomes: list[PairOutcome], thresholds: list[dict[str, float]], kind: str
) -> list[ScoredPair]:
    return [
        ScoredPair(o.pair.id, o.pair.category, o.distances(), t[kind])
        for o, t in zip(outcomes, thresholds)
    ]


def score(
    outcomes: list[PairOutcome], protocol: PCKProtocol, dataset: str
) -> tuple[tuple[str, ...], list[dict[str, float]], dict[str, dict[str, Any]]]:
    """Thresholds per pair and the PCK summary per threshold kind."""
    kinds = protocol.thresholds_for(dataset)
    per_pair: list[dict[str, float]] = []
    for o in outcomes:
        o.frame = protocol.frame  # distances in the protocol's frame, as its thresholds
        values: dict[str, float] = {}
        for kind in kinds:
            values[kind] = (
                pair_threshold(o.pair, kind, protocol.frame) if o.pair.num_visible else math.nan
            )
        per_pair.append(values)
    summaries = {
        kind: summarize(
            scored_pairs(outcomes, per_pair, kind),
            protocol.alphas,
            protocol.comparison,
            protocol.arithmetic,
        )
        for kind in kinds
    }
    return kinds, per_pair, summaries


def evaluate(
    pipeline: Pipeline,
    dataset: Dataset,
    *,
    dataset_name: str,
    protocol: PCKProtocol,
    pairs: Iterable[Pair] | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """Run ``pipeline`` on every pair of ``dataset`` (or on ``pairs``, already drawn from
    it) and score it with ``protocol``."""
    source = dataset.pairs() if pairs is None else pairs
    outcomes, stats = run_pairs(pipeline, source, limit=limit, progress=progress)
    if not outcomes:
        raise DiffeatError(
            f"the {dataset_name} dataset yielded no pairs (check --split and options)"
        )
    kinds, per_pair, summaries = score(outcomes, protocol, dataset_name)
    store_info = None
    if pipeline.store is not None:
        # this run's cache key only: the whole store's info reads every entry of every
        # extractor (minutes in a store of millions of images)
        key = pipeline.cache_key if stats.computed or stats.read_from_store else None
        store_info = {
            "path": str(pipeline.store.path),
            "cache_key": key,
            "cache_key_bytes": _cache_key_bytes(pipeline.store, key) if key else None,
        }
    return Evaluation(
        dataset=dataset_name,
        dataset_info=description_of(dataset),
        protocol=protocol,
        alphas=tuple(protocol.alphas),
        thresholds=kinds,
        outcomes=outcomes,
        stats=stats,
        summaries=summaries,
        pair_thresholds=per_pair,
        pipeline_config=pipeline.config.resolved(),
        pipeline_digest=pipeline.config.digest(),
        pipeline_source=str(pipeline.config.source),
        store=store_info,
    )


def _cache_key_bytes(store: Any, cache_key: str) -> int | None:
    """The bytes the store holds for ``cache_key``; None when it holds nothing for it (its
    features were computed, not kept) or cannot say. Reporting never fails a finished run:
    a store written against an older ``FeatureStorage`` without ``cache_key_bytes`` is
    asked for its ``info()`` instead."""
    try:
        measure = getattr(store, "cache_key_bytes", None)
        if measure is not None:
            return int(measure(cache_key)) or None
        return store.info().get("extractors", {}).get(cache_key, {}).get("bytes")
    except (OSError, DiffeatError) as exc:
        log.warning("cannot measure the bytes of %s in the store: %s", cache_key, exc)
        return None
