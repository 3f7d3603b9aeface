"""extractor -> aggregator -> matcher, with the feature store in between."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffeat.core.components import MatchResult, View
from diffeat.core.config import PipelineConfig, config_digest, load_config, parse_config
from diffeat.core.errors import DiffeatError, ImageError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, check_points
from diffeat.core.images import ImageInput, ImageLike, as_input
from diffeat.core.options import options_dict
from diffeat.core.plugins import PluginManager

STORE_KEY_VERSION = 1


def extractor_cache_key(plugin: str, options: Any, model_identity: dict[str, Any]) -> str:
    """The store key of an extractor: plugin + result-affecting options + model identity."""
    data = {
        "v": STORE_KEY_VERSION,
        "plugin": plugin,
        "config": options_dict(options, cache_only=True),
        "model": model_identity,
    }
    return f"{plugin}-{config_digest(data)[:20]}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, stored with the features."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in (
        "diffeat",
        "torch",
        "diffusers",
        "transformers",
        "open_clip_torch",
        "zarr",
        "numpy",
        "pillow",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class ExtractReport:
    """What an extraction run did."""

    total: int = 0
    computed: int = 0
    cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


class Pipeline:
    """A configured extractor -> aggregator -> matcher chain.

    >>> pipe = Pipeline.from_file("examples/dift-sd21.toml", store="feats.zarr")  # doctest: +SKIP
    >>> result = pipe.match("cat.jpg", "dog.jpg", [(120, 88)])                      # doctest: +SKIP
    >>> result.points                                                                # doctest: +SKIP
    """

    def __init__(self, config: PipelineConfig, *, store: Any = None) -> None:
        self.config = config
        if store is not None and not hasattr(store, "put"):
            from diffeat.store import FeatureStore

            store = FeatureStore(store)
        self.store = store
        self._extractor: Any = None
        self._aggregator: Any = None
        self._matcher: Any = None
        self._cache_key: str | None = None
        self._registered = False

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        overrides: Sequence[str] = (),
        store: Any = None,
        manager: PluginManager | None = None,
    ) -> Pipeline:
        """Load a TOML pipeline file; ``overrides`` are ``stage.option=value`` strings."""
        return cls(load_config(path, list(overrides), manager), store=store)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, store: Any = None, manager: PluginManager | None = None
    ) -> Pipeline:
        return cls(parse_config(data, manager=manager), store=store)

    # -- components, built on first use ----------------------------------------

    @property
    def extractor(self) -> Any:
        if self._extractor is None:
            self._extractor = self.config.extractor.build()
        return self._extractor

    @property
    def aggregator(self) -> Any:
        if self._aggregator is None:
            self._aggregator = self.config.aggregator.build()
        return self._aggregator

    @property
    def matcher(self) -> Any:
        if self._matcher is None:
            self._matcher = self.config.matcher.build()
        return self._matcher

    def layers(self) -> list[LayerInfo]:
        return list(self.extractor.layers())

    @property
    def cache_key(self) -> str:
        if self._cache_key is None:
            self._cache_key = extractor_cache_key(
                self.config.extractor.plugin,
                self.config.extractor.options,
                self.extractor.model_identity(),
            )
        return self._cache_key

    def extractor_info(self) -> dict[str, Any]:
        """What the store keeps about this extractor."""
        return {
            "plugin": self.config.extractor.plugin,
            "config": self.config.extractor.resolved(),
            "model": self.extractor.model_identity(),
            "layers": [info.to_dict() for info in self.layers()],
            "timesteps": list(self.extractor.timesteps()),
            "versions": library_versions(),
        }

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.extractor, "device", "cpu"))

    # -- extraction -------------------------------------------------------------

    def _register(self) -> None:
        if self.store is not None and not self._registered:
            self.store.register_extractor(self.cache_key, self.extractor_info())
            self._registered = True

    def image_key(self, inp: ImageInput) -> str:
        """The store key of an image: its content hash, plus the extractor's conditioning."""
        condition = getattr(self.extractor, "conditioning", None)
        extra = condition(inp) if condition is not None else ""
        if not extra:
            return inp.key
        return f"{inp.key}-{hashlib.sha256(extra.encode()).hexdigest()[:12]}"

    def _store_and_round(self, inp: ImageInput, fs: FeatureSet) -> FeatureSet:
        """Store ``fs``; return it at the store's precision, so a later run that reads the
        store sees exactly the features this run used."""
        cpu = fs.to("cpu")
        self.store.put(self.cache_key, self.image_key(inp), cpu, source=inp.source)
        stored_dtype = getattr(torch, str(getattr(self.store, "dtype", "float32")))
        return cpu.to(dtype=stored_dtype).to(self.device, torch.float32)

    def _iter_features(
        self, items: Sequence[ImageLike], report: ExtractReport, *, keep: bool, progress: Any = None
    ) -> Iterator[tuple[int, FeatureSet | None]]:
        """Yield ``(index, features)`` in input order, reading the store or extracting batches."""
        batch: list[tuple[int, ImageInput]] = []
        batch_size = max(1, int(getattr(self.extractor, "batch_size", 1)))

        def flush() -> Iterator[tuple[int, FeatureSet | None]]:
            feats = self.extractor.extract([inp for _, inp in batch])
            self._register()  # only now: a run that finds everything stored never loads the model
            for (index, inp), fs in zip(batch, feats):
                fs.meta.setdefault("source", inp.source)
                if self.store is not None:
                    fs = self._store_and_round(inp, fs)
                report.computed += 1
                if progress is not None:
                    progress.update(1)
                yield index, (fs if keep else None)
            batch.clear()

        for index, item in enumerate(items):
            report.total += 1
            try:
                inp = as_input(item)
            except ImageError as exc:
                if keep:
                    raise
                report.failed.append((str(item), str(exc)))
                if progress is not None:
                    progress.update(1)
                continue
            if self.store is not None and self.store.has(self.cache_key, self.image_key(inp)):
                report.cached += 1
                if progress is not None:
                    progress.update(1)
                yield (
                    index,
                    (
                        self.store.get(self.cache_key, self.image_key(inp), device=self.device)
                        if keep
                        else None
                    ),
                )
                continue
            batch.append((index, inp))
            if len(batch) >= batch_size:
                yield from flush()
        if batch:
            yield from flush()

    def features(self, images: Sequence[ImageLike], *, progress: Any = None) -> list[FeatureSet]:
        """Features of each image, from the store when present, else extracted (and stored)."""
        report = ExtractReport()
        out: dict[int, FeatureSet] = {}
        for index, fs in self._iter_features(images, report, keep=True, progress=progress):
            assert fs is not None
            out[index] = fs
        return [out[i] for i in range(len(images))]

    def extract(self, images: Sequence[ImageLike], *, progress: Any = None) -> ExtractReport:
        """Extract and store features of many images; unreadable images are reported, not fatal."""
        if self.store is None:
            raise DiffeatError("extract needs a feature store: pass store=PATH (--store PATH)")
        report = ExtractReport()
        for _ in self._iter_features(images, report, keep=False, progress=progress):
            pass
        return report

    # -- matching ---------------------------------------------------------------

    def view(self, image: ImageLike) -> View:
        """The matcher's view of an image (with descriptors when the matcher needs them)."""
        inp = as_input(image)
        if not getattr(self.matcher, "needs_descriptors", True):
            return View(inp.image, ImageTransform.resize(inp.size, inp.size), source=inp.source)
        (fs,) = self.features([inp])
        descriptors = self.aggregator(fs)
        return View(
            inp.image, fs.transform, descriptors=descriptors, features=fs, source=inp.source
        )

    def match(self, source: ImageLike, target: ImageLike, points: Any) -> MatchResult:
        """Target points for ``points`` (``[(x, y), ...]`` source pixel indices)."""
        pts = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
        src_input = as_input(source)
        check_points(pts, src_input.size, "source point")
        tgt_input = as_input(target)
        src, tgt = self.view(src_input), self.view(tgt_input)
        return self.matcher.match(src, tgt, pts)
