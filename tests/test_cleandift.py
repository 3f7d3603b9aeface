"""CleanDIFT: replacement UNet weights and the noise-free ``clean`` mode of the SD extractor."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from diffeat.core.config import load_config
from diffeat.core.errors import ModelLoadError
from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.core.sources import extractor_cache_key
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.testing import build_tiny_stable_diffusion, smooth_texture

SIZE = 64
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Another tiny SD of the same architecture: its UNet plays CleanDIFT's weights."""
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("finetuned") / "model", seed=5)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return smooth_texture((90, 70), seed=4)


def make(model, **opts) -> StableDiffusionExtractor:
    values = {
        "model": str(model),
        "image_size": [SIZE, SIZE],
        "ensemble_size": 1,
        "device": "cpu",
        "mode": "clean",
        "timesteps": [261],
        "layers": ["up_blocks.1"],
        **opts,
    }
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def key(ex: StableDiffusionExtractor) -> str:
    return extractor_cache_key("stable-diffusion", ex.options, ex.model_identity())


def written_out(base, unet_folder, image, posterior, *, t, prompt="") -> torch.Tensor:
    """The clean latent (no noise) through the fine-tuned UNet at timestep ``t``."""
    unet = UNet2DConditionModel.from_pretrained(unet_folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    x = (torch.from_numpy(np.array(image.resize((SIZE, SIZE)))).permute(2, 0, 1) / 255.0 - 0.5) * 2
    with torch.no_grad():
        dist = vae.encode(x[None].float()).latent_dist
        latent = (dist.mean + dist.std * posterior) * vae.config.scaling_factor
        ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        captured = {}
        handle = unet.up_blocks[1].register_forward_hook(
            lambda m, a, o: captured.setdefault("x", o)
        )
        unet(latent, torch.tensor(t), encoder_hidden_states=enc(ids)[0])
        handle.remove()
    return captured["x"][0]


def test_clean_mode_with_swapped_unet_matches_written_out(tiny_sd, finetuned, image):
    ex = make(tiny_sd, unet_weights=str(finetuned / WEIGHTS), prompt="a photo of a cat")
    inp = as_input(image)
    noise = ex.make_noise(inp.key)
    assert set(noise) == {"posterior"}  # no timestep noise is drawn
    (fs,) = ex.extract([inp], noise=[noise])
    expected = written_out(
        tiny_sd, finetuned, image, noise["posterior"], t=261, prompt="a photo of a cat"
    )
    torch.testing.assert_close(fs.layers["up_blocks.1"][0], expected, atol=1e-5, rtol=1e-4)


def test_weights_change_features_and_the_store_key(tiny_sd, finetuned, image, tmp_path):
    inp = as_input(image)
    own = make(tiny_sd)
    swapped = make(tiny_sd, unet_weights=str(finetuned / WEIGHTS))
    a = own.extract([inp])[0].layers["up_blocks.1"]
    b = swapped.extract([inp])[0].layers["up_blocks.1"]
    assert not torch.allclose(a, b)
    assert key(own) != key(swapped)
    # a UNet folder gives the same weights, the same identity of content...
    as_folder = make(tiny_sd, unet_weights=str(finetuned / "unet"))
    torch.testing.assert_close(as_folder.extract([inp])[0].layers["up_blocks.1"], b)
    # ...and other content under the same file name is another key
    copy = tmp_path / "w.safetensors"
    shutil.copy(finetuned / WEIGHTS, copy)
    first = key(make(tiny_sd, unet_weights=str(copy)))
    shutil.copy(tiny_sd / WEIGHTS, copy)
    assert key(make(tiny_sd, unet_weights=str(copy))) != first


def test_no_noise_and_no_ensemble(tiny_sd, image):
    inp = as_input(image)
    a = make(tiny_sd, latent="mean", seed=0).extract([inp])[0].layers["up_blocks.1"]
    b = make(tiny_sd, latent="mean", seed=9).extract([inp])[0].layers["up_blocks.1"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # nothing random is left
    # the timestep conditions the UNet: another t, other features
    c = make(tiny_sd, latent="mean", timesteps=[0]).extract([inp])[0].layers["up_blocks.1"]
    assert not torch.allclose(a, c)
    noisy = make(tiny_sd, latent="mean", mode="add-noise").extract([inp])[0].layers["up_blocks.1"]
    assert not torch.allclose(a, noisy)


def test_bad_weights(tiny_sd, tiny_sd_v, tmp_path):
    with pytest.raises(ModelLoadError, match="unet_weights 'nope.safetensors' not found"):
        make(tiny_sd, unet_weights="nope.safetensors").model_identity()
    with pytest.raises(ModelLoadError, match=r"does not fit the UNet.*keys of another shape"):
        assert make(tiny_sd, unet_weights=str(tiny_sd_v / WEIGHTS)).parts is None
    text = tmp_path / "w.bin"
    text.write_text("pickle")
    with pytest.raises(ModelLoadError, match=r"expected a \.safetensors file"):
        assert make(tiny_sd, unet_weights=str(text)).parts is None


@pytest.mark.parametrize("name", ["cleandift-sd21", "cleandift-sd15"])
def test_presets(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.toml"
    ex = load_config(path).resolved()["extractor"]
    assert ex["mode"] == "clean" and ex["timesteps"] == [261] and ex["ensemble_size"] == 1
    assert ex["layers"] == ["up_blocks.1"] and ex["unet_weights"].startswith("cleandift_sd")
    assert ex["prompt"] == "A photo of a {category}"
