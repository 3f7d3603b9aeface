"""The CPU cost estimate of the stable-diffusion extractor and its one warning."""

from __future__ import annotations

import logging

import pytest

from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.plugins.stable_diffusion import cost
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.testing import smooth_texture

LOGGER = "diffeat.plugins.stable_diffusion.cost"


def make(model, **opts) -> StableDiffusionExtractor:
    values = {"model": str(model), "image_size": [64, 64], "ensemble_size": 2, "device": "cpu"}
    values.update(opts)
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_estimate_matches_the_measured_dift_figure_and_scales():
    dift_512 = cost.estimate(
        pixels=512 * 512,
        unet_passes=8,
        unet_params=859.5e6,
        vae_encoder_params=34.2e6,
        threads=2,
        full_passes=False,
    )
    assert dift_512.seconds == pytest.approx(28.9, rel=0.05)  # docs/performance.md
    preset = cost.estimate(  # examples/dift-sd21.toml on 2 threads: minutes
        pixels=768 * 768,
        unet_passes=8,
        unet_params=865.9e6,
        vae_encoder_params=34.2e6,
        threads=2,
        full_passes=False,
    )
    assert preset.seconds > cost.WARN_SECONDS
    hyperfeatures = cost.estimate(
        pixels=512 * 512,
        unet_passes=50,
        unet_params=859.5e6,
        vae_encoder_params=34.2e6,
        threads=2,
        full_passes=True,
    )
    assert hyperfeatures.seconds > 4 * 60


def test_big_size_on_cpu_warns_once_with_the_faster_options(tiny_sd, monkeypatch, caplog):
    # pretend the tiny model has SD's parameter counts and the CPU two threads
    monkeypatch.setattr(cost, "_params", lambda module: 859.5e6)
    monkeypatch.setattr(cost, "cpu_threads", lambda: 2)
    ex = make(tiny_sd, image_size=[768, 768], ensemble_size=8)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = cost.warn_if_slow(ex)
        assert cost.warn_if_slow(ex) is None
    assert first is not None and first.seconds > cost.WARN_SECONDS and first.unet_passes == 8
    (message,) = warnings_of(caplog)
    assert "min per image" in message and "768x768" in message  # 8 min here
    assert "--set extractor.ensemble_size=1" in message
    assert "--set 'extractor.image_size=[" in message and "--device cuda" in message


def test_extract_warns_once_per_extractor(tiny_sd, monkeypatch, caplog):
    monkeypatch.setattr(cost, "WARN_SECONDS", 0.0)  # any cost warns: the hook itself
    ex = make(tiny_sd)
    images = [as_input(smooth_texture((64, 64), seed=1))]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ex.extract(images)
        ex.extract(images)
    assert len(warnings_of(caplog)) == 1


def test_tiny_model_at_tiny_size_does_not_warn(tiny_sd, caplog):
    ex = make(tiny_sd)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ex.extract([as_input(smooth_texture((64, 64), seed=2))])
    assert warnings_of(caplog) == []
    assert cost.extractor_cost(ex).seconds < 1


def test_no_estimate_off_the_cpu(tiny_sd, monkeypatch):
    ex = make(tiny_sd)
    monkeypatch.setattr(ex, "device", type(ex.device)("meta"))
    assert cost.warn_if_slow(ex) is None
