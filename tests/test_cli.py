"""The real ``diffeat`` executable, end to end, on a tiny random-weight SD model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clihelp import cli_env, run, run_json, tiny_dift_config
from PIL import Image

from diffeat.testing import smooth_texture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config(tiny_sd, tmp_path_factory) -> Path:
    return tiny_dift_config(tiny_sd, tmp_path_factory.mktemp("cfg") / "tiny.toml")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for i in range(3):
        smooth_texture((80 + 8 * i, 64), seed=i).save(d / f"p{i}.png")
    return d


def assert_user_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def test_version_and_plugins():
    assert "diffeat, version" in run("--version").stdout
    out = run_json("plugins")
    names = {p["name"]: p for p in out["plugins"]}
    assert (
        names["stable-diffusion"]["ok"]
        and "extractor:stable-diffusion" in names["stable-diffusion"]["provides"]
    )
    assert out["matchers"] == sorted(["cross-attention", "nearest", "mutual", "soft-argmax"])


def test_plugin_commands_are_listed_and_leave_with_their_plugin():
    listed = run("--help").stdout
    assert all(f"  {name} " in listed for name in ("generate", "checkpoint", "plot", "extract"))
    assert "mixing-weights" in run("plot", "--help").stdout
    without = run("--help", env=cli_env(DIFFEAT_DISABLE_PLUGINS="hyperfeatures")).stdout
    assert "  generate " in without and "  checkpoint " not in without
    # `plot features` is built in: the group stays, without the plugin's mixing-weights
    plot_help = run("plot", "--help", env=cli_env(DIFFEAT_DISABLE_PLUGINS="hyperfeatures")).stdout
    assert "features" in plot_help and "mixing-weights" not in plot_help
    proc = run(
        "checkpoint", "info", "x", env=cli_env(DIFFEAT_DISABLE_PLUGINS="hyperfeatures"), check=2
    )
    assert "No such command 'checkpoint'" in proc.stderr


def test_registering_plugin_commands_imports_no_command_body():
    """Start-up: the commands' heavy modules are imported when a command runs, not before."""
    code = (
        "import sys; from diffeat.cli import main; main._add_commands(); "
        "print(sorted(m for m in sys.modules if m in {"
        "'diffeat.plugins.stable_diffusion.generation', 'diffeat.plugins.hyperfeatures.plot', "
        "'diffeat.plugins.hyperfeatures.official', 'diffeat.viz_features', 'matplotlib'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def test_config_show(config):
    out = run("config", "show", ROOT / "examples" / "dift-sd21.toml").stdout
    assert (
        "timesteps = [261]" in out
        and 'plugin = "nearest"' in out
        and "encode_per_copy = false" in out
    )
    js = run_json("config", "show", config, "--set", "extractor.seed=3")
    assert js["config"]["extractor"]["seed"] == 3


def test_layers(config):
    out = run_json("layers", config)
    assert out == {
        "layers": [{"name": "up_blocks.1", "channels": 32, "stride": 16.0}],
        "timesteps": [261],
    }
    text = run("layers", config, "--set", 'extractor.layers=["up_blocks.*.resnets.*.conv2"]').stdout
    assert "up_blocks.3.resnets.2.conv2" in text


def test_extract_then_rerun_computes_nothing(config, photos, tmp_path):
    store = tmp_path / "feats.zarr"
    first = run_json("extract", config, photos, "--store", store)
    assert (first["images"], first["computed"], first["cached"]) == (3, 3, 0)
    # the same image under another name is found by content
    shutil.copy(photos / "p0.png", tmp_path / "renamed.png")
    second = run_json("extract", config, photos, tmp_path / "renamed.png", "--store", store)
    assert (second["images"], second["computed"], second["cached"]) == (4, 0, 4)
    # a changed config never returns stale features
    third = run_json(
        "extract", config, photos, "--store", store, "--set", "extractor.timesteps=[100]"
    )
    assert third["computed"] == 3 and third["cache_key"] != first["cache_key"]
    info = run_json("store", "info", store)
    assert {v["entries"] for v in info["extractors"].values()} == {3}
    listing = run_json("store", "ls", store, "--key", first["cache_key"])
    assert len(listing) == 3 and all("up_blocks.1" in row["layers"] for row in listing)
    assert "2 " not in run("store", "info", store).stderr


def test_match_json_and_plot(config, photos, tmp_path):
    plot = tmp_path / "m.png"
    out = run_json(
        "match",
        config,
        photos / "p0.png",
        photos / "p1.png",
        "--point",
        "10,20",
        "-p",
        "40,30",
        "--plot",
        plot,
    )
    assert len(out["matches"]) == 2
    for m in out["matches"]:
        x, y = m["target"]
        assert 0 <= x <= 87 and 0 <= y <= 63 and -1 <= m["score"] <= 1
    with Image.open(plot) as im:
        assert im.width >= 80 + 88


def test_match_same_image_finds_the_same_points(config, photos):
    out = run_json(
        "match", config, photos / "p2.png", photos / "p2.png", "-p", "30,30", "-p", "60,10"
    )
    assert [m["target"] for m in out["matches"]] == [[30.0, 30.0], [60.0, 10.0]]


def test_user_errors(config, photos, tmp_path):
    assert_user_error(
        run("match", config, tmp_path / "none.jpg", photos / "p0.png", "-p", "1,1", check=None),
        "image not found",
        "none.jpg",
    )
    assert_user_error(
        run("match", config, photos / "p0.png", photos / "p1.png", "-p", "500,1", check=None),
        "outside the 80x64 image",
    )
    assert_user_error(
        run("match", config, photos / "p0.png", photos / "p1.png", "-p", "1;1", check=None),
        "bad --point '1;1'",
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[extractor]\nplugin = "stable-diffusion"\ntimestep = [3]\n')
    assert_user_error(
        run("layers", bad, check=None), "unknown option 'timestep'", "did you mean 'timesteps'"
    )
    assert_user_error(
        run("layers", config, "--model", tmp_path, check=None),
        "not a diffusers Stable Diffusion folder",
    )
    assert_user_error(
        run(
            "layers", ROOT / "examples" / "dift-sd21.toml", "--model", "nobody/nothing", check=None
        ),
        "--model DIR",
    )
    notimg = tmp_path / "imgs"
    notimg.mkdir()
    (notimg / "x.jpg").write_text("not an image")
    smooth_texture((40, 40)).save(notimg / "ok.png")
    proc = run("extract", config, notimg, "--store", tmp_path / "s.zarr", check=None)
    assert_user_error(proc, "x.jpg is not an image file")
    assert "1 extracted" in proc.stdout
    assert_user_error(run("store", "info", tmp_path / "missing.zarr", check=None), "missing.zarr")
    assert run("frobnicate", check=None).returncode == 2


def test_match_turns_photos_upright_unless_raw_orientation(config, tmp_path):
    photo = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # view rotated 90 degrees clockwise: 64 x 32 raster, 32 x 64 upright
    smooth_texture((64, 32), seed=5).save(photo, exif=exif)
    # x = 50 lies inside the raster but outside the upright photo
    proc = run("match", config, photo, photo, "--point", "50,10", check=None)
    assert_user_error(proc, "outside")
    out = run_json("--raw-orientation", "match", config, photo, photo, "--point", "50,10")
    assert out["matches"][0]["source"] == [50.0, 10.0]
