"""extractor(s) -> aggregator -> matcher, with the feature store in between."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffeat.core.components import (
    Aggregator,
    Extractor,
    FeatureStorage,
    FusingAggregator,
    Matcher,
    MatchResult,
    PairFusingAggregator,
    View,
    is_caching,
    is_fusing,
    needs_descriptors,
)
from diffeat.core.config import PipelineConfig, load_config, parse_config
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, check_points
from diffeat.core.images import ImageInput, ImageLike, as_input
from diffeat.core.plugins import PluginManager
from diffeat.core.prefetch import ExtractSettings
from diffeat.core.sources import (  # re-exported: part of the public API
    ExtractReport,
    FeatureSource,
    Progress,
    extractor_cache_key,
    library_versions,
    open_store,
)

StoreLike = FeatureStorage | str | os.PathLike[str]

__all__ = [
    "ExtractReport",
    "ExtractSettings",
    "FeatureSource",
    "Pipeline",
    "extractor_cache_key",
    "library_versions",
]


class Pipeline:
    """A configured extractor -> aggregator -> matcher chain.

    >>> pipe = Pipeline.from_file("examples/dift-sd21.toml", store="feats.zarr")  # doctest: +SKIP
    >>> result = pipe.match("cat.jpg", "dog.jpg", [(120, 88)])                      # doctest: +SKIP
    >>> result.points                                                                # doctest: +SKIP
    """

    def __init__(self, config: PipelineConfig, *, store: StoreLike | None = None) -> None:
        """``store`` is a store object or a path, opened as a :class:`~diffeat.FeatureStore`."""
        self.config = config
        if isinstance(store, (str, os.PathLike)):
            store = open_store(store)
        self.store: FeatureStorage | None = store
        self.sources = [FeatureSource(stage, store) for stage in config.extractors]
        self._aggregator: Aggregator | None = None
        self._matcher: Matcher | None = None

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        overrides: Sequence[str] = (),
        store: StoreLike | None = None,
        manager: PluginManager | None = None,
    ) -> Pipeline:
        """Load a TOML pipeline file; ``overrides`` are ``stage.option=value`` strings."""
        return cls(load_config(path, list(overrides), manager), store=store)

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        store: StoreLike | None = None,
        manager: PluginManager | None = None,
    ) -> Pipeline:
        return cls(parse_config(data, manager=manager), store=store)

    # -- components, built on first use ----------------------------------------

    @property
    def source(self) -> FeatureSource:
        """The (first) extractor with the store in front of it."""
        return self.sources[0]

    @property
    def extractor(self) -> Extractor:
        return self.source.extractor

    @property
    def aggregator(self) -> Aggregator:
        if self._aggregator is None:
            self._aggregator = self.config.aggregator.build()
        return self._aggregator

    @property
    def matcher(self) -> Matcher:
        if self._matcher is None:
            matcher = self.config.matcher.build()
            if is_caching(matcher):  # it keeps its per-query work in the store
                from diffeat.core.query_cache import QueryCache

                stage = self.config.matcher
                matcher.use_cache(
                    QueryCache(
                        self.store,
                        stage.plugin,
                        stage.options,
                        matcher.model_identity,
                        config=stage.resolved(),
                    )
                    if self.store is not None
                    else None
                )
            self._matcher = matcher
        return self._matcher

    def layers(self) -> list[LayerInfo]:
        """Layers of every extractor (named ``NAME:layer`` when there are several)."""
        if len(self.sources) == 1:
            return self.source.layers()
        return [
            LayerInfo(f"{src.name}:{info.name}", info.channels, info.stride)
            for src in self.sources
            for info in src.layers()
        ]

    @property
    def cache_key(self) -> str:
        return self.source.cache_key

    def image_key(self, inp: ImageInput) -> str:
        return self.source.image_key(inp)

    def is_stored(self, image: ImageLike) -> bool:
        """Whether every extractor of the pipeline has ``image`` in the store."""
        inp = as_input(image)
        return all(src.is_stored(inp) for src in self.sources)

    @property
    def device(self) -> torch.device:
        return self.source.device

    # -- extraction -------------------------------------------------------------

    def features(
        self, images: Sequence[ImageLike], *, progress: Progress | None = None
    ) -> list[FeatureSet]:
        """Features of each image from the (first) extractor, stored or extracted."""
        return self.source.features(images, progress=progress)

    def parts(self, images: Sequence[ImageLike]) -> list[dict[str, FeatureSet]]:
        """Per image, the features of every extractor by name."""
        inputs = [as_input(im) for im in images]
        per_source = {src.name: src.features(inputs) for src in self.sources}
        return [{name: feats[i] for name, feats in per_source.items()} for i in range(len(inputs))]

    def extract(
        self,
        images: Sequence[ImageLike],
        *,
        progress: Progress | None = None,
        settings: ExtractSettings | None = None,
    ) -> ExtractReport:
        """Extract and store features of many images with every extractor.

        Unreadable images are reported, not fatal. With several extractors the
        counts add up over extractors. ``settings`` (batch size, worker processes,
        the background writer's memory bound) changes speed, not what is stored.
        """
        if self.store is None:
            raise DiffeatError("extract needs a feature store: pass store=PATH (--store PATH)")
        total = ExtractReport()
        for src in self.sources:
            report = src.extract(images, progress=progress, settings=settings)
            total.total += report.total
            total.computed += report.computed
            total.cached += report.cached
            total.found += report.found
            total.failed.extend(f for f in report.failed if f not in total.failed)
        return total

    # -- matching ---------------------------------------------------------------

    def _combines_parts(self) -> bool:
        """Whether the aggregator takes every extractor's features by name (like ``fuse``)."""
        if is_fusing(self.aggregator):
            return True
        if len(self.sources) > 1:
            raise ConfigError(
                f"{self.config.source}: the pipeline has {len(self.sources)} extractors, but the "
                f"aggregator {self.config.aggregator.plugin!r} takes one; use an aggregator that "
                f'combines extractors, such as plugin = "fuse"'
            )
        return False

    def view(self, image: ImageLike) -> View:
        """The matcher's view of an image (with descriptors when the matcher needs them)."""
        inp = as_input(image)
        if not needs_descriptors(self.matcher):
            return View(inp.image, ImageTransform.resize(inp.size, inp.size), source=inp.source)
        if self._combines_parts():
            (parts,) = self.parts([inp])
            aggregator = self.aggregator
            assert isinstance(aggregator, FusingAggregator)  # _combines_parts checked it
            descriptors, transform = aggregator.fuse(parts)
            first = parts[self.source.name]
            return View(inp.image, transform, descriptors, features=first, source=inp.source)
        (fs,) = self.features([inp])
        descriptors = self.aggregator(fs)
        return View(
            inp.image, fs.transform, descriptors=descriptors, features=fs, source=inp.source
        )

    def views(self, source: ImageLike, target: ImageLike) -> tuple[View, View]:
        """Both views of a pair; an aggregator with ``fuse_pair`` (PCA per pair) sees both."""
        src, tgt = as_input(source), as_input(target)
        if needs_descriptors(self.matcher) and self._combines_parts():
            aggregator = self.aggregator
        else:
            aggregator = None
        if isinstance(aggregator, PairFusingAggregator):
            src_parts, tgt_parts = self.parts([src, tgt])
            (sd, st), (td, tt) = aggregator.fuse_pair(src_parts, tgt_parts)
            name = self.source.name
            return (
                View(src.image, st, sd, features=src_parts[name], source=src.source),
                View(tgt.image, tt, td, features=tgt_parts[name], source=tgt.source),
            )
        return self.view(src), self.view(tgt)

    def match(
        self,
        source: ImageLike,
        target: ImageLike,
        points: Sequence[tuple[float, float]] | torch.Tensor,
    ) -> MatchResult:
        """Target points for ``points`` (``[(x, y), ...]`` source pixel indices)."""
        pts = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
        src_input = as_input(source)
        check_points(pts, src_input.size, "source point")
        tgt_input = as_input(target)
        src, tgt = self.views(src_input, tgt_input)
        return self.matcher.match(src, tgt, pts)
