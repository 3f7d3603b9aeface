"""Conformance suites: the documented contract of each component kind, as checks.

Each kind has plain check functions (``check_*``: call them from any test, or
from a parametrized test over many components, as ``tests/test_conformance.py``
does for every registered built-in) and a pytest mixin that a plugin author
subclasses, providing a factory:

=====================  =======================  ======================================
mixin                  provide                  optional overrides
=====================  =======================  ======================================
ExtractorConformance   ``make_extractor()``     ``images()``, ``extracts``,
                                                ``generates``
AggregatorConformance  ``make_aggregator()``    ``features()``, ``parts()``
MatcherConformance     ``make_matcher()``       ``views()``, ``points()``
DatasetConformance     ``make_dataset()``       ``check_points_inside``
=====================  =======================  ======================================

Optional capabilities are found with the checks of
:mod:`diffeat.core.components` (``is_generating``, ``is_fusing``,
``is_pair_fusing``, ``is_trainable``, ``needs_descriptors``): a component that
declares a capability is held to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from diffeat.core.components import (
    Aggregator,
    Extractor,
    Fused,
    Matcher,
    MatchResult,
    Parts,
    View,
    conditioning_of,
    is_fusing,
    is_generating,
    is_pair_fusing,
    is_trainable,
    needs_descriptors,
    preprocessor_of,
)
from diffeat.core.datasets import Dataset, Pair
from diffeat.core.features import FeatureSet
from diffeat.core.geometry import ImageTransform, Size
from diffeat.core.images import ImageInput, as_input, load_image
from diffeat.testing.extractors import (
    ColorBlurExtractor,
    ColorBlurOptions,
    MultiColorBlurExtractor,
    MultiColorBlurOptions,
    smooth_texture,
)

__all__ = [
    "AggregatorConformance",
    "DatasetConformance",
    "ExtractorConformance",
    "MatcherConformance",
    "check_aggregator",
    "check_dataset",
    "check_extracted",
    "check_extractor",
    "check_extractor_declaration",
    "check_fused",
    "check_generated",
    "check_preprocessed",
    "check_match_result",
    "check_matcher",
    "check_pair",
    "check_same_features",
    "check_trainable",
    "default_images",
]


def _skip(reason: str) -> None:
    """Skip the running test (pytest is imported only when a suite runs)."""
    import pytest

    pytest.skip(reason)


def default_images() -> list[ImageInput]:
    """Two smooth textures of different sizes and aspect ratios (80 x 60 and 48 x 64)."""
    return [
        as_input(smooth_texture((80, 60), seed=1)),
        as_input(smooth_texture((48, 64), seed=2)),
    ]


# -- extractors ------------------------------------------------------------------------------


def check_extractor_declaration(extractor: Extractor) -> None:
    """What an extractor declares before running: layers, timesteps, a JSON model identity."""
    infos = extractor.layers()
    assert infos, "layers() declares no layer"
    names = [i.name for i in infos]
    assert len(set(names)) == len(names), f"layers() repeats a name: {names}"
    for info in infos:
        assert int(info.channels) > 0, f"layer {info.name}: channels must be > 0"
        assert float(info.stride) > 0, f"layer {info.name}: stride must be > 0"
    steps = extractor.timesteps()
    assert len(steps) > 0, "timesteps() is empty"
    assert all(isinstance(t, int) for t in steps), f"timesteps() must be ints, got {steps}"
    identity = extractor.model_identity()
    assert isinstance(identity, dict), "model_identity() must return a dict"
    json.dumps(identity)  # part of the store key: must be JSON


def _check_feature_set(
    extractor: Extractor, fs: FeatureSet, image_size: Size, model_size: Size
) -> None:
    infos = {i.name: i for i in extractor.layers()}
    assert isinstance(fs, FeatureSet), f"expected a FeatureSet, got {type(fs).__name__}"
    assert set(fs.layers) == set(infos), f"layers {sorted(fs.layers)} != declared {sorted(infos)}"
    assert tuple(fs.timesteps) == tuple(extractor.timesteps())
    assert fs.transform.image_size == tuple(image_size), "meta['transform'] is not this image's"
    mw, mh = model_size
    for name, tensor in fs.layers.items():
        assert tensor.ndim == 4, f"layer {name}: expected [T, C, H, W], got {tuple(tensor.shape)}"
        assert tensor.is_floating_point(), f"layer {name}: expected floats, got {tensor.dtype}"
        assert tensor.shape[0] == len(extractor.timesteps()), f"layer {name}: timestep axis"
        assert tensor.shape[1] == infos[name].channels, f"layer {name}: channels"
        assert math.isclose(mw / tensor.shape[-1], infos[name].stride, rel_tol=1e-6), (
            f"layer {name}: width {tensor.shape[-1]} does not match stride {infos[name].stride} "
            f"of a {mw} px model input"
        )
        assert math.isclose(mh / tensor.shape[-2], infos[name].stride, rel_tol=1e-6), (
            f"layer {name}: height {tensor.shape[-2]} does not match stride {infos[name].stride} "
            f"of a {mh} px model input"
        )
        assert torch.isfinite(tensor).all(), f"layer {name}: non-finite values"


def check_extracted(
    extractor: Extractor, images: Sequence[ImageInput], features: Sequence[FeatureSet]
) -> None:
    """``extract(images)``'s output: one feature set per image, as declared, transform recorded."""
    assert len(features) == len(images), f"{len(features)} feature sets for {len(images)} images"
    for im, fs in zip(images, features):
        _check_feature_set(extractor, fs, im.size, extractor.transform_for(im.size).model_size)
        assert isinstance(conditioning_of(extractor, im), str), "conditioning() must be a str"


def check_same_features(a: Sequence[FeatureSet], b: Sequence[FeatureSet]) -> None:
    """Two extractions of the same images are equal (extraction is deterministic)."""
    assert len(a) == len(b)
    for fa, fb in zip(a, b):
        assert set(fa.layers) == set(fb.layers)
        for name in fa.layers:
            torch.testing.assert_close(fa.layers[name], fb.layers[name])


def check_generated(make_extractor: Callable[[], Extractor], seed: int = 0) -> None:
    """A generating extractor: ``generate(seed)`` gives an image and its declared features,
    with the transform of that image, the same for the same seed."""
    extractor = make_extractor()
    assert is_generating(extractor), "the extractor does not declare generate(seed)"
    image, fs = extractor.generate(seed)  # type: ignore[attr-defined]
    model_size = extractor.transform_for(image.size).model_size
    _check_feature_set(extractor, fs, image.size, model_size)
    image2, fs2 = extractor.generate(seed)  # type: ignore[attr-defined]
    assert np.array_equal(np.asarray(image), np.asarray(image2)), "same seed, another image"
    check_same_features([fs], [fs2])


def check_preprocessed(extractor: Extractor, images: Sequence[ImageInput]) -> None:
    """A :class:`~diffeat.core.components.PreprocessingExtractor`: its preprocessor survives
    pickling (it runs in worker processes) and ``extract_preprocessed`` of the stacked pixels
    gives what ``extract`` gives for the same batch."""
    import pickle

    preprocess = preprocessor_of(extractor)
    assert preprocess is not None, "the extractor does not preprocess apart"
    try:  # worker processes receive it pickled (by the DataLoader); nothing is unpickled here
        pickle.dumps(preprocess)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise AssertionError(f"the preprocessor cannot be pickled for workers: {exc}") from None
    pixels = torch.stack([preprocess(im) for im in images])
    assert pixels.dtype == torch.float32 and pixels.shape[1] == 3, "expected [B, 3, H, W] float32"
    batched = extractor.extract_preprocessed(list(images), pixels)  # type: ignore[attr-defined]
    check_same_features(batched, extractor.extract(list(images)))


def check_extractor(
    make_extractor: Callable[[], Extractor],
    images: Sequence[ImageInput] | None = None,
    *,
    extracts: bool = True,
    generates: bool | None = None,
) -> None:
    """Every extractor check: declaration, extraction (twice, from two instances), generation.

    ``generates=None`` checks generation whenever the extractor declares it
    (:func:`~diffeat.core.components.is_generating`).
    """
    images = list(images) if images is not None else default_images()
    extractor = make_extractor()
    check_extractor_declaration(extractor)
    if extracts:
        first = extractor.extract(images)
        check_extracted(extractor, images, first)
        check_same_features(first, make_extractor().extract(images))
        if preprocessor_of(extractor) is not None:
            check_preprocessed(extractor, images)
    if generates or (generates is None and is_generating(extractor)):
        check_generated(make_extractor)


class ExtractorConformance:
    """Pytest mixin: subclass it and provide ``make_extractor()`` (optionally ``images()``).

    Checks that declared layers and timesteps match the output (channels,
    strides, ``[T, C, H, W]``), that the transform is recorded, that
    extraction is deterministic and, for a generating extractor, that
    ``generate(seed)`` honours the same contract. Set ``extracts = False`` for
    an extractor that only generates, ``generates = False`` to skip generation.
    """

    extracts: bool = True
    generates: bool | None = None

    def make_extractor(self) -> Extractor:  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    def images(self) -> list[ImageInput]:
        return default_images()

    def _extracted(self) -> tuple[Extractor, list[FeatureSet]]:
        if not self.extracts:
            _skip("this extractor does not extract given images")
        ex = self.make_extractor()
        return ex, ex.extract(self.images())

    def test_declaration(self) -> None:
        check_extractor_declaration(self.make_extractor())

    def test_declared_layers_match_output(self) -> None:
        ex, features = self._extracted()
        check_extracted(ex, self.images(), features)

    def test_transform_recorded(self) -> None:
        _, features = self._extracted()
        for im, fs in zip(self.images(), features):
            assert fs.transform.image_size == im.size

    def test_deterministic(self) -> None:
        _, first = self._extracted()
        check_same_features(first, self.make_extractor().extract(self.images()))

    def test_preprocessed(self) -> None:
        ex = self.make_extractor()
        if not self.extracts or preprocessor_of(ex) is None:
            _skip("does not preprocess apart (PreprocessingExtractor)")
        check_preprocessed(ex, self.images())

    def test_generate(self) -> None:
        generates = self.generates
        if generates is None:
            generates = is_generating(self.make_extractor())
        if not generates:
            _skip("not a generating extractor")
        check_generated(self.make_extractor)


# -- aggregators -----------------------------------------------------------------------------


def default_features() -> list[FeatureSet]:
    """Features of :func:`default_images` with two layers (strides 2 and 4) at two timesteps."""
    extractor = MultiColorBlurExtractor(
        MultiColorBlurOptions(image_size=[32, 24], stride=2, layers=2, timesteps=[0, 100])
    )
    return extractor.extract(default_images())


def default_parts() -> list[Parts]:
    """Per image of :func:`default_images`, two extractors' features by name (``a``, ``b``):
    different model inputs, strides and channel counts."""
    images = default_images()
    a = ColorBlurExtractor(ColorBlurOptions(image_size=[32, 24], stride=2)).extract(images)
    b = ColorBlurExtractor(ColorBlurOptions(image_size=[24, 24], sigmas=[1.0], stride=4))
    return [{"a": fa, "b": fb} for fa, fb in zip(a, b.extract(images))]


def _check_map(out: object, what: str) -> torch.Tensor:
    assert isinstance(out, torch.Tensor), f"{what}: expected a tensor, got {type(out).__name__}"
    assert out.ndim == 3, f"{what}: expected [C, H, W], got {tuple(out.shape)}"
    assert out.is_floating_point(), f"{what}: expected floats, got {out.dtype}"
    assert min(out.shape) > 0, f"{what}: empty map {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    return out


def check_fused(fused: Fused, image_size: Size, what: str = "fuse") -> torch.Tensor:
    """One fused image: ``([C, H, W] floats, ImageTransform of that image)``."""
    assert isinstance(fused, tuple) and len(fused) == 2, f"{what}: expected (map, transform)"
    descriptors, transform = fused
    _check_map(descriptors, what)
    assert isinstance(transform, ImageTransform), f"{what}: the second item is no ImageTransform"
    assert transform.image_size == tuple(image_size), f"{what}: transform of another image"
    return descriptors


def check_trainable(aggregator: Aggregator, features: Sequence[FeatureSet], tmp: Path) -> None:
    """A trainable aggregator: a network for the features' layers, descriptors with gradients,
    and a checkpoint that reads back with the same weights."""
    assert is_trainable(aggregator), "the aggregator does not declare TrainableAggregator"
    first = features[0]
    layers = [(name, int(t.shape[1])) for name, t in first.layers.items()]
    network = aggregator.network_for(layers, list(first.timesteps))  # type: ignore[attr-defined]
    assert isinstance(network, torch.nn.Module), "network_for must return a torch.nn.Module"
    out = aggregator.forward_features(list(features))  # type: ignore[attr-defined]
    assert out.ndim == 4 and out.shape[0] == len(features), (
        f"expected [B, C, H, W], got {out.shape}"
    )
    assert out.requires_grad, "forward_features must keep gradients (it is what training calls)"
    path = aggregator.save(tmp / "checkpoint.safetensors", extra={"train": {"step": 1}})  # type: ignore[attr-defined]
    ckpt = aggregator.read_checkpoint(path)  # type: ignore[attr-defined]
    state = network.state_dict()
    assert set(ckpt.state_dict) == set(state), "the checkpoint holds other weights"
    for name, value in state.items():
        torch.testing.assert_close(ckpt.state_dict[name].float(), value.detach().cpu().float())


def check_aggregator(
    make_aggregator: Callable[[], Aggregator],
    features: Sequence[FeatureSet] | None = None,
    parts: Sequence[Parts] | None = None,
    tmp: Path | None = None,
) -> None:
    """Every aggregator check: ``[C, H, W]`` floats per image, one width for all images,
    determinism; fusing, pair fusing and training when declared (training needs ``tmp``)."""
    features = list(features) if features is not None else default_features()
    aggregator = make_aggregator()
    outs = [_check_map(aggregator(fs), "aggregator(features)") for fs in features]
    assert len({o.shape[0] for o in outs}) == 1, "descriptor widths differ between images"
    again = make_aggregator()
    for fs, out in zip(features, outs):
        torch.testing.assert_close(again(fs), out)
    if is_fusing(aggregator):
        parts = list(parts) if parts is not None else default_parts()
        for p in parts:
            check_fused(aggregator.fuse(p), next(iter(p.values())).transform.image_size)  # type: ignore[attr-defined]
    if is_pair_fusing(aggregator):
        parts = list(parts) if parts is not None else default_parts()
        src, tgt = aggregator.fuse_pair(parts[0], parts[1])  # type: ignore[attr-defined]
        a = check_fused(src, next(iter(parts[0].values())).transform.image_size, "fuse_pair")
        b = check_fused(tgt, next(iter(parts[1].values())).transform.image_size, "fuse_pair")
        assert a.shape[0] == b.shape[0], "fuse_pair: the two images' widths differ"
    if is_trainable(aggregator) and tmp is not None:
        check_trainable(make_aggregator(), features, tmp)


class AggregatorConformance:
    """Pytest mixin: subclass it and provide ``make_aggregator()``.

    Checks that the aggregator turns a :class:`FeatureSet` into one ``[C, H, W]``
    float map, with one width ``C`` for every image, deterministically; a
    fusing aggregator's ``fuse`` (and ``fuse_pair``) return maps with the
    transform of their image; a trainable one builds a network, keeps
    gradients and writes a checkpoint that reads back. Override
    ``features()`` (and ``parts()`` for a fusing aggregator) to feed it
    features of the shape it expects.
    """

    def make_aggregator(self) -> Aggregator:  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    def features(self) -> list[FeatureSet]:
        return default_features()

    def parts(self) -> list[Parts]:
        return default_parts()

    def test_descriptor_map(self) -> None:
        aggregator = self.make_aggregator()
        outs = [_check_map(aggregator(fs), "aggregator(features)") for fs in self.features()]
        assert len({o.shape[0] for o in outs}) == 1, "descriptor widths differ between images"

    def test_deterministic(self) -> None:
        features = self.features()
        a, b = self.make_aggregator(), self.make_aggregator()
        for fs in features:
            torch.testing.assert_close(a(fs), b(fs))

    def test_fuse(self) -> None:
        aggregator = self.make_aggregator()
        if not is_fusing(aggregator):
            _skip("not a fusing aggregator")
        for p in self.parts():
            check_fused(aggregator.fuse(p), next(iter(p.values())).transform.image_size)  # type: ignore[attr-defined]

    def test_fuse_pair(self) -> None:
        aggregator = self.make_aggregator()
        if not is_pair_fusing(aggregator):
            _skip("not a pair-fusing aggregator")
        parts = self.parts()
        src, tgt = aggregator.fuse_pair(parts[0], parts[1])  # type: ignore[attr-defined]
        a = check_fused(src, next(iter(parts[0].values())).transform.image_size, "fuse_pair")
        b = check_fused(tgt, next(iter(parts[1].values())).transform.image_size, "fuse_pair")
        assert a.shape[0] == b.shape[0]

    def test_training(self, tmp_path: Path) -> None:
        aggregator = self.make_aggregator()
        if not is_trainable(aggregator):
            _skip("not a trainable aggregator")
        check_trainable(aggregator, self.features(), tmp_path)


# -- matchers --------------------------------------------------------------------------------


def default_views(with_descriptors: bool = True) -> tuple[View, View]:
    """Views of :func:`default_images` with ColorBlur descriptors (or images only)."""
    images = default_images()
    if not with_descriptors:
        return tuple(  # type: ignore[return-value]
            View(im.image, ImageTransform.resize(im.size, im.size), source=im.source)
            for im in images
        )
    extractor = ColorBlurExtractor(ColorBlurOptions(image_size=[32, 24], stride=2))
    features = extractor.extract(images)
    return tuple(  # type: ignore[return-value]
        View(im.image, fs.transform, fs.layers["color"][0], features=fs, source=im.source)
        for im, fs in zip(images, features)
    )


def default_points() -> torch.Tensor:
    """Source points ``[N, 2]`` inside the first default image (80 x 60): corners and inside."""
    return torch.tensor([[0.0, 0.0], [79.0, 59.0], [40.0, 30.0], [12.5, 47.25]])


def check_match_result(result: object, n: int, target_size: Size) -> None:
    """``MatchResult`` with points ``[N, 2]`` (finite floats), scores ``[N]``, valid ``[N]`` bools;
    valid points lie on the target image."""
    assert isinstance(result, MatchResult), f"expected a MatchResult, got {type(result).__name__}"
    pts, scores, valid = result.points, result.scores, result.valid
    assert tuple(pts.shape) == (n, 2), f"points: expected [{n}, 2], got {tuple(pts.shape)}"
    assert pts.is_floating_point(), f"points: expected floats, got {pts.dtype}"
    assert tuple(scores.shape) == (n,), f"scores: expected [{n}], got {tuple(scores.shape)}"
    assert tuple(valid.shape) == (n,), f"valid: expected [{n}], got {tuple(valid.shape)}"
    assert valid.dtype == torch.bool, f"valid: expected bools, got {valid.dtype}"
    assert torch.isfinite(pts).all(), "points: non-finite values"
    w, h = target_size
    inside = (
        (pts[:, 0] >= -0.5) & (pts[:, 0] <= w - 0.5) & (pts[:, 1] >= -0.5) & (pts[:, 1] <= h - 0.5)
    )
    assert bool(inside[valid].all()), "valid points outside the target image"
    json.dumps(result.to_json())


def check_matcher(
    make_matcher: Callable[[], Matcher],
    views: tuple[View, View] | None = None,
    points: torch.Tensor | None = None,
) -> None:
    """Every matcher check: the result's shapes and types, determinism, and that a matcher
    declaring ``needs_descriptors = False`` works from images alone."""
    matcher = make_matcher()
    if views is None:
        views = default_views(with_descriptors=needs_descriptors(matcher))
    points = points if points is not None else default_points()
    source, target = views
    if not needs_descriptors(matcher):
        assert source.descriptors is None and target.descriptors is None, (
            "a query-conditioned matcher is checked on views without descriptors"
        )
    result = matcher.match(source, target, points)
    check_match_result(result, len(points), target.image_size)
    again = make_matcher().match(source, target, points)
    torch.testing.assert_close(again.points, result.points)
    torch.testing.assert_close(again.scores, result.scores)


class MatcherConformance:
    """Pytest mixin: subclass it and provide ``make_matcher()``.

    Checks that ``match(source, target, points)`` returns a :class:`MatchResult`
    with points ``[N, 2]``, scores ``[N]`` and valid ``[N]`` (valid points on
    the target image), deterministically, and that a matcher with
    ``needs_descriptors = False`` works on views that carry no descriptors.
    Override ``views()`` / ``points()`` for other inputs.
    """

    def make_matcher(self) -> Matcher:  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    def views(self) -> tuple[View, View]:
        return default_views(with_descriptors=needs_descriptors(self.make_matcher()))

    def points(self) -> torch.Tensor:
        return default_points()

    def test_match_result(self) -> None:
        source, target = self.views()
        points = self.points()
        check_match_result(
            self.make_matcher().match(source, target, points), len(points), target.image_size
        )

    def test_deterministic(self) -> None:
        source, target = self.views()
        a = self.make_matcher().match(source, target, self.points())
        b = self.make_matcher().match(source, target, self.points())
        torch.testing.assert_close(a.points, b.points)
        torch.testing.assert_close(a.scores, b.scores)

    def test_needs_descriptors(self) -> None:
        matcher = self.make_matcher()
        if needs_descriptors(matcher):
            source, target = self.views()
            assert source.descriptors is not None and target.descriptors is not None
            return
        source, target = default_views(with_descriptors=False)
        points = self.points()
        check_match_result(matcher.match(source, target, points), len(points), target.image_size)


# -- datasets --------------------------------------------------------------------------------


def check_pair(pair: object, *, points_inside: bool = True) -> None:
    """One pair in the schema: a :class:`Pair`, readable images, ``[N, 2]`` points, ``[N]``
    visibility; annotated sizes match the files; visible points lie on their images."""
    assert isinstance(pair, Pair), f"expected a Pair, got {type(pair).__name__}"
    n = pair.num_points
    assert pair.source_points.shape == (n, 2) and pair.target_points.shape == (n, 2)
    assert pair.visible is not None and pair.visible.shape == (n,)
    assert pair.visible.dtype == bool
    json.dumps(pair.to_dict())
    assert Pair.from_dict(pair.to_dict()).to_dict() == pair.to_dict(), "to_dict/from_dict differ"
    for path, points, annotated in (
        (pair.source, pair.source_points, pair.source_size),
        (pair.target, pair.target_points, pair.target_size),
    ):
        image = load_image(path)
        if annotated is not None:
            assert tuple(annotated) == image.size, f"{path}: annotated size {annotated} != file"
        if points_inside and pair.num_visible:
            w, h = image.size
            vis = points[pair.visible]
            assert ((vis >= -0.5) & (vis <= np.array([w - 0.5, h - 0.5]))).all(), (
                f"pair {pair.id}: visible points outside {path}"
            )


def check_dataset(dataset: Dataset, *, points_inside: bool = True) -> list[Pair]:
    """A dataset yields at least one pair, ids unique, every pair in the schema; returns them."""
    pairs = list(dataset.pairs())
    assert pairs, "the dataset yields no pair"
    ids = [p.id for p in pairs]
    assert len(set(ids)) == len(ids), "pair ids repeat"
    for pair in pairs:
        check_pair(pair, points_inside=points_inside)
    for attr in ("title", "url", "layout", "default_protocol"):
        value = getattr(dataset, attr, "")
        assert isinstance(value, str), f"{attr} must be a str (shown by `diffeat datasets`)"
    return pairs


class DatasetConformance:
    """Pytest mixin: subclass it and provide ``make_dataset()`` (on data it can read).

    Checks that the dataset yields :class:`~diffeat.core.datasets.Pair`
    objects with unique ids, readable images, ``[N, 2]`` points and ``[N]``
    visibility, annotated sizes equal to the files', visible points on their
    images (``check_points_inside = False`` to skip that), the same pairs on
    every iteration, and a default protocol the evaluation knows.
    """

    check_points_inside: bool = True

    def make_dataset(self) -> Dataset:  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    def test_pairs(self) -> None:
        check_dataset(self.make_dataset(), points_inside=self.check_points_inside)

    def test_pairs_repeatable(self) -> None:
        dataset = self.make_dataset()
        first = [p.to_dict() for p in dataset.pairs()]
        assert first == [p.to_dict() for p in dataset.pairs()]

    def test_default_protocol(self) -> None:
        from diffeat.eval.protocols import get_protocol

        name = getattr(self.make_dataset(), "default_protocol", "")
        if name:
            get_protocol(name)
