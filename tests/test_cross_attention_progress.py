"""The cross-attention matcher's progress bar: it counts UNet calls, and --quiet hides it."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffeat.core.components import View
from diffeat.core.geometry import ImageTransform
from diffeat.core.progress import QUIET_ENV
from diffeat.plugins.cross_attention.matcher import CrossAttentionMatcher
from diffeat.plugins.cross_attention.options import CrossAttentionOptions
from diffeat.testing import smooth_texture

TINY = {"size": 64, "steps": 2, "restarts": 2, "crops": 5, "device": "cpu", "max_batch": 4}
POINTS = torch.tensor([[30.0, 20.0], [10.0, 50.0], [70.0, 40.0]])


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws."""

    def isatty(self) -> bool:
        return True


def _view(size: tuple[int, int], seed: int) -> View:
    image = smooth_texture(size, seed=seed)
    return View(image, ImageTransform.resize(image.size, image.size))


def _counted(matcher: CrossAttentionMatcher) -> list[int]:
    calls: list[int] = []
    matcher.parts.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _run(matcher: CrossAttentionMatcher, monkeypatch: pytest.MonkeyPatch) -> str:
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    matcher.match(_view((80, 60), 1), _view((48, 64), 2), POINTS)
    return err.getvalue()


def test_bar_total_is_the_number_of_unet_calls(
    tiny_sd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(QUIET_ENV, raising=False)
    matcher = CrossAttentionMatcher(CrossAttentionOptions(model=str(tiny_sd), **TINY))
    calls = _counted(matcher)
    out = _run(matcher, monkeypatch)
    # 3 points x 2 restarts = 6 jobs in chunks of 4: 2 chunks x (2 steps + 5 crops)
    assert len(calls) == 2 * 2 + 2 * 5
    assert "cross-attention, 3 points" in out
    finals = re.findall(r"(\d+)/(\d+)", out)
    assert finals and finals[-1] == ("14", "14")
    assert all(total == "14" for _, total in finals)  # known before the first UNet call


def test_bar_counts_only_what_the_store_does_not_hold(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffeat.core.pipeline import Pipeline

    monkeypatch.delenv(QUIET_ENV, raising=False)
    matcher = {"plugin": "cross-attention", "model": str(tiny_sd), **TINY}
    source, target = _view((80, 60), 1), _view((48, 64), 2)
    outs = []
    for _ in range(2):
        pipe = Pipeline.from_dict({"matcher": matcher}, store=tmp_path / "feats.zarr")
        err = _Terminal()
        monkeypatch.setattr("sys.stderr", err)
        pipe.match(source.image, target.image, POINTS)
        outs.append(re.findall(r"(\d+)/(\d+)", err.getvalue())[-1])
    assert outs == [("14", "14"), ("10", "10")]  # the rerun optimises nothing: 2 x 5 crops


@pytest.mark.parametrize("how", ["env", "option"])
def test_quiet_or_progress_false_prints_nothing(
    tiny_sd: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    options = dict(TINY, steps=1, crops=4)
    if how == "env":
        monkeypatch.setenv(QUIET_ENV, "1")
    else:
        monkeypatch.delenv(QUIET_ENV, raising=False)
        options["progress"] = False
    matcher = CrossAttentionMatcher(CrossAttentionOptions(model=str(tiny_sd), **options))
    assert _run(matcher, monkeypatch) == ""


def test_not_a_terminal_prints_nothing(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(QUIET_ENV, raising=False)
    matcher = CrossAttentionMatcher(
        CrossAttentionOptions(model=str(tiny_sd), **dict(TINY, steps=1, crops=4))
    )
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    matcher.match(_view((80, 60), 1), _view((48, 64), 2), POINTS)
    assert err.getvalue() == ""


@pytest.mark.parametrize("args", [["--quiet", "plugins"], ["plugins", "-q"]])
def test_cli_quiet_sets_the_environment_for_library_bars(
    monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    from diffeat.cli.main import cli

    monkeypatch.setenv(QUIET_ENV, "0")  # recorded, so the test restores it
    CliRunner().invoke(cli, args)
    assert os.environ.get(QUIET_ENV) == "1"
