"""One extractor with the feature store in front of it: keys, reuse, batching, resume."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffeat.core.config import StageConfig, config_digest
from diffeat.core.errors import DiffeatError, ImageError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.images import ImageInput, ImageLike, as_input
from diffeat.core.options import options_dict

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
    dists = (
        "diffeat",
        "torch",
        "diffusers",
        "transformers",
        "open_clip_torch",
        "zarr",
        "numpy",
        "pillow",
    )
    for dist in dists:
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


class FeatureSource:
    """An extractor (built on first use) reading and writing through an optional store.

    A run that finds every image in the store never builds the extractor's
    model: the cache key needs only the model identity (a file fingerprint).
    """

    def __init__(self, stage: StageConfig, store: Any = None) -> None:
        self.stage = stage
        self.store = store
        self._extractor: Any = None
        self._cache_key: str | None = None
        self._registered = False

    @property
    def name(self) -> str:
        return self.stage.name or self.stage.plugin

    @property
    def extractor(self) -> Any:
        if self._extractor is None:
            self._extractor = self.stage.build()
        return self._extractor

    def layers(self) -> list[LayerInfo]:
        return list(self.extractor.layers())

    @property
    def cache_key(self) -> str:
        if self._cache_key is None:
            self._cache_key = extractor_cache_key(
                self.stage.plugin, self.stage.options, self.extractor.model_identity()
            )
        return self._cache_key

    def extractor_info(self) -> dict[str, Any]:
        """What the store keeps about this extractor."""
        return {
            "plugin": self.stage.plugin,
            "config": self.stage.resolved(),
            "model": self.extractor.model_identity(),
            "layers": [info.to_dict() for info in self.layers()],
            "timesteps": list(self.extractor.timesteps()),
            "versions": library_versions(),
        }

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.extractor, "device", "cpu"))

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

    def put(self, image: ImageLike, fs: FeatureSet) -> None:
        """Store features computed outside :meth:`features`, e.g. while generating ``image``."""
        if self.store is None:
            raise DiffeatError("storing features needs a feature store (--store PATH)")
        self._register()
        self._store_and_round(as_input(image), fs, keep=False)

    def _store_and_round(self, inp: ImageInput, fs: FeatureSet, *, keep: bool) -> FeatureSet | None:
        """Store ``fs``; with ``keep``, return it at the store's precision, so a later run
        that reads the store sees exactly the features this run used."""
        cpu = fs.to("cpu")
        self.store.put(self.cache_key, self.image_key(inp), cpu, source=inp.source)
        if not keep:  # extract only: no copy back to the device
            return None
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
                    fs = self._store_and_round(inp, fs, keep=keep)
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
