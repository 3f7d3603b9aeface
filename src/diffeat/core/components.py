"""The component contracts: extractor, aggregator, matcher, the views they exchange,
and every optional capability a component may declare.

Components are plain classes; the base classes document the required methods
and give sensible defaults. A third-party component need not inherit from
them, but must provide the same methods (the conformance suites in
:mod:`diffeat.testing` check it).

Optional capabilities are declared here, once, as :class:`typing.Protocol` s
(runtime-checkable where the core branches on them) or flags, and tested with
the ``is_*`` / ``*_of`` functions below. The core, ``train``, ``eval`` and the
CLI call these functions; none of them probes a component with ``hasattr``.

=====================  ==========================================  =========================
capability             declared by                                 used by
=====================  ==========================================  =========================
conditioning           ``Extractor.conditioning(image)``           the store's image key
preprocessing apart    :class:`PreprocessingExtractor`             ``extract --workers``
generating             :class:`GeneratingExtractor`                ``diffeat generate``
layer catalogue        :class:`LayerCatalog`                       ``diffeat layers --all``
fusing                 :class:`FusingAggregator`                   multi-extractor pipelines
fusing per pair        :class:`PairFusingAggregator`               ``Pipeline.views``
training               :class:`TrainableAggregator`                ``diffeat train``
query-conditioned      ``Matcher.needs_descriptors = False``       ``Pipeline.view``
caching queries        :class:`CachingMatcher`                     ``Pipeline.matcher``
=====================  ==========================================  =========================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from PIL import Image

from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size, grid_size_of
from diffeat.core.images import ImageInput


class Extractor:
    """Turns images into per-layer, per-timestep feature maps.

    Subclasses set ``Options`` (a dataclass, see :mod:`diffeat.core.options`)
    and implement :meth:`layers`, :meth:`timesteps`, :meth:`model_identity`
    and :meth:`extract`.
    """

    #: images per call of :meth:`extract` the pipeline should aim for
    batch_size: int = 1
    #: where the extractor computes; stored features are read back onto it
    device: torch.device = torch.device("cpu")

    def layers(self) -> list[LayerInfo]:
        """The layers this extractor returns, known before running on any image."""
        raise NotImplementedError

    def timesteps(self) -> tuple[int, ...]:
        """The timesteps along the first axis of every layer's ``[T, C, H, W]`` map."""
        return (0,)

    def model_identity(self) -> dict[str, Any]:
        """What identifies the weights (id and revision, or a content fingerprint)."""
        return {}

    def transform_for(self, image_size: Size) -> ImageTransform:
        """The image -> model-input transform applied to an image of ``image_size``."""
        raise NotImplementedError

    def extract(self, images: Sequence[ImageInput]) -> list[FeatureSet]:
        """Features for each image; ``meta["transform"]`` must be set."""
        raise NotImplementedError

    def conditioning(self, image: ImageInput) -> str:
        """What, besides the pixels and the config, this image's features depend on.

        Empty for most extractors; a category-aware one returns e.g. its
        per-image prompt. The store keys the image by its content plus this.
        """
        return ""


@runtime_checkable
class LayerCatalog(Protocol):
    """An extractor that lists every layer it can capture (not only the configured ones),
    with channels and stride, before running on any image (``diffeat layers --all``)."""

    def available_layers(self) -> list[LayerInfo]:
        """Every capturable layer of the extractor's model."""
        ...


@runtime_checkable
class PreprocessingExtractor(Protocol):
    """An extractor whose pixel preprocessing can run apart from the model (in DataLoader
    worker processes) and whose model takes a whole batch of preprocessed pixels.

    ``extract_preprocessed(images, preprocessor()(im) stacked)`` must give exactly what
    ``extract(images)`` gives for the same batch.
    """

    def preprocessor(self) -> Callable[[ImageInput], torch.Tensor]:
        """A picklable function of one image to its ``[3, H, W]`` float32 model input (CPU,
        no model needed): it runs in worker processes."""
        ...

    def extract_preprocessed(
        self, images: Sequence[ImageInput], pixels: torch.Tensor
    ) -> list[FeatureSet]:
        """Features of ``images`` from their preprocessed ``pixels`` ``[B, 3, H, W]`` (on the
        CPU, pinned, or already on the extractor's device), all in one batch."""
        ...


@runtime_checkable
class GeneratingExtractor(Protocol):
    """An extractor that samples images and captures their features while doing so."""

    def generate(self, seed: int) -> tuple[Image.Image, FeatureSet]:
        """One sampled image and the features captured while sampling it (``seed`` fixes the noise)."""
        ...


class Aggregator:
    """Turns a :class:`FeatureSet` into one descriptor map ``[C, H, W]``."""

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        raise NotImplementedError


#: several extractors' features of one image, by extractor name
Parts = Mapping[str, FeatureSet]
#: one image's fused descriptor map ``[C, H, W]`` and its image -> grid transform
Fused = tuple[torch.Tensor, ImageTransform]


@runtime_checkable
class FusingAggregator(Protocol):
    """An aggregator that combines the features of several extractors (``fuse``)."""

    def fuse(self, parts: Parts) -> Fused:
        """One image's descriptors from every extractor's features, by extractor name."""
        ...


@runtime_checkable
class PairFusingAggregator(FusingAggregator, Protocol):
    """A fusing aggregator that fits something on the pair (SD-DINO's PCA per pair)."""

    def fuse_pair(self, source: Parts, target: Parts) -> tuple[Fused, Fused]:
        """Both images' descriptors, fitted on the pair."""
        ...


@dataclass
class TrainingCheckpoint:
    """What a trainable aggregator reads back from a checkpoint file.

    ``state_dict`` holds the network's weights, ``tensors`` the other tensors
    written with it (the optimiser state of a resumable run) and ``extra`` the
    JSON metadata (``{"train": {...}}`` for files written by ``diffeat train``).
    """

    state_dict: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TrainableAggregator(Protocol):
    """An aggregator with a network that ``diffeat train`` trains.

    What training relies on, and nothing else:

    - ``checkpoint_option`` names the field of its ``Options`` (a dataclass)
      holding the checkpoint it starts from: a path, or empty for a fresh
      network. When that is the file a run writes (or it does not exist yet),
      ``diffeat train`` clears it and builds the aggregator again;
    - ``device`` is where the network computes; training sets it before
      :meth:`network_for`;
    - :meth:`network_for` builds (seeded) or loads the network once; training
      optimises every one of its parameters;
    - :meth:`forward_features` gives descriptors with gradients; every image's
      descriptor grid must be the same (the keypoints' grid cells are computed
      once, from the first image);
    - :meth:`save` writes the network with the run's metadata and extra
      tensors (the optimiser state); :meth:`read_checkpoint` reads such a
      file back (to resume), refusing anything else with a clear message.
    """

    #: the field of ``Options`` naming the checkpoint the network starts from (empty: fresh)
    checkpoint_option: ClassVar[str]
    device: torch.device

    def network_for(
        self, layers: Sequence[tuple[str, int]], timesteps: Sequence[int]
    ) -> torch.nn.Module:
        """The network (built or loaded once, then cached) for these ``(name, channels)`` layers."""
        ...

    def forward_features(self, batch: Sequence[FeatureSet]) -> torch.Tensor:
        """Descriptors ``[B, C, H, W]`` of several images, with gradients."""
        ...

    def save(
        self,
        path: str | os.PathLike[str],
        extra: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the network (plus ``tensors`` and JSON ``extra``) atomically to ``path``."""
        ...

    def read_checkpoint(self, path: str | os.PathLike[str]) -> TrainingCheckpoint:
        """Read a file written by :meth:`save`, refusing anything else with a clear message."""
        ...


@dataclass
class View:
    """One image as a matcher sees it.

    ``descriptors`` (``[C, h, w]``, a grid covering the model input) is set when
    the pipeline has an extractor and aggregator; query-conditioned matchers
    use ``image`` (and their own model) instead.
    """

    image: Image.Image
    transform: ImageTransform
    descriptors: torch.Tensor | None = None
    features: FeatureSet | None = None
    source: str = "<memory>"

    @property
    def image_size(self) -> Size:
        return self.image.size

    @property
    def grid_size(self) -> Size:
        if self.descriptors is None:
            raise ValueError("this view carries no descriptors")
        return grid_size_of(self.descriptors)

    def image_to_grid(self, points: torch.Tensor) -> torch.Tensor:
        return self.transform.image_to_grid(points, self.grid_size)

    def grid_to_image(self, points: torch.Tensor) -> torch.Tensor:
        return self.transform.grid_to_image(points, self.grid_size)


@dataclass
class MatchResult:
    """Target points ``[N, 2]`` (x, y, target pixel indices), scores ``[N]`` and validity ``[N]``.

    ``extras`` holds whatever else a matcher reports (tensors with a first axis of
    ``N``, or anything else). The extras named in ``json_extras`` are small
    per-point values that ``--json`` prints with each match: ``{name: labels}``,
    where ``labels`` names the values of a point (e.g. layers) or is empty for a
    plain list.
    """

    points: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    json_extras: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> list[dict[str, Any]]:
        rows = [
            {
                "target": [round(float(x), 3), round(float(y), 3)],
                "score": float(s),
                "valid": bool(v),
            }
            for (x, y), s, v in zip(self.points.tolist(), self.scores.tolist(), self.valid.tolist())
        ]
        for name, labels in self.json_extras.items():
            values = torch.as_tensor(self.extras[name]).reshape(len(rows), -1).tolist()
            for row, vals in zip(rows, values):
                row[name] = dict(zip(labels, vals)) if labels else vals
        return rows


class Matcher:
    """Finds target points for source points.

    Set ``needs_descriptors = False`` for a query-conditioned method that works
    from the views' images alone; the pipeline then skips extraction.
    """

    needs_descriptors: bool = True

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        raise NotImplementedError


@runtime_checkable
class FeatureStorage(Protocol):
    """The store interface the pipeline, training and evaluation use.

    :class:`diffeat.store.FeatureStore` (zarr) implements it; entries are keyed
    by ``(cache_key, image_key)`` and only :class:`diffeat.core.sources.FeatureSource`
    builds those keys.
    """

    #: the storage precision of feature values (``"float16"``, ``"float32"`` or ``"bfloat16"``;
    #: any but float16 is part of the cache key, see ``diffeat.core.sources``)
    dtype: str
    #: where the store lives (a worker process reopens it from here)
    path: str | os.PathLike[str]

    def register_extractor(self, cache_key: str, info: dict[str, Any]) -> None:
        """Record what an extractor is (config, model, layers) before its first entry."""
        ...

    def has(self, cache_key: str, image_key: str) -> bool:
        """Whether a complete entry exists."""
        ...

    def get(
        self,
        cache_key: str,
        image_key: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> FeatureSet:
        """A complete entry on ``device`` in ``dtype`` (float32 by default); :class:`KeyError`
        when missing."""
        ...

    def entry_info(self, cache_key: str, image_key: str) -> dict[str, Any]:
        """Layer shapes and dtypes, timesteps, source and sizes of a complete entry."""
        ...

    def put(
        self,
        cache_key: str,
        image_key: str,
        features: FeatureSet,
        *,
        source: str | None = None,
        replace: bool = True,
    ) -> bool:
        """Write an entry; it reads as complete only once fully written. Returns False when
        a complete entry of another writer was kept instead (with ``replace=False``, any
        complete entry is kept).

        ``features`` may be on any device (the extractor's): a store casts to
        its ``dtype`` there and copies to the host itself.
        """
        ...

    def entries(self, cache_key: str) -> list[str]:
        """Image keys of the complete entries of one extractor."""
        ...

    def info(self) -> dict[str, Any]:
        """What the store holds: extractors, entry counts, bytes."""
        ...

    def cache_key_bytes(self, cache_key: str) -> int:
        """Bytes stored for one extractor's entries, without looking at the others (what an
        evaluation reports: ``info`` looks at every entry of every extractor)."""
        ...

    def damaged_extractors(self) -> dict[str, str]:
        """``cache_key -> what is wrong`` for cache keys whose extractor info is missing or
        unreadable while their entries may be intact (``register_extractor`` rewrites it)."""
        ...


# -- capability checks: the one place that looks at what a component provides -----


def device_of(component: object) -> torch.device:
    """The device a component computes on (``cpu`` when it does not say)."""
    return torch.device(getattr(component, "device", "cpu"))


def batch_size_of(extractor: object) -> int:
    """Images per :meth:`Extractor.extract` call the pipeline should aim for (at least 1)."""
    return max(1, int(getattr(extractor, "batch_size", 1)))


def preprocessor_of(extractor: object) -> Callable[[ImageInput], torch.Tensor] | None:
    """The picklable preprocessing of a :class:`PreprocessingExtractor` (else None)."""
    if isinstance(extractor, PreprocessingExtractor):
        return extractor.preprocessor()
    return None


def conditioning_of(extractor: object, image: ImageInput) -> str:
    """What besides pixels and config an image's features depend on (``""``: nothing)."""
    condition = getattr(extractor, "conditioning", None)
    return condition(image) if condition is not None else ""


def needs_descriptors(matcher: object) -> bool:
    """Whether a matcher works from descriptors (``False``: query-conditioned, images only)."""
    return bool(getattr(matcher, "needs_descriptors", True))


def is_fusing(aggregator: object) -> bool:
    """Whether an aggregator combines several extractors (:class:`FusingAggregator`)."""
    return isinstance(aggregator, FusingAggregator)


def is_pair_fusing(aggregator: object) -> bool:
    """Whether a fusing aggregator fits on the pair (:class:`PairFusingAggregator`)."""
    return isinstance(aggregator, PairFusingAggregator)


def is_trainable(aggregator: object) -> bool:
    """Whether ``diffeat train`` can train an aggregator (:class:`TrainableAggregator`)."""
    return isinstance(aggregator, TrainableAggregator)


@runtime_checkable
class CachingMatcher(Protocol):
    """A query-conditioned matcher whose per-(image, query) work is worth keeping.

    With a store, the pipeline hands it a :class:`~diffeat.core.query_cache.QueryCache`
    (keyed by the matcher's plugin, its result-affecting options and
    :meth:`model_identity`) before its first match; without one, ``None``.
    """

    def model_identity(self) -> dict[str, Any]:
        """A fingerprint of the model's weights (enters the cache key)."""
        ...

    def use_cache(self, cache: Any) -> None:
        """Keep per-(image, query) results in ``cache`` (a ``QueryCache``) or nowhere."""
        ...


def is_caching(matcher: object) -> bool:
    """Whether a matcher keeps per-query results in the store (:class:`CachingMatcher`)."""
    return isinstance(matcher, CachingMatcher)


def is_generating(extractor: object) -> bool:
    """Whether an extractor samples images (:class:`GeneratingExtractor`)."""
    return isinstance(extractor, GeneratingExtractor)


def available_layers_of(extractor: object) -> list[LayerInfo] | None:
    """Every capturable layer of an extractor (:class:`LayerCatalog`), or None when it
    does not list them."""
    return extractor.available_layers() if isinstance(extractor, LayerCatalog) else None
