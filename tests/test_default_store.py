"""The default feature store: ``--store`` wins, ``--no-store`` keeps nothing, else
``$DIFFEAT_STORE``, else none (extract, match, eval, plot features; the real CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clihelp import cli_env, pip_install, run, run_json

from diffeat.cli.common import resolve_store
from diffeat.core.errors import DiffeatError
from diffeat.testing import smooth_texture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "diffeat-example-plugin"
CONFIG = EXAMPLE / "example.toml"


def test_resolve_store_order(monkeypatch):
    monkeypatch.delenv("DIFFEAT_STORE", raising=False)
    assert resolve_store(None) is None
    assert resolve_store("a.zarr") == "a.zarr"
    monkeypatch.setenv("DIFFEAT_STORE", "/env/feats.zarr")
    assert resolve_store(None) == "/env/feats.zarr"
    assert resolve_store("a.zarr") == "a.zarr"  # --store wins
    assert resolve_store(None, no_store=True) is None  # --no-store disables
    with pytest.raises(DiffeatError, match="contradict"):
        resolve_store("a.zarr", no_store=True)
    monkeypatch.setenv("DIFFEAT_STORE", "")
    assert resolve_store(None) is None  # set but empty: no store


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example plugin (pixel patches, no weights) pip-installed into a folder."""
    site = tmp_path_factory.mktemp("site")
    pip_install(site, EXAMPLE)
    return site


def env(site: Path, store: Path | None) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    extra = {"PYTHONPATH": path}
    if store is not None:
        extra["DIFFEAT_STORE"] = str(store)
    base = cli_env(**extra)
    if store is None:
        base.pop("DIFFEAT_STORE", None)
    return base


@pytest.fixture
def images(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    smooth_texture((64, 64), seed=1).save(a)
    smooth_texture((64, 64), seed=2).save(b)
    return a, b


def entries(store: Path, site: Path) -> int:
    info = run_json("store", "info", store, env=env(site, None))
    return sum(v["entries"] for v in info["extractors"].values())


def targets(out: dict) -> list[list[float]]:
    """The matched points (scores differ in the last digits: the store keeps float16)."""
    return [m["target"] for m in out["matches"]]


@pytest.mark.slow
def test_match_uses_diffeat_store_unless_told_otherwise(site, images, tmp_path):
    a, b = images
    default = tmp_path / "default.zarr"
    match = ("match", CONFIG, a, b, "-p", "10,10")
    first = run_json(*match, env=env(site, default))
    assert entries(default, site) == 2  # both images kept where DIFFEAT_STORE says
    assert run_json(*match, env=env(site, default)) == first  # read back: same matches
    # --no-store: nothing written, even with DIFFEAT_STORE set
    elsewhere = tmp_path / "unused.zarr"
    assert targets(run_json(*match, "--no-store", env=env(site, elsewhere))) == targets(first)
    assert not elsewhere.exists()
    # --store wins over DIFFEAT_STORE
    chosen = tmp_path / "chosen.zarr"
    run_json(*match, "--store", chosen, env=env(site, elsewhere))
    assert entries(chosen, site) == 2 and not elsewhere.exists()
    # neither: no store, as before
    assert targets(run_json(*match, env=env(site, None))) == targets(first)
    proc = run(*match, "--store", chosen, "--no-store", env=env(site, None), check=2)
    assert "contradict" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_extract_writes_into_diffeat_store(site, images, tmp_path):
    default = tmp_path / "default.zarr"
    out = run_json("extract", CONFIG, *images, env=env(site, default))
    assert out["store"] == str(default) and out["computed"] == 2
    assert entries(default, site) == 2
    again = run_json("extract", CONFIG, *images, env=env(site, default))
    assert again["computed"] == 0
    proc = run("extract", CONFIG, *images, env=env(site, None), check=2)
    assert "--store PATH" in proc.stderr and "DIFFEAT_STORE" in proc.stderr


@pytest.mark.slow
def test_plot_features_reads_diffeat_store(site, images, tmp_path):
    default = tmp_path / "default.zarr"
    a, _ = images
    plot = ("plot", "features", CONFIG, a, "--out", tmp_path / "f.png")
    assert run_json(*plot, env=env(site, default))["from_store"] is False
    assert entries(default, site) == 1
    assert run_json(*plot, env=env(site, default))["from_store"] is True
    assert run_json(*plot, "--no-store", env=env(site, default))["from_store"] is False


@pytest.mark.slow
def test_eval_uses_diffeat_store(site, tmp_path):
    from test_eval import make_translate_bench, texture_folder

    bench = tmp_path / "bench"
    make_translate_bench(bench, texture_folder(tmp_path / "photos"), 3, env(site, None))
    default = tmp_path / "default.zarr"
    evaluate = ("eval", CONFIG, "--dataset", "synthetic", "--root", bench, "--no-plots")
    first = run_json(*evaluate, env=env(site, default))
    assert first["store"] is not None and first["run"]["features"]["computed"] > 0
    second = run_json(*evaluate, env=env(site, default))
    assert second["run"]["features"]["computed"] == 0
    off = run_json(*evaluate, "--no-store", env=env(site, default))
    assert off["store"] is None and off["run"]["features"]["read_from_store"] == 0
