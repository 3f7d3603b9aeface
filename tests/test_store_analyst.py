"""The store for analysts: the xarray view's pixel coordinates, absolute sources, and a
dataset that plots over its image without diffeat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffeat.core.features import FeatureSet
from diffeat.core.geometry import ImageTransform
from diffeat.core.paths import absolute_source
from diffeat.store import FeatureStore
from diffeat.store.xarray_view import cell_coordinates
from diffeat.testing import smooth_texture

xr = pytest.importorskip("xarray")

#: the non-square test image (width, height) and the tiny model's input size
IMAGE = (80, 48)
MODEL = 64
LAYER = "up_blocks.1"  # stride 16 on the tiny model: a 4 x 4 grid at 64 px


@pytest.fixture(scope="module")
def extracted(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny-model entry of an 80 x 48 image, extracted from a relative path."""
    from diffeat.core.pipeline import Pipeline

    folder = tmp_path_factory.mktemp("analyst")
    smooth_texture(IMAGE, seed=3).save(folder / "photo.png")
    data = {
        "extractor": {
            "plugin": "stable-diffusion",
            "model": str(tiny_sd),
            "image_size": [MODEL, MODEL],
            "ensemble_size": 1,
            "layers": [LAYER],
        }
    }
    pipe = Pipeline.from_dict(data, store=folder / "feats.zarr")
    cwd = os.getcwd()
    os.chdir(folder)  # the user names the image relative to where they are
    try:
        report = pipe.extract(["photo.png"])
    finally:
        os.chdir(cwd)
    assert report.computed == 1
    (image_key,) = pipe.store.entries(pipe.cache_key)
    return folder, pipe.store, pipe.cache_key, image_key


def test_coordinates_equal_a_hand_computation(extracted) -> None:
    _, store, cache_key, image_key = extracted
    ds = store.open_xarray(cache_key, image_key, LAYER)
    *_, h, w = ds["features"].shape
    assert (h, w) == (4, 4)
    # model input 64 x 64 covered by 4 x 4 cells of 16 px: centre of cell j at 16 j + 7.5
    np.testing.assert_allclose(ds["x_input"].values, [7.5, 23.5, 39.5, 55.5])
    np.testing.assert_allclose(ds["y_input"].values, [7.5, 23.5, 39.5, 55.5])
    # squashed 80 x 48 -> 64 x 64: one model pixel is 80/64 = 1.25 image px across and
    # 48/64 = 0.75 down; the pixel-centre rule image = (model + 0.5) * ratio - 0.5
    for j in range(w):
        assert ds["x_image"].values[j] == pytest.approx((16 * j + 8) * 1.25 - 0.5)  # 9.5 + 20 j
    for i in range(h):
        assert ds["y_image"].values[i] == pytest.approx((16 * i + 8) * 0.75 - 0.5)  # 5.5 + 12 i
    assert ds["x_image"].dims == ("x",) and ds["y_image"].dims == ("y",)
    assert ds.attrs["image_size"] == [80, 48] and ds.attrs["model_size"] == [64, 64]
    assert ds.attrs["transform_scale"] == pytest.approx([0.8, 64 / 48])
    assert ds.attrs["transform_offset"] == [0.0, 0.0]
    # the grid covers the whole image: imshow extent [left, right, bottom, top]
    assert ds.attrs["extent_image"] == pytest.approx([-0.5, 79.5, 47.5, -0.5])
    # the same numbers as the library's own mapping of a cell to the image
    tr = ImageTransform.from_dict(store.entry_info(cache_key, image_key)["meta"]["transform"])
    cell = torch.tensor([[2.0, 3.0]])
    x, y = tr.grid_to_image(cell, (w, h))[0].tolist()
    assert (ds["x_image"].values[2], ds["y_image"].values[3]) == pytest.approx((x, y))


def test_source_is_stored_absolute(extracted) -> None:
    folder, store, cache_key, image_key = extracted
    info = store.entry_info(cache_key, image_key)
    expected = str((folder / "photo.png").absolute())
    assert info["source"] == expected
    assert info["meta"]["source"] == expected
    assert store.open_xarray(cache_key, image_key, LAYER).attrs["source"] == expected


def test_absolute_source_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    assert absolute_source("b.png") == str(tmp_path / "b.png")
    assert absolute_source("clips/a.mp4#12") == str(tmp_path / "clips" / "a.mp4") + "#12"
    for kept in ("<memory>", "s3://bucket/x.png", "/abs/missing.png", "missing.png", "free text"):
        assert absolute_source(kept) == kept


def test_plotting_over_the_image_needs_no_diffeat(extracted, tmp_path: Path) -> None:
    """The view, saved, is read and placed over its image by a process without diffeat."""
    _, store, cache_key, image_key = extracted
    ds = store.open_xarray(cache_key, image_key, LAYER).load()
    ds.to_zarr(tmp_path / "view.zarr", zarr_format=3, consolidated=False)
    script = f"""
import sys
sys.modules["diffeat"] = None  # importing diffeat now fails
import json
import numpy as np
import xarray as xr
from PIL import Image

ds = xr.open_zarr({str(tmp_path / "view.zarr")!r}, zarr_format=3, consolidated=False)
image = np.asarray(Image.open(ds.attrs["source"]))
heat = ds["features"].isel(timestep=0).astype("float32").mean("channel")
# the cell under image pixel (x=50, y=30): nearest centre in image coordinates
j = int(np.abs(ds["x_image"].values - 50).argmin())
i = int(np.abs(ds["y_image"].values - 30).argmin())
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.imshow(image)
plt.imshow(heat, extent=ds.attrs["extent_image"], alpha=0.5)
xs, ys = np.meshgrid(ds["x_image"], ds["y_image"])
plt.scatter(xs, ys, s=4)
plt.savefig({str(tmp_path / "over.png")!r})
print(json.dumps({{
    "image": list(image.shape), "cell": [i, j], "value": float(heat.values[i, j]),
    "extent": ds.attrs["extent_image"],
    "x_image": ds["x_image"].values.tolist(), "y_image": ds["y_image"].values.tolist(),
}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["image"] == [48, 80, 3]
    # x centres 9.5, 29.5, 49.5, 69.5; y centres 5.5, 17.5, 29.5, 41.5
    assert got["cell"] == [2, 2]
    expected = store.get(cache_key, image_key).layers[LAYER][0].float().mean(0)[2, 2]
    assert got["value"] == pytest.approx(float(expected), rel=1e-3)
    assert got["x_image"] == pytest.approx([9.5, 29.5, 49.5, 69.5])
    assert got["y_image"] == pytest.approx([5.5, 17.5, 29.5, 41.5])
    assert got["extent"] == pytest.approx([-0.5, 79.5, 47.5, -0.5])
    assert (tmp_path / "over.png").stat().st_size > 0


def test_padded_input_maps_through_the_offset() -> None:
    # 80 x 48 letterboxed into 64 x 64: scale 0.8, 64 x 38 image 13 rows down (SD-DINO's pad)
    from diffeat.core.images import fit_transform

    t = fit_transform(IMAGE, (MODEL, MODEL), "pad")
    assert t.offset == (0.0, 13.0)
    coords, attrs = cell_coordinates((4, 4), t.to_dict())
    sy = 38 / 48
    # model y of cell i is 16 i + 7.5; image y = (model y - 13 + 0.5) / sy - 0.5
    expected = [(16 * i + 7.5 - 13 + 0.5) / sy - 0.5 for i in range(4)]
    np.testing.assert_allclose(coords["y_image"][1], expected)
    assert coords["y_image"][1][0] < -0.5  # the first row of cells lies on the padding
    top, bottom = attrs["extent_image"][3], attrs["extent_image"][2]
    assert top == pytest.approx((-13) / sy - 0.5) and bottom == pytest.approx((64 - 13) / sy - 0.5)


def test_entry_without_a_transform_gets_input_coordinates_and_a_note(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "s.zarr")
    store.register_extractor("ck", {"layers": [{"name": "f", "channels": 2, "stride": 8.0}]})
    store.put("ck", "old", FeatureSet({"f": torch.ones(1, 2, 3, 5)}, (0,), {}))
    ds = store.open_xarray("ck", "old", "f")
    np.testing.assert_allclose(ds["x_input"].values, [3.5, 11.5, 19.5, 27.5, 35.5])
    np.testing.assert_allclose(ds["y_input"].values, [3.5, 11.5, 19.5])
    assert "x_image" not in ds.coords
    assert "no image transform" in ds.attrs["coordinates"]
    # and with no stride either: no coordinates, still a note
    store.put("ck2", "old", FeatureSet({"f": torch.ones(1, 2, 3, 5)}, (0,), {}))
    ds = store.open_xarray("ck2", "old", "f")
    assert "x_input" not in ds.coords and "no pixel coordinates" in ds.attrs["coordinates"]


def test_features_name_the_same_absolute_source_computed_or_read(
    manager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path: the features computed now and those read back from the store later
    carry the same (absolute) source."""
    from diffeat.core.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)
    smooth_texture((40, 32), seed=1).save(tmp_path / "rel.png")
    cfg = {"extractor": {"plugin": "color-blur", "image_size": [32, 32]}}
    store = FeatureStore(tmp_path / "feats.zarr")
    computed = Pipeline.from_dict(cfg, store=store, manager=manager).features(["rel.png"])[0]
    read = Pipeline.from_dict(cfg, store=store, manager=manager).features(["rel.png"])[0]
    assert computed.meta["source"] == read.meta["source"] == str(tmp_path / "rel.png")
    alone = Pipeline.from_dict(cfg, manager=manager).features(["rel.png"])[
        0
    ]  # no store: the same rule
    assert alone.meta["source"] == str(tmp_path / "rel.png")
