"""The aspect-preserving ``short-side`` size rule of the stable-diffusion extractor (DIFT's
DAVIS protocol: short side S, long side floored to a multiple of 32)."""

from __future__ import annotations

import pytest
import torch

from diffeat.core.errors import ConfigError
from diffeat.core.images import as_input, fit_transform, model_size_for, short_side_size
from diffeat.core.options import build_options
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.testing import smooth_texture


def make(model, **opts) -> StableDiffusionExtractor:
    values = {"model": str(model), "ensemble_size": 2, "device": "cpu", **opts}
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def test_short_side_sizes():
    assert short_side_size((854, 480), 480) == (832, 480)  # DAVIS
    assert short_side_size((480, 854), 480) == (480, 832)  # portrait
    assert short_side_size((910, 480), 480) == (896, 480)
    assert short_side_size((640, 480), 480) == (640, 480)  # already a multiple of 32
    assert short_side_size((320, 240), 480) == (640, 480)  # upscaled
    assert model_size_for((854, 480), (480, 480), "short-side") == (832, 480)
    assert model_size_for((854, 480), (768, 768), "resize") == (768, 768)
    t = fit_transform((854, 480), (832, 480), "short-side")
    assert t.scale == (832 / 854, 1.0) and t.offset == (0.0, 0.0)


def test_short_side_equals_a_resize_to_the_computed_size(tiny_sd):
    image = as_input(smooth_texture((100, 60), seed=4))
    short = make(tiny_sd, image_size=[64, 64], size_rule="short-side")
    resize = make(tiny_sd, image_size=[96, 64])
    assert short.model_size_for(image.size) == (96, 64)
    (a,), (b,) = short.extract([image]), resize.extract([image])
    for name in a.layers:
        assert a.layers[name].shape[-2:] == b.layers[name].shape[-2:]
        torch.testing.assert_close(a.layers[name], b.layers[name])
    assert a.transform.to_dict() == b.transform.to_dict()
    assert a.transform.model_size == (96, 64)


def test_short_side_batches_images_of_different_shapes(tiny_sd):
    wide = as_input(smooth_texture((100, 60), seed=1))
    tall = as_input(smooth_texture((60, 100), seed=2))
    ex = make(tiny_sd, image_size=[64, 64], size_rule="short-side", batch_size=2)
    a, b = ex.extract([wide, tall])
    (a1,) = ex.extract([wide])
    name = next(iter(a.layers))
    assert a.layers[name].shape[-1] > a.layers[name].shape[-2]
    assert b.layers[name].shape[-2] > b.layers[name].shape[-1]
    torch.testing.assert_close(a.layers[name], a1.layers[name])


def test_short_side_refuses_tiles(tiny_sd):
    with pytest.raises(ConfigError, match='tile_size works with size_rule = "resize" or "pad"'):
        make(tiny_sd, image_size=[64, 64], size_rule="short-side", tile_size=[32, 32])
