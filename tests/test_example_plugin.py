"""A third-party plugin installed with pip and found through its entry point."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clihelp import cli_env, pip_install, run, run_json

from diffeat.testing import smooth_texture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example plugin and a deliberately broken one, pip-installed into one folder."""
    target = tmp_path_factory.mktemp("site")
    pip_install(target, ROOT / "examples" / "diffeat-example-plugin")
    broken = tmp_path_factory.mktemp("broken-src")
    (broken / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "diffeat-broken"\nversion = "9.9"\n'
        '[project.entry-points.diffeat]\nbroken = "diffeat_broken"\n'
    )
    (broken / "diffeat_broken.py").write_text("import a_module_that_does_not_exist\n")
    pip_install(target, broken)
    return target


def env_with(site: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return cli_env(PYTHONPATH=path, **extra)


def test_entry_point_plugin_is_found_and_broken_one_isolated(site):
    out = run_json("plugins", env=env_with(site))
    plugins = {p["name"]: p for p in out["plugins"]}
    assert plugins["example"]["ok"] and plugins["example"]["version"] == "0.1.0"
    assert "entry point (diffeat-example-plugin)" == plugins["example"]["origin"]
    assert set(plugins["example"]["provides"]) == {
        "extractor:example-patches",
        "matcher:example-l2",
    }
    assert (
        not plugins["broken"]["ok"] and "a_module_that_does_not_exist" in plugins["broken"]["error"]
    )
    assert "stable-diffusion" in out["extractors"]
    text = run("plugins", env=env_with(site)).stdout
    assert "broken 9.9" in text and "BROKEN" in text


def test_plugin_pipeline_runs_through_the_cli(site, tmp_path):
    img = smooth_texture((64, 64), seed=9)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    out = run_json(
        "match",
        ROOT / "examples" / "diffeat-example-plugin" / "example.toml",
        tmp_path / "a.png",
        tmp_path / "b.png",
        "-p",
        "20,30",
        env=env_with(site),
    )
    assert out["matches"][0]["target"] == [20.0, 30.0]


def test_allow_and_deny_lists(site):
    only = run_json("plugins", env=env_with(site, DIFFEAT_PLUGINS="example"))
    assert {p["name"] for p in only["plugins"]} >= {"example"} and "broken" not in {
        p["name"] for p in only["plugins"]
    }
    none = run_json("plugins", env=env_with(site, DIFFEAT_PLUGINS="none"))
    assert "example" not in {p["name"] for p in none["plugins"]}
    denied = run_json("plugins", env=env_with(site, DIFFEAT_DISABLE_PLUGINS="example,broken"))
    assert "example-patches" not in denied["extractors"]
