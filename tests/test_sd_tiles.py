"""Tiled UNet passes (ODISE's slide_forward) and shared noise in the stable-diffusion extractor."""

from __future__ import annotations

import pytest
import torch

from diffeat.core.errors import ConfigError
from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.plugins.stable_diffusion.tiles import axis_positions, paste_tiles, tile_origins
from diffeat.testing import smooth_texture

LAYER = "up_blocks.2.resnets.1.conv2"  # 16 model pixels per cell on the tiny model


def make(model, **opts) -> StableDiffusionExtractor:
    values = {
        "model": str(model),
        "layers": [LAYER],
        "timesteps": [100],
        "ensemble_size": 1,
        "image_size": [128, 64],
        "tile_size": [64, 64],
        "tile_stride": [32, 32],
        "device": "cpu",
        **opts,
    }
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def test_tile_positions_follow_slide_forward():
    assert axis_positions(960, 512, 512) == [0, 448]
    assert axis_positions(512, 512, 512) == [0]
    assert axis_positions(1024, 512, 256) == [0, 256, 512]
    assert tile_origins((960, 512), (512, 512), (512, 512)) == [(0, 0), (448, 0)]


def test_paste_averages_overlaps():
    maps = torch.stack([torch.full((1, 1, 2), v) for v in (1.0, 3.0)])  # two 1x2-cell tiles
    out = paste_tiles(maps, [(0, 0), (16, 0)], (48, 16), (32, 16), "l")  # cells of 16 px
    assert out.tolist() == [[[1.0, 2.0, 3.0]]]


def test_tiled_extraction_equals_pasting_by_hand(tiny_sd):
    ex = make(tiny_sd)
    inp = as_input(smooth_texture((130, 60), seed=2))
    (fs,) = ex.extract([inp])
    got = fs.layers[LAYER]
    pixels = ex.preprocess(inp)
    tiles = []
    for p, x in enumerate((0, 32, 64)):  # 128 wide, tiles of 64 every 32
        crop = pixels[None, :, :, x : x + 64]
        noise = [ex.make_noise(f"{inp.key}#tile{p}")]
        tiles.append(ex.features_from_pixels(crop, noise, [""])[LAYER][0])  # [T, C, 4, 4]
    t, c = tiles[0].shape[:2]
    expected = torch.zeros(t, c, 4, 8)
    expected[..., 0:4] += tiles[0]
    expected[..., 2:6] += tiles[1]
    expected[..., 4:8] += tiles[2]
    expected /= torch.tensor([1.0, 1, 2, 2, 2, 2, 1, 1])
    assert got.shape == (t, c, 4, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_shared_noise_is_one_draw_for_every_image(tiny_sd):
    ex = make(tiny_sd, noise="shared", seed=42, tile_size=[], tile_stride=[], image_size=[64, 64])
    a, b = ex.make_noise("one"), ex.make_noise("two")
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["posterior"], b["posterior"])
    c, h, w = ex.latent_shape()
    odise = torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(42))
    assert torch.equal(a["noise"][0], odise)  # timestep noise is the generator's first draw
    per_image = make(tiny_sd, tile_size=[], tile_stride=[], image_size=[64, 64])
    assert not torch.equal(
        per_image.make_noise("one")["noise"], per_image.make_noise("two")["noise"]
    )


def test_tiles_whose_offsets_miss_a_cell_are_refused(tiny_sd):
    ex = make(tiny_sd, layers=["up_blocks.0.resnets.1"])  # 64-pixel cells, tiles every 32
    with pytest.raises(ConfigError, match="multiples of 64"):
        ex.extract([as_input(smooth_texture((64, 64), seed=1))])


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"mode": "inversion", "timesteps": [-1]}, "add-noise"),
        ({"tile_size": [], "tile_stride": [32, 32]}, "needs tile_size"),
        ({"tile_size": [256, 64]}, "exceeds"),
        ({"tile_stride": [80, 32]}, "uncovered"),
    ],
)
def test_bad_tiling_options(tiny_sd, opts, message):
    with pytest.raises(ConfigError, match=message):
        make(tiny_sd, **opts)


def test_timesteps_outside_the_noise_schedule_are_refused(tiny_sd):
    ex = make(tiny_sd, timesteps=[-1], tile_size=[], tile_stride=[], image_size=[64, 64])
    with pytest.raises(ConfigError, match=r"outside 0\.\.999"):
        ex.extract([as_input(smooth_texture((64, 64), seed=1))])
    inv = make(
        tiny_sd, mode="inversion", timesteps=[-1], steps_offset=20, tile_size=[], tile_stride=[]
    )
    with pytest.raises(ConfigError, match="steps_offset 20"):
        inv.extract([as_input(smooth_texture((64, 64), seed=1))])
