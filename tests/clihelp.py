"""Run the real ``diffeat`` executable in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waiting import HANG_GUARD_S

DIFFEAT = str(Path(sys.executable).with_name("diffeat"))
ROOT = Path(__file__).resolve().parents[1]


def tiny_dift_config(tiny_sd: Path, path: Path) -> Path:
    """The DIFT SD 2.1 preset (``examples/dift-sd21.toml``) on the tiny model at 64 px with
    2 noise copies, written to ``path``."""
    text = (ROOT / "examples" / "dift-sd21.toml").read_text()
    text = text.replace('"stabilityai/stable-diffusion-2-1"', f'"{tiny_sd}"')
    text = text.replace("[768, 768]", "[64, 64]").replace("ensemble_size = 8", "ensemble_size = 2")
    path.write_text(text)
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    env.update(extra)
    return env


def run(
    *args: Any,
    env: dict[str, str] | None = None,
    check: int | None = 0,
    timeout: float = HANG_GUARD_S,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``diffeat ARGS``; with ``check``, assert its exit status. ``timeout`` is a hang
    guard (:data:`waiting.HANG_GUARD_S`), not a speed budget."""
    proc = subprocess.run(
        [DIFFEAT, *map(str, args)],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
    if check is not None:
        assert proc.returncode == check, (
            f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def run_json(*args: Any, **kwargs: Any) -> Any:
    return json.loads(run(*args, "--json", **kwargs).stdout)


def pip_install(target: Path, package: Path) -> None:
    """``pip install`` a local package into the folder ``target`` (offline, no dependencies)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(package),
        ],
        check=True,
        capture_output=True,
        timeout=HANG_GUARD_S,
    )
