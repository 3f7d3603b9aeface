"""``diffeat plugin new``: the package it writes installs, registers and passes its own tests."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clihelp import DIFFEAT, cli_env, pip_install, run, run_json
from waiting import HANG_GUARD_S

from diffeat.cli.plugin_new import KINDS, plugin_package, template_dir
from diffeat.testing import smooth_texture

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin-template"
COMPONENTS = {
    "extractor": "resnet",
    "aggregator": "pool",
    "matcher": "ratio",
    "dataset": "pairs",
}


def env_with(site: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return cli_env(PYTHONPATH=path)


# -- what is written -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_is_rendered_valid_code(kind):
    package = plugin_package("my-plugin", [kind])
    assert f"src/diffeat_my_plugin/{kind}.py" in package.files
    assert f"tests/test_{kind}.py" in package.files
    for path, text in package.files.items():
        assert "{{" not in text and "}}" not in text, f"{path}: a placeholder is left"
        if path.endswith(".py"):
            ast.parse(text, filename=path)
        if path.endswith(".toml"):
            tomllib.loads(text)
    pyproject = tomllib.loads(package.files["pyproject.toml"])
    assert pyproject["project"]["name"] == "diffeat-my-plugin"
    assert pyproject["project"]["entry-points"]["diffeat"] == {"my-plugin": "diffeat_my_plugin"}
    init = package.files["src/diffeat_my_plugin/__init__.py"]
    assert f'register("my-plugin-{COMPONENTS[kind]}",' in init
    # a pipeline file for the pipeline stages, none for a dataset
    assert ("my-plugin.toml" in package.files) == (kind != "dataset")
    if kind != "dataset":
        stages = tomllib.loads(package.files["my-plugin.toml"])
        assert stages[kind]["plugin"] == f"my-plugin-{COMPONENTS[kind]}"
        assert {"extractor", "aggregator", "matcher"} <= set(stages)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_the_written_package_is_lint_clean_under_its_own_ruff_settings(tmp_path):
    folder = tmp_path / "all"
    run("plugin", "new", "all-kinds", *[a for k in KINDS for a in ("--kind", k)], "--dir", folder)
    for args in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        proc = subprocess.run(
            ["ruff", *args], cwd=folder, capture_output=True, text=True, timeout=HANG_GUARD_S
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_example_template_is_what_plugin_new_writes():
    """examples/plugin-template is rendered from the same files: they cannot drift apart."""
    package = plugin_package("template", ["extractor", "matcher"])
    on_disk = {
        p.relative_to(EXAMPLE).as_posix(): p.read_text(encoding="utf-8")
        for p in EXAMPLE.rglob("*")
        if p.is_file()
        and not any(
            part.startswith((".", "__pycache__", "build")) for part in p.relative_to(EXAMPLE).parts
        )
        and ".egg-info" not in str(p)
    }
    assert sorted(on_disk) == sorted(package.files)
    for path, text in package.files.items():
        assert on_disk[path] == text, (
            f"examples/plugin-template/{path} differs from the template; regenerate it with "
            "diffeat plugin new template --kind extractor --kind matcher --dir <new folder>"
        )


def test_the_template_files_are_shipped_as_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["diffeat.cli"]
    files = [
        p.relative_to(template_dir().parent).as_posix()
        for p in template_dir().rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert files
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} is not in the wheel"


def test_writes_into_dir_and_reports_json(tmp_path):
    out = run_json(
        "plugin", "new", "orb", "--kind", "matcher", "--kind", "dataset", "--dir", tmp_path / "x"
    )
    assert out["package"] == "diffeat_orb" and out["kinds"] == ["matcher", "dataset"]
    assert out["components"] == {"matcher": "orb-ratio", "dataset": "orb-pairs"}
    for f in out["files"]:
        assert (tmp_path / "x" / f).is_file()
    assert (tmp_path / "x" / "src" / "diffeat_orb" / "dataset.py").is_file()


def test_default_folder_and_kind(tmp_path):
    proc = subprocess.run(
        [DIFFEAT, "plugin", "new", "edges"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=True,
    )
    assert "edges-resnet" in proc.stdout
    assert (tmp_path / "diffeat-edges" / "src" / "diffeat_edges" / "extractor.py").is_file()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("My_Plugin", "bad plugin name 'My_Plugin': use lowercase letters and digits"),
        ("9lives", "bad plugin name '9lives'"),
        ("a--b", "bad plugin name 'a--b'"),
        ("diffeat-orb", "leave out the 'diffeat-' prefix"),
        ("matchers", "a built-in plugin has that name"),
    ],
)
def test_bad_names_are_refused_clearly(tmp_path, name, expected):
    proc = run("plugin", "new", name, "--dir", tmp_path / "p", check=2)
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p").exists()


def test_never_overwrites(tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    proc = run("plugin", "new", "orb", "--dir", folder, check=2)
    assert "already exists" in proc.stderr and str(folder) in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "mine"
    run("plugin", "new", "orb", "--dir", tmp_path / "empty")  # a new folder is fine
    (tmp_path / "empty2").mkdir()
    run("plugin", "new", "orb", "--dir", tmp_path / "empty2")  # so is an empty one


def test_unknown_kind_is_refused(tmp_path):
    proc = run("plugin", "new", "orb", "--kind", "sampler", "--dir", tmp_path / "p", check=2)
    assert "'sampler' is not one of" in proc.stderr


# -- installed and tested, as an author would ------------------------------------------------


def written_and_installed(tmp_path: Path, name: str, *kinds: str) -> tuple[Path, Path]:
    folder = tmp_path / "src-package"
    args = [a for k in kinds for a in ("--kind", k)]
    run("plugin", "new", name, *args, "--dir", folder)
    site = tmp_path / "site"
    pip_install(site, folder)
    return folder, site


def run_own_tests(folder: Path, site: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
        cwd=folder,
        env=env_with(site),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_written_package_installs_registers_and_passes_its_tests(tmp_path, kind):
    name = f"my-{kind}"
    folder, site = written_and_installed(tmp_path, name, kind)
    run_own_tests(folder, site)
    # the installed package (not the source folder) is what diffeat found
    where = subprocess.run(
        [sys.executable, "-c", f"import diffeat_my_{kind} as m; print(m.__file__)"],
        cwd=tmp_path,
        env=env_with(site),
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site))
    plugins = run_json("plugins", env=env_with(site))
    record = {p["name"]: p for p in plugins["plugins"]}[name]
    assert record["ok"] and record["version"] == "0.1.0"
    assert record["provides"] == [f"{kind}:{name}-{COMPONENTS[kind]}"]


@pytest.mark.slow
def test_the_written_pipeline_matches_through_the_cli(tmp_path):
    folder, site = written_and_installed(tmp_path, "duo", "extractor", "matcher")
    img = smooth_texture((96, 72), seed=4)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    out = run_json(
        "match",
        folder / "duo.toml",
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


@pytest.mark.slow
def test_the_written_dataset_evaluates_through_the_cli(tmp_path):
    folder, site = written_and_installed(tmp_path, "bench", "extractor", "dataset")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    smooth_texture((64, 48), seed=1).save(data / "images" / "a.png")
    smooth_texture((64, 48), seed=1).save(data / "images" / "b.png")
    # two identical images, points at cell centres of the stride-8 grid: every match is exact
    pairs = [
        {
            "id": "a-b",
            "source": "images/a.png",
            "target": "images/b.png",
            "category": "texture",
            "source_points": [[11.5, 19.5], [43.5, 27.5]],
            "target_points": [[11.5, 19.5], [43.5, 27.5]],
            "source_bbox": [0, 0, 63, 47],
            "target_bbox": [0, 0, 63, 47],
        }
    ]
    (data / "test.json").write_text(json.dumps(pairs))
    listed = run("datasets", env=env_with(site)).stdout
    assert "bench-pairs" in listed
    out = run_json(
        "eval",
        folder / "bench.toml",
        "--dataset",
        "bench-pairs",
        "--root",
        data,
        "--set",
        "extractor.image_size=[64,48]",
        "--no-plots",
        "--out",
        tmp_path / "out",
        env=env_with(site),
    )
    assert out["headline"]["value"] == 1.0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [p["id"] for p in results["pairs"]] == ["a-b"]
