"""The real ``diffeat`` executable on a tiny random SDXL-Turbo with the DistillDIFT preset,
and ``diffeat layers`` (configured and ``--all``) against the extractor's catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest
from clihelp import run, run_json

from diffeat.core.config import load_config
from diffeat.testing import smooth_texture
from diffeat.testing.sdxl import build_tiny_sdxl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "examples" / "distilldift-sdxl-turbo.toml"
PROMPT = 'extractor.prompt="a photo of a cat"'


@pytest.fixture(scope="module")
def turbo(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-turbo") / "model", turbo=True)


@pytest.fixture(scope="module")
def config(turbo, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "turbo.toml"
    text = PRESET.read_text().replace('"stabilityai/sdxl-turbo"', f'"{turbo}"')
    p.write_text(text.replace("[768, 768]", "[64, 64]"))
    return p


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for i in range(3):
        smooth_texture((80 + 8 * i, 64), seed=i).save(d / f"p{i}.png")
    return d


def test_preset_is_distilldifts_choice():
    ex = load_config(PRESET).resolved()["extractor"]
    assert ex["model"] == "stabilityai/sdxl-turbo"
    assert (ex["timesteps"], ex["ensemble_size"], ex["image_size"]) == ([101], 1, [768, 768])
    assert ex["layers"] == ["up_blocks.0.resnets.0"] and ex["added_conditioning"] == "none"


def test_extract_store_and_match(config, photos, tmp_path):
    store = tmp_path / "feats.zarr"
    first = run_json("extract", config, photos, "--store", store, "--set", PROMPT)
    assert (first["images"], first["computed"], first["cached"]) == (3, 3, 0)
    again = run_json("extract", config, photos, "--store", store, "--set", PROMPT)
    assert (again["computed"], again["cached"]) == (0, 3)
    listing = run_json("store", "ls", store, "--key", first["cache_key"])
    assert len(listing) == 3 and all("up_blocks.0.resnets.0" in r["layers"] for r in listing)
    out = run_json(
        "match", config, photos / "p2.png", photos / "p2.png", "-p", "30,30", "-p", "60,20",
        "--category", "cat", "--store", store,
    )  # fmt: skip
    assert [m["target"] for m in out["matches"]] == [[30.0, 30.0], [60.0, 20.0]]
    other = run_json("match", config, photos / "p0.png", photos / "p1.png", "-p", "10,20",
                     "--category", "cat")  # fmt: skip
    x, y = other["matches"][0]["target"]
    assert 0 <= x <= 87 and 0 <= y <= 63


def test_layers_listing(config):
    out = run_json("layers", config)
    # SDXL: three levels; up_blocks.0 runs at 1/32 of the input (DistillDIFT's 24x24 at 768)
    assert out == {
        "layers": [{"name": "up_blocks.0.resnets.0", "channels": 32, "stride": 32.0}],
        "timesteps": [101],
    }
    every = run_json("layers", config, "--all")["layers"]
    by_name = {row["name"]: row for row in every}
    assert by_name["up_blocks.1"] == {"name": "up_blocks.1", "channels": 16, "stride": 8.0}
    assert by_name["mid_block"]["stride"] == 32.0 and by_name["conv_in"]["stride"] == 8.0
    text = run("layers", config, "--all").stdout
    assert "up_blocks.2.resnets.2.conv2" in text and "conv_out" in text


def test_user_errors(config, tmp_path):
    proc = run("layers", config, "--set", 'extractor.layers=["up_blocks.0.resnet.0"]', check=2)
    assert "Traceback" not in proc.stderr
    assert "nearest valid names: up_blocks.0.resnets.0" in proc.stderr
    bad = tmp_path / "sd3"
    (bad / "transformer").mkdir(parents=True)
    (bad / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    proc = run("layers", config, "--model", bad, check=2)
    assert "StableDiffusion3Pipeline" in proc.stderr and "Supported" in proc.stderr
