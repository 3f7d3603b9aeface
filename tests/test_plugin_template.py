"""examples/plugin-template: pip-installable, found by entry point, its own tests pass.

It is what ``diffeat plugin new template --kind extractor --kind matcher`` writes
(``tests/test_plugin_new.py`` holds the two equal).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clihelp import cli_env, pip_install, run_json
from waiting import HANG_GUARD_S

from diffeat.testing import smooth_texture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "plugin-template"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the template's source, the folder it is pip-installed into)."""
    source = tmp_path_factory.mktemp("template") / "plugin"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("*.egg-info", "build"))
    site = tmp_path_factory.mktemp("site")
    pip_install(site, source)
    return source, site


def env_with(site: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return cli_env(PYTHONPATH=path)


def test_the_templates_own_tests_pass_against_the_installed_package(installed):
    source, site = installed
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(source / "tests")],
        cwd=source,
        env=env_with(site),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    # the tests imported the installed package, not the source folder
    where = subprocess.run(
        [sys.executable, "-c", "import diffeat_template as m; print(m.__file__)"],
        cwd=source,
        env=env_with(site),
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site))


def test_the_template_pipeline_runs_through_the_cli(installed, tmp_path):
    _, site = installed
    plugins = run_json("plugins", env=env_with(site))
    record = {p["name"]: p for p in plugins["plugins"]}["template"]
    assert record["ok"] and record["version"] == "0.1.0"
    assert set(record["provides"]) == {"extractor:template-resnet", "matcher:template-ratio"}
    img = smooth_texture((96, 72), seed=4)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    out = run_json(
        "match",
        TEMPLATE / "template.toml",
        tmp_path / "a.png",
        tmp_path / "b.png",
        "-p",
        "40,30",
        "--set",
        "extractor.image_size=[96,96]",
        env=env_with(site),
    )
    (m,) = out["matches"]
    assert abs(m["target"][0] - 40) <= 8 and abs(m["target"][1] - 30) <= 8
