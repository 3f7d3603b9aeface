"""Conventions users carry from other tools: fast ``--help``/``--version``, options after the
subcommand, ``-v``, Ctrl-C, ``python -m diffeat``, one override syntax, env vars in ``--help``."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from clihelp import DIFFEAT, cli_env, run, run_json
from waiting import HANG_GUARD_S, wait_until

from diffeat.cli.common import is_quiet
from diffeat.testing import smooth_texture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dift-sd21.toml"
HEAVY = ("torch", "diffusers", "transformers", "zarr")


def modules_after(*argv: str) -> set[str]:
    """The heavy top-level modules imported by ``diffeat ARGV`` (run in a fresh interpreter)."""
    code = (
        "import json, sys\n"
        "from diffeat.cli.main import main\n"
        "try:\n"
        f"    main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True
    )
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "argv", [("--version",), ("--help",), ("extract", "--help"), ("plot", "--help")]
)
def test_version_and_help_import_no_torch(argv):
    assert modules_after(*argv) == set()


def test_plugin_commands_found_without_the_registry_are_the_registrys():
    """The fast discovery adds exactly the commands the registry's hooks add."""
    from diffeat.cli.group import discover_plugin_commands
    from diffeat.core.plugins import PluginManager

    def paths(group: click.Group, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                out |= paths(cmd, f"{prefix}{name} ")
            else:
                out.add(prefix + name)
        return out

    fast, full = click.Group("a"), click.Group("b")
    discover_plugin_commands(fast)
    PluginManager().add_commands(full)
    assert paths(fast) == paths(full) and {"generate", "plot mixing-weights"} <= paths(fast)


def test_python_dash_m_diffeat():
    proc = subprocess.run(
        [sys.executable, "-m", "diffeat", "--version"], capture_output=True, text=True, check=True
    )
    assert "diffeat, version" in proc.stdout


def test_help_lists_environment_variables():
    out = run("--help").stdout
    for var in (
        "DIFFEAT_PLUGINS",
        "DIFFEAT_DISABLE_PLUGINS",
        "HF_HUB_OFFLINE",
        "DIFFEAT_ZARR_FAST_PATH",
        "DIFFEAT_STORE",
        "HF_HOME",
    ):
        assert var in out
    docs = (ROOT / "docs" / "cli.md").read_text()
    assert all(
        var in docs
        for var in ("DIFFEAT_PLUGINS", "DIFFEAT_DISABLE_PLUGINS", "DIFFEAT_STORE", "HF_HOME")
    )


def test_quiet_is_accepted_before_and_after_the_subcommand():
    from diffeat.cli.main import cli

    @click.command("probe-quiet")
    @click.pass_context
    def probe(ctx: click.Context) -> None:
        click.echo(f"quiet={is_quiet(ctx)}")

    cli.add_command(probe)
    try:
        runner = CliRunner()
        assert runner.invoke(cli, ["probe-quiet"]).output.strip() == "quiet=False"
        assert runner.invoke(cli, ["probe-quiet", "--quiet"]).output.strip() == "quiet=True"
        assert runner.invoke(cli, ["probe-quiet", "-q"]).output.strip() == "quiet=True"
        assert runner.invoke(cli, ["--quiet", "probe-quiet"]).output.strip() == "quiet=True"
    finally:
        cli.commands.pop("probe-quiet")
    # built-in and plugin commands alike
    for argv in (("extract", "--help"), ("plot", "mixing-weights", "--help")):
        out = run(*argv).stdout
        assert "--quiet" in out and "--verbose" in out, argv


def test_verbose_logs_before_and_after_the_subcommand():
    quiet = run("config", "show", EXAMPLE)
    assert "INFO" not in quiet.stderr
    for argv in (("-v", "config", "show", EXAMPLE), ("config", "show", EXAMPLE, "-v")):
        proc = run(*argv)
        assert "INFO diffeat.cli" in proc.stderr and "digest" in proc.stderr, argv


def test_dataset_options_and_pipeline_overrides_are_named_apart():
    from diffeat.cli.datasets_common import dataset_option

    @click.command()
    @dataset_option("A dataset option.")
    def cmd(dataset_options: tuple[str, ...]) -> None:
        click.echo(",".join(dataset_options))

    result = CliRunner().invoke(cmd, ["-o", "a=1", "--dataset-option", "b=2", "--option", "c=3"])
    assert result.output.strip() == "a=1,b=2,c=3"
    help_text = run("eval", "--help").stdout
    assert "--dataset-option" in help_text and "--set" in help_text


def test_extract_with_no_images_is_a_user_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    store = tmp_path / "s.zarr"
    proc = run("extract", EXAMPLE, empty, "--store", store, check=2)
    assert "no images in" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("extract", EXAMPLE, str(empty / "*.jpg"), "--store", store, check=2)
    assert "matches no file" in proc.stderr
    assert not store.exists()


def test_extract_expands_a_glob_the_shell_left(tmp_path):
    from diffeat.cli.extract import input_images

    for name in ("a.png", "b.png", "c.jpg"):
        smooth_texture((16, 16), seed=0).save(tmp_path / name)
    assert [p.name for p in input_images((str(tmp_path / "*.png"),))] == ["a.png", "b.png"]


def test_train_summary_prints_pck_in_percent(tmp_path):
    from diffeat.cli.train import _summary
    from diffeat.train.loop import TrainReport

    report = TrainReport(
        out=tmp_path / "o.safetensors",
        last=tmp_path / "o.last.safetensors",
        steps=10,
        start_step=0,
        device="cpu",
        pairs=4,
        pairs_used=4,
        skipped_pairs=0,
        val_pairs=2,
        metric="pck_bbox",
        best={"step": 10, "value": 0.4213, "alpha": 0.1},
    )
    assert "PCK@0.1 (bbox) 42.13% at step 10" in _summary(report)


@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_the_store_readable(tiny_sd, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    count = 60
    for i in range(count):
        smooth_texture((64, 64), seed=i).save(photos / f"p{i:03d}.png")
    config = tmp_path / "tiny.toml"
    text = EXAMPLE.read_text().replace('"stabilityai/stable-diffusion-2-1"', f'"{tiny_sd}"')
    config.write_text(text.replace("[768, 768]", "[64, 64]"))
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen(
        [DIFFEAT, "extract", str(config), str(photos), "--store", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stderr is not None
    done = threading.Event()
    chunks: list[bytes] = []

    def watch() -> None:  # set `done` once the progress bar shows a finished image
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):
            chunks.append(chunk)
            shown = re.findall(rf"(\d+)/{count}\b", b"".join(chunks).decode(errors="replace"))
            if any(int(n) >= 1 for n in shown):
                done.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        # wait for the event (an image finished), however long; the timeouts are hang guards
        wait_until(
            done.is_set,
            "the progress bar showed a finished image",
            proc=proc,
            output=lambda: b"".join(chunks).decode(errors="replace"),
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=HANG_GUARD_S) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=HANG_GUARD_S)  # stderr closes when the process ends
    stderr = b"".join(chunks).decode(errors="replace")
    assert "interrupted" in stderr and "Traceback" not in stderr
    info = run_json("store", "info", store)
    entries = [v["entries"] for v in info["extractors"].values()]
    assert entries and 1 <= sum(entries) < count
