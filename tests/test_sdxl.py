"""SDXL / SDXL-Turbo in the stable-diffusion extractor, on a tiny random SDXL folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from diffeat.core.errors import ConfigError, ModelLoadError
from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.testing import smooth_texture
from diffeat.testing.sdxl import TINY_SDXL_POOLED_DIM, TINY_SDXL_TEXT_WIDTHS, build_tiny_sdxl

SIZE = 64  # model input; latent 8x8


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> object:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return smooth_texture((90, 70), seed=11)


def make(model, **opts) -> StableDiffusionExtractor:
    values = {
        "model": str(model),
        "image_size": [SIZE, SIZE],
        "ensemble_size": 2,
        "device": "cpu",
        **opts,
    }
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def written_out(folder, image, noise, *, t, block, prompt, original=(SIZE, SIZE)) -> torch.Tensor:
    """DIFT's recipe on SDXL with the diffusers pipeline's own prompt encoding."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    img = image.resize((SIZE, SIZE), Image.BICUBIC)
    x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0 - 0.5) * 2
    e = noise["posterior"].shape[0]
    with torch.no_grad():
        dist = pipe.vae.encode(x[None]).latent_dist
        latents = (dist.mean + dist.std * noise["posterior"]) * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        time_ids = torch.tensor([[original[1], original[0], 0, 0, SIZE, SIZE]], dtype=torch.float)
        tt = torch.tensor(t, dtype=torch.long)
        noisy = sched.add_noise(latents, noise["noise"][0], tt)
        captured = {}
        module = dict(pipe.unet.named_modules())[block]
        handle = module.register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
        pipe.unet(
            noisy,
            tt,
            encoder_hidden_states=embeds.repeat(e, 1, 1),
            added_cond_kwargs={
                "text_embeds": pooled.repeat(e, 1),
                "time_ids": time_ids.repeat(e, 1),
            },
        )
        handle.remove()
    return captured["x"].mean(dim=0)


def test_family_and_identity(tiny_sdxl, tiny_sd, tmp_path):
    ex = make(tiny_sdxl)
    assert ex.family == "sdxl" and ex.model_identity()["family"] == "sdxl"
    sd = make(tiny_sd)
    assert sd.family == "sd" and "family" not in sd.model_identity()  # SD keys as before
    # the second text encoder is part of the fingerprint
    other = tmp_path / "other"
    shutil.copytree(tiny_sdxl, other)
    (other / "tokenizer_2" / "merges.txt").write_text("#version: 0.2\n")
    assert make(other).model_identity()["fingerprint"] != ex.model_identity()["fingerprint"]


@pytest.mark.parametrize("block", ["up_blocks.0.resnets.0", "up_blocks.1"])
def test_matches_the_pipeline_computation(tiny_sdxl, image, block):
    ex = make(tiny_sdxl, layers=[block], timesteps=[101], prompt="a photo of a cat")
    inp = as_input(image)
    noise = ex.make_noise(inp.key)
    (fs,) = ex.extract([inp], noise=[noise])
    expected = written_out(tiny_sdxl, image, noise, t=101, block=block, prompt="a photo of a cat")
    torch.testing.assert_close(fs.layers[block][0], expected, atol=1e-5, rtol=1e-4)


def test_added_cond_kwargs_shapes_and_values(tiny_sdxl, image):
    ex = make(tiny_sdxl, original_size=[90, 70], batch_size=2, ensemble_size=3)
    seen = {}

    def grab(module, args, kwargs):
        seen["encoder_hidden_states"] = kwargs["encoder_hidden_states"]
        seen.update(kwargs["added_cond_kwargs"])

    handle = ex.parts.unet.register_forward_pre_hook(grab, with_kwargs=True)
    ex.extract([as_input(image), as_input(smooth_texture((40, 60), seed=3))])
    handle.remove()
    assert seen["encoder_hidden_states"].shape == (6, 77, sum(TINY_SDXL_TEXT_WIDTHS))
    assert seen["text_embeds"].shape == (6, TINY_SDXL_POOLED_DIM)
    assert seen["time_ids"].shape == (6, 6)
    # (original height, width), crop top-left, (target height, width)
    assert seen["time_ids"][0].tolist() == [70, 90, 0, 0, SIZE, SIZE]
    torch.testing.assert_close(
        seen["text_embeds"], ex.pooled_embedding("").repeat(6, 1), atol=0, rtol=0
    )


def test_original_size_and_no_added_embedding(tiny_sdxl, image):
    inp = as_input(image)
    base = make(tiny_sdxl).extract([inp])[0].layers["up_blocks.1"]
    other = make(tiny_sdxl, original_size=[1024, 512]).extract([inp])[0].layers["up_blocks.1"]
    assert not torch.allclose(base, other)
    # without the added embedding the time ids cannot matter (DistillDIFT's forward)
    none_a = make(tiny_sdxl, added_conditioning="none").extract([inp])[0].layers["up_blocks.1"]
    none_b = make(tiny_sdxl, added_conditioning="none", original_size=[1024, 512])
    none_b = none_b.extract([inp])[0].layers["up_blocks.1"]
    torch.testing.assert_close(none_a, none_b, atol=0, rtol=0)
    assert not torch.allclose(none_a, base)


def test_time_embedding_without_added_embedding_is_the_timesteps_alone(tiny_sdxl, image):
    ex = make(tiny_sdxl, added_conditioning="none", ensemble_size=1)
    unet = ex.parts.unet
    seen = {}
    handle = unet.time_embedding.register_forward_hook(lambda m, a, out: seen.setdefault("t", out))
    emb_seen = {}
    res = unet.down_blocks[0].resnets[0]
    handle2 = res.time_emb_proj.register_forward_pre_hook(
        lambda m, args: emb_seen.setdefault("emb", args[0])
    )
    ex.extract([as_input(image)])
    handle.remove()
    handle2.remove()
    # the resnets' time input is SiLU(time embedding) with nothing added to it
    torch.testing.assert_close(emb_seen["emb"], torch.nn.functional.silu(seen["t"]))


def test_layer_catalog_matches_captured_shapes(tiny_sdxl, tiny_sd, image):
    for model in (tiny_sdxl, tiny_sd):
        ex = make(model, layers=["*"], ensemble_size=1, stop_early=False)
        catalog = ex.available_layers()
        assert [i.name for i in ex.layers()] == [i.name for i in catalog]
        (fs,) = ex.extract([as_input(image)])
        for info in catalog:
            _, c, h, w = fs.layers[info.name].shape
            assert (c, h * info.stride, w * info.stride) == (info.channels, SIZE, SIZE), info
    names = [i.name for i in make(tiny_sdxl).available_layers()]
    assert names[0] == "conv_in" and names[-1] == "conv_out"
    assert "up_blocks.2.upsamplers.0" not in names and "up_blocks.1.upsamplers.0" in names


def test_layer_catalog_needs_no_weights(tiny_sdxl):
    ex = make(tiny_sdxl, layers=["up_blocks.0.resnets.0", "up_blocks.1"])
    infos = ex.layers()
    assert ex._parts is None  # nothing loaded, nothing ran
    assert [(i.channels, i.stride) for i in infos] == [(32, 32.0), (16, 8.0)]


def test_nearest_valid_layer_names(tiny_sdxl):
    with pytest.raises(ConfigError, match=r"nearest valid names: up_blocks\.1\.resnets\.0"):
        make(tiny_sdxl, layers=["up_blocks.1.resnet.0"]).layers()
    with pytest.raises(ConfigError, match="token sequence, not a map"):
        make(tiny_sdxl, layers=["up_blocks.0.attentions.0.transformer_blocks.0"]).layers()


def test_unsupported_family_names_what_was_found(tmp_path, tiny_sdxl):
    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "text_encoder_2": ["transformers", "T5EncoderModel"],
            }
        )
    )
    with pytest.raises(ModelLoadError) as err:
        make(flux).model_identity()
    msg = str(err.value)
    for fragment in ("FluxPipeline", "FluxTransformer2DModel", "T5EncoderModel", "Supported"):
        assert fragment in msg
    assert "SDXL" in msg and "text_time" in msg
    # an SDXL refiner: text_time UNet, second text encoder only
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl, refiner)
    shutil.rmtree(refiner / "text_encoder")
    with pytest.raises(ModelLoadError, match=r"addition_embed_type 'text_time'.*no text_encoder/"):
        make(refiner).model_identity()


def test_float16_keeps_the_vae_in_float32(tiny_sdxl):
    parts = make(tiny_sdxl, dtype="float16").parts
    assert parts.unet.dtype == torch.float16 and parts.text_encoder_2.dtype == torch.float16
    assert parts.vae.config.force_upcast and parts.vae.dtype == torch.float32


def test_refuses_what_sdxl_cannot_do(tiny_sdxl):
    ex = make(tiny_sdxl, mode="generation", ensemble_size=1, timesteps=[0], inversion_steps=2)
    with pytest.raises(ConfigError, match="generation mode runs SD 1.x/2.x"):
        ex.generate(0)
