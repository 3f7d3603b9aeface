"""The bar inside one image: it counts the UNet forwards of an ensemble split by
``ensemble_batch``, of a DDIM inversion and of a generation; it is drawn only from
four forwards on, on a terminal, when not quiet; and it changes no result."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from diffeat.core.images import ImageInput
from diffeat.core.options import build_options
from diffeat.core.progress import INNER_MIN_PASSES, QUIET_ENV
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.testing import smooth_texture

SIZE = 64
CONV2 = "up_blocks.*.resnets.*.conv2"


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws."""

    def isatty(self) -> bool:
        return True


def make(model: Path, **opts: Any) -> StableDiffusionExtractor:
    values = {
        "model": str(model),
        "image_size": [SIZE, SIZE],
        "layers": [CONV2],
        "timesteps": [261],
        "ensemble_size": 4,
        "device": "cpu",
        **opts,
    }
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def images(n: int = 1) -> list[ImageInput]:
    return [
        ImageInput(smooth_texture((90, 70), seed=s), key=f"img{s}", source=f"img{s}.png")
        for s in range(n)
    ]


def run(
    ex: StableDiffusionExtractor, monkeypatch: pytest.MonkeyPatch, n: int = 1
) -> tuple[list[Any], int, str]:
    """Features of ``n`` images, the UNet forwards counted, and what stderr (a terminal) got."""
    calls: list[int] = []
    ex.parts.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    feats = ex.extract(images(n))
    return feats, len(calls), err.getvalue()


def counts(out: str) -> list[tuple[str, str]]:
    return re.findall(r"(\d+)/(\d+)", out)


@pytest.fixture(autouse=True)
def not_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(QUIET_ENV, raising=False)


@pytest.mark.parametrize(
    ("n_images", "timesteps", "ensemble_batch", "forwards"),
    [
        (1, [261, 101], 2, 4),  # an ensemble of 4 in chunks of 2, at two timesteps
        (1, [261], 1, 4),  # copy by copy
        (2, [261], 2, 4),  # two images' 8 copies in chunks of 2
        (2, [261, 101], 3, 6),  # 8 copies in chunks of 3, 3, 2 at two timesteps
    ],
)
def test_bar_counts_the_ensemble_chunks(
    tiny_sd: Path,
    monkeypatch: pytest.MonkeyPatch,
    n_images: int,
    timesteps: list[int],
    ensemble_batch: int,
    forwards: int,
) -> None:
    ex = make(tiny_sd, timesteps=timesteps, ensemble_batch=ensemble_batch)
    _, calls, out = run(ex, monkeypatch, n_images)
    assert calls == forwards
    assert f"stable-diffusion add-noise, {n_images} input" in out
    found = counts(out)
    assert found and found[-1] == (str(forwards), str(forwards))
    assert all(total == str(forwards) for _, total in found)  # known before the first pass


def test_chunks_change_no_result(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, calls, out = run(make(tiny_sd, timesteps=[261, 101]), monkeypatch, 2)
    assert calls == 2 and out == ""  # one forward per timestep: too few for a bar
    chunked, calls, _ = run(make(tiny_sd, timesteps=[261, 101], ensemble_batch=3), monkeypatch, 2)
    assert calls == 6
    for a, b in zip(whole, chunked):
        for name in a.layers:
            torch.testing.assert_close(a.layers[name], b.layers[name], rtol=1e-5, atol=1e-5)


def test_inversion_counts_its_steps(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # t = -1, 0, 100, ..., 800: the inversion stops after the pass at t = 800, the 10th
    ex = make(
        tiny_sd,
        mode="inversion",
        inversion_steps=10,
        timesteps=[-1, 100, 800],
        ensemble_size=1,
        latent="mean",
    )
    _, calls, out = run(ex, monkeypatch)
    assert calls == 10
    assert "stable-diffusion inversion, 1 input" in out
    assert counts(out)[-1] == ("10", "10")


def test_inversion_of_a_split_ensemble(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = make(
        tiny_sd, mode="inversion", inversion_steps=5, timesteps=[0, 200], ensemble_batch=2
    )  # t = -1, 0, 200: 3 steps x 2 chunks of the ensemble of 4
    whole = make(tiny_sd, mode="inversion", inversion_steps=5, timesteps=[0, 200])
    chunked, calls, out = run(ex, monkeypatch)
    assert calls == 6 and counts(out)[-1] == ("6", "6")
    reference, _, _ = run(whole, monkeypatch)
    for name in reference[0].layers:
        torch.testing.assert_close(
            reference[0].layers[name], chunked[0].layers[name], rtol=1e-4, atol=1e-5
        )


def test_generation_counts_its_passes(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = make(
        tiny_sd,
        mode="generation",
        inversion_steps=4,
        timesteps=[0],
        ensemble_size=1,
        guidance_scale=2.0,
        prompt="a cat",
    )
    calls: list[int] = []
    ex.parts.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    ex.generate(0)
    assert len(calls) == 8  # 4 steps x (negative prompt, prompt)
    assert counts(err.getvalue())[-1] == ("8", "8")


def test_fewer_than_four_forwards_draw_nothing(
    tiny_sd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert INNER_MIN_PASSES == 4
    _, calls, out = run(make(tiny_sd, timesteps=[261, 101, 51], ensemble_batch=0), monkeypatch)
    assert calls == 3 and out == ""


def test_quiet_draws_nothing(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(QUIET_ENV, "1")
    _, calls, out = run(make(tiny_sd, ensemble_batch=1), monkeypatch)
    assert calls == 4 and out == ""


def test_not_a_terminal_draws_nothing(tiny_sd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = make(tiny_sd, ensemble_batch=1)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    ex.extract(images())
    assert err.getvalue() == ""


def test_negative_ensemble_batch_is_refused(tiny_sd: Path) -> None:
    with pytest.raises(Exception, match="ensemble_batch must be >= 0"):
        make(tiny_sd, ensemble_batch=-1)


def test_cpu_warning_says_how_to_see_each_copy(
    tiny_sd: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Said once before starting: the slow-CPU warning names ensemble_batch when the
    ensemble would run in one forward (no bar), and not when it is already split."""
    import logging

    from diffeat.plugins.stable_diffusion import cost

    monkeypatch.setattr(cost, "_params", lambda module: 859.5e6)  # SD 1.5's size
    monkeypatch.setattr(cost, "cpu_threads", lambda: 2)
    messages = []
    for opts in ({"ensemble_size": 8}, {"ensemble_size": 8, "ensemble_batch": 2}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=cost.__name__):
            cost.warn_if_slow(make(tiny_sd, image_size=[768, 768], **opts))
        (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        messages.append(record.getMessage())
    assert "--set extractor.ensemble_batch=1" in messages[0]
    assert "ensemble_size=1" in messages[0]
    assert "ensemble_batch" not in messages[1]


def test_counted_counts_each_item_once_done(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffeat.core.progress import counted

    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    assert list(counted([261, 101, 51, 11, 1], "dit, 1 image")) == [261, 101, 51, 11, 1]
    assert counts(err.getvalue())[-1] == ("5", "5") and "dit, 1 image" in err.getvalue()
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    assert list(counted([1, 2, 3], "adm")) == [1, 2, 3] and err.getvalue() == ""


def test_adm_counts_its_timesteps(tiny_adm_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffeat.plugins.adm.extractor import AdmExtractor
    from diffeat.plugins.adm.options import AdmOptions

    options = AdmOptions(
        model=str(tiny_adm_model),
        layers=["output_blocks.4"],
        timesteps=[301, 201, 101, 41],
        ensemble_size=2,
        image_size=[64, 64],
        device="cpu",
    )
    ex = AdmExtractor(options)
    calls: list[int] = []
    ex.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    ex.extract(images())
    assert len(calls) == 4
    assert "adm, 1 image" in err.getvalue() and counts(err.getvalue())[-1] == ("4", "4")
    monkeypatch.setenv(QUIET_ENV, "1")
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    ex.extract(images())
    assert err.getvalue() == ""


def test_split_forwards_keep_each_tile_s_captioner_offset(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ODISE's tiles with the implicit captioner: each tile's time-embedding offset goes
    with its own rows when the forwards are split (3 tiles x 2 copies, 2 rows a forward)."""
    from diffeat.testing import build_tiny_captioner
    from diffeat.testing.vit import build_tiny_openclip

    config, checkpoint = build_tiny_openclip(tmp_path / "clip")
    captioner = build_tiny_captioner(tmp_path / "odise.safetensors", clip_dim=16)
    opts = {
        "layers": ["up_blocks.1.attentions.1"],
        "timesteps": [100],
        "ensemble_size": 2,
        "image_size": [128, 64],
        "tile_size": [64, 64],
        "tile_stride": [32, 32],
        "captioner": str(captioner),
        "captioner_clip": config,
        "captioner_clip_pretrained": checkpoint,
    }
    (whole,), calls, _ = run(make(tiny_sd, **opts), monkeypatch)
    assert calls == 1
    (split,), calls, out = run(make(tiny_sd, **opts, ensemble_batch=2), monkeypatch)
    assert calls == 3 and out == ""  # 3 forwards: fewer than 4, no bar
    name = "up_blocks.1.attentions.1"
    torch.testing.assert_close(whole.layers[name], split.layers[name], rtol=1e-5, atol=1e-5)


def test_adm_ensemble_batch_splits_the_copies_and_counts_each_forward(
    tiny_adm_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ensemble_batch=2`` on 2 images x 3 copies: 3 forwards of 2 rows per timestep,
    each counted, and the same features as one forward per timestep (up to rounding)."""
    import torch

    from diffeat.plugins.adm.extractor import AdmExtractor
    from diffeat.plugins.adm.options import AdmOptions

    def make_adm(ensemble_batch: int) -> AdmExtractor:
        return AdmExtractor(
            AdmOptions(
                model=str(tiny_adm_model),
                layers=["output_blocks.4", "output_blocks.2"],
                timesteps=[201, 41],
                ensemble_size=3,
                image_size=[64, 64],
                device="cpu",
                ensemble_batch=ensemble_batch,
            )
        )

    two = images(2)
    whole = make_adm(0).extract(two)
    ex = make_adm(2)
    rows: list[int] = []
    ex.unet.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    split = ex.extract(two)
    assert rows == [2, 2, 2] * 2
    assert "adm, 2 images" in err.getvalue() and counts(err.getvalue())[-1] == ("6", "6")
    for a, b in zip(whole, split):
        for name in a.layers:
            assert a.layers[name].shape == b.layers[name].shape
            torch.testing.assert_close(a.layers[name], b.layers[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ensemble_batch must be >= 0"):
        AdmOptions(model=str(tiny_adm_model), ensemble_batch=-1).validate()
