"""The README's promises: the files it names exist and its example pipelines run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from clihelp import run

from diffeat.core.config import load_config
from diffeat.core.pipeline import Pipeline
from diffeat.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_ci_test_command_is_in_the_readme():
    assert '\npip install -e ".[test]" && python -m pytest -q\n' in README


@pytest.mark.parametrize("doc", ["README.md", "docs/hyperfeatures.md", "docs/getting-started.md"])
def test_every_example_file_named_exists(doc):
    path = ROOT / doc
    if not path.is_file():
        pytest.skip(f"{doc} not written")
    named = set(re.findall(r"examples/[\w./-]+\.toml", path.read_text()))
    assert named, doc
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"{doc} names {missing}"


def test_generation_example_is_a_generation_pipeline():
    cfg = load_config(ROOT / "examples" / "generation-sd15.toml")
    assert cfg.extractor.options.mode == "generation"


@pytest.mark.slow
def test_generation_example_generates_and_matches_with_a_tiny_model(tiny_sd, tmp_path):
    cfg = ROOT / "examples" / "generation-sd15.toml"
    small = [
        "--model", str(tiny_sd),
        "--set", "extractor.image_size=[64,64]",
        "--set", "extractor.inversion_steps=5",
        "--set", "extractor.timesteps=[800,0]",
        "--set", 'extractor.dtype="float32"',
        "--set", "aggregator.size=[8,8]",
    ]  # fmt: skip
    store = tmp_path / "gen.zarr"
    out = tmp_path / "cats"
    run("generate", cfg, "--count", "2", "--out", out, "--store", store, *small)
    images = sorted(out.glob("*.png"))
    assert len(images) == 2
    # matching reads the generated images' maps from the store (in process: one CLI start less)
    overrides = [f"extractor.model={json.dumps(str(tiny_sd))}"] + small[3::2]
    pipe = Pipeline(load_config(cfg, overrides), store=FeatureStore(store))
    result = pipe.match(str(images[0]), str(images[1]), [(32.0, 32.0)])
    assert result.points.shape == (1, 2)
