"""``diffeat generate``: images sampled by a generation-mode pipeline, features kept in the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clihelp import run, run_json

from diffeat.core.images import as_input
from diffeat.store import FeatureStore

pytestmark = pytest.mark.slow


def write_config(path: Path, model: Path) -> Path:
    path.write_text(
        f"""
[extractor]
plugin = "stable-diffusion"
model = "{model}"
mode = "generation"
layers = ["up_blocks.*.resnets.*.conv2"]
timesteps = [800, 0]
inversion_steps = 5
image_size = [64, 64]
prompt = "a photo"
device = "cpu"

[aggregator]
plugin = "hyperfeatures"
projection_dim = 32
norm_groups = 8
size = [16, 16]
"""
    )
    return path


def test_generate_saves_images_and_stores_their_features(tiny_sd, tmp_path):
    cfg = write_config(tmp_path / "gen.toml", tiny_sd)
    store = tmp_path / "s.zarr"
    out = run_json(
        "generate", cfg, "--count", 2, "--seed", 3, "--out", tmp_path / "imgs", "--store", store
    )
    paths = [Path(item["image"]) for item in out["images"]]
    assert [p.name for p in paths] == ["a-photo-3.png", "a-photo-4.png"]
    fs = FeatureStore(store, mode="r")
    keys = fs.entries(out["cache_key"])
    assert sorted(keys) == sorted(as_input(p).key for p in paths)
    stored = fs.get(out["cache_key"], as_input(paths[0]).key)
    assert stored.timesteps == (800, 0)
    assert len(stored.layers) == 12
    # matching the generated images reads the stored maps (the extractor cannot extract them)
    res = run_json("match", cfg, paths[0], paths[1], "--point", "10,20", "--store", store)
    assert len(res["matches"]) == 1
    x, y = res["matches"][0]["target"]
    assert 0 <= x < 64 and 0 <= y < 64
    # different seeds give different images
    a, b = (np.asarray(as_input(p).image) for p in paths)
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)


def test_generate_needs_generation_mode(tiny_sd, tmp_path):
    cfg = write_config(tmp_path / "gen.toml", tiny_sd)
    proc = run(
        "generate", cfg, "--out", tmp_path / "imgs", "--set", 'extractor.mode="inversion"', check=2
    )
    assert "generation" in proc.stderr and "Traceback" not in proc.stderr
