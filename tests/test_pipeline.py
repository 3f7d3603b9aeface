"""The pipeline with a store: reuse, precision and laziness."""

from __future__ import annotations

import torch

from diffeat.core.pipeline import Pipeline
from diffeat.testing import ColorBlurExtractor, smooth_texture


def test_second_run_reads_the_store_and_sees_the_same_features(manager, tmp_path, texture_files):
    data = {"extractor": {"plugin": "color-blur", "image_size": [32, 32]}}
    store = tmp_path / "f.zarr"
    first = Pipeline.from_dict(data, store=store, manager=manager)
    before = ColorBlurExtractor.calls
    a = first.features(texture_files)
    assert ColorBlurExtractor.calls == before + 3
    second = Pipeline.from_dict(data, store=store, manager=manager)
    b = second.features(texture_files)
    assert ColorBlurExtractor.calls == before + 3
    for fa, fb in zip(a, b):
        assert torch.equal(fa.layers["color"], fb.layers["color"])  # both at store precision
    report = second.extract(texture_files)
    assert (report.total, report.computed, report.cached) == (3, 0, 3)


def test_stored_run_does_not_load_the_model(tiny_sd, tmp_path):
    data = {
        "extractor": {
            "plugin": "stable-diffusion",
            "model": str(tiny_sd),
            "image_size": [64, 64],
            "ensemble_size": 2,
        }
    }
    img = smooth_texture((50, 40), seed=3)
    store = tmp_path / "f.zarr"
    Pipeline.from_dict(data, store=store).features([img])
    again = Pipeline.from_dict(data, store=store)
    res = again.match(img, img, [(10, 10)])
    assert res.points.tolist() == [[10.0, 10.0]]
    assert again.extractor._parts is None


def test_stored_extractor_info(manager, tmp_path, texture_files):
    from diffeat.store import FeatureStore

    pipe = Pipeline.from_dict(
        {"extractor": {"plugin": "color-blur", "sigmas": [0.0, 1.0]}},
        store=tmp_path / "s.zarr",
        manager=manager,
    )
    pipe.extract(texture_files[:1])
    info = FeatureStore(tmp_path / "s.zarr", mode="r").extractors()[pipe.cache_key]
    assert info["plugin"] == "color-blur"
    assert info["config"]["sigmas"] == [0.0, 1.0]
    assert info["layers"] == [{"name": "color", "channels": 6, "stride": 1.0}]
    assert "torch" in info["versions"]
