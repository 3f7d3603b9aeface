"""``diffeat quickstart``: the real executable builds the tiny model and matches, offline."""

from __future__ import annotations

import json
import sys

import pytest
from clihelp import run
from PIL import Image

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.slow


def test_quickstart_builds_matches_and_reuses(tmp_path):
    folder = tmp_path / "qs"
    proc = run("quickstart", folder)
    assert "built the tiny offline model" in proc.stderr
    # quick by construction, not by a stopwatch (no test asserts on elapsed time): a model
    # of a few MB and a pipeline sized for it (128 px, 2 noise copies, one timestep)
    weights = sum(p.stat().st_size for p in (folder / "tiny-sd").rglob("*") if p.is_file())
    assert weights < 32 * 2**20, weights
    config = tomllib.loads((folder / "quickstart.toml").read_text())["extractor"]
    assert config["image_size"] == [128, 128] and config["ensemble_size"] == 2
    assert len(config["timesteps"]) == 1
    lines = proc.stdout.splitlines()
    matches = [line for line in lines if line.startswith("  ") and "->" in line]
    assert len(matches) == 3 and all("score" in m for m in matches)
    assert any(line.startswith("  diffeat match ") for line in lines)
    assert "Traceback" not in proc.stderr
    for name in ("tiny-sd/model_index.json", "quickstart.toml", "source.png", "target.png"):
        assert (folder / name).is_file(), name
    assert Image.open(folder / "matches.png").size[0] > 0

    again = json.loads(run("quickstart", folder, "--json").stdout)
    assert again["model"] == str(folder / "tiny-sd")
    assert [m["source"] for m in again["matches"]] == [[40.0, 30.0], [64.0, 48.0], [90.0, 60.0]]
    for m in again["matches"]:
        w, h = Image.open(folder / "target.png").size
        assert 0 <= m["target"][0] < w and 0 <= m["target"][1] < h
    assert (folder / "features.zarr").exists()
    # the printed next command runs as given
    first = again["next"][0].split()
    assert first[:2] == ["diffeat", "match"]
    out = run(*first[1:], "--json").stdout
    assert json.loads(out)["matches"][0]["source"] == [40.0, 30.0]


def test_quickstart_refuses_a_file_as_folder(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    proc = run("quickstart", path, check=2)
    assert "Traceback" not in proc.stderr and "a-file" in proc.stderr


def test_default_folder_is_under_the_user_cache(tmp_path, monkeypatch):
    from diffeat.cli.quickstart import default_directory

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_directory() == tmp_path / "diffeat" / "quickstart"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_directory().parts[-3:] == (".cache", "diffeat", "quickstart")
