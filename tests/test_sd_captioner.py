"""ODISE's implicit captioner in the stable-diffusion extractor, against a written-out
computation with diffusers, transformers, open_clip and torchvision called directly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffeat.core.errors import ConfigError, ModelLoadError
from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.testing import build_tiny_captioner, smooth_texture
from diffeat.testing.vit import TINY_OPENCLIP_NAME, build_tiny_openclip

LAYER = "up_blocks.1.attentions.1"
CLIP_DIM = 16  # the tiny open_clip model's embed_dim
TIME_DIM = 32  # the tiny UNet's time embedding (4 x 8)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_openclip(tmp_path_factory.mktemp("captioner-clip") / "clip")


@pytest.fixture(scope="module")
def captioner_file(tmp_path_factory):
    return build_tiny_captioner(
        tmp_path_factory.mktemp("captioner") / "odise.safetensors", clip_dim=CLIP_DIM
    )


def make(model, clip, captioner, **opts) -> StableDiffusionExtractor:
    config, checkpoint = clip
    values = {
        "model": str(model),
        "layers": [LAYER],
        "timesteps": [100],
        "ensemble_size": 1,
        "latent": "mean",
        "image_size": [96, 64],
        "captioner": str(captioner),
        "captioner_clip": config,
        "captioner_clip_pretrained": checkpoint,
        "device": "cpu",
        **opts,
    }
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def written_out(model, clip, captioner, pixels, noise, prompt: str = "") -> torch.Tensor:
    """ODISE's LdmImplicitCaptionerExtractor + unet_forward on one input ``[1, 3, H, W]``
    in [-1, 1] with timestep-100 noise ``[1, 4, h, w]``, by hand."""
    import open_clip
    import torchvision.transforms.functional as TF
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    config, checkpoint = clip
    open_clip.add_model_config(config)
    visual = open_clip.create_model(TINY_OPENCLIP_NAME, pretrained=checkpoint).eval().visual
    w = {k.removeprefix("backbone.feature_extractor."): v for k, v in load_file(captioner).items()}
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()

    def text(p: str) -> torch.Tensor:
        ids = tok([p], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        return enc(ids.input_ids)[0]

    with torch.no_grad():
        image = (pixels + 1) / 2  # ODISE's [0, 1] input of the CLIP adapter
        x = TF.resize(image, 32, interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
        x = TF.center_crop(x, 32)
        x = TF.normalize(x, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        prefix = visual(x)
        embed = prefix @ w["clip_project.linear.weight"].T + w["clip_project.linear.bias"]
        embed = embed.unsqueeze(1) + w["clip_project.positional_embedding"]
        cond = text("") + torch.tanh(w["alpha_cond"]) * embed
        if prompt:
            cond = text(prompt)
        t_embed = prefix @ w["time_embed_project.linear.weight"].T
        t_embed = t_embed + w["time_embed_project.linear.bias"]
        t_embed = t_embed.unsqueeze(1) + w["time_embed_project.positional_embedding"]
        cond_emb = (torch.tanh(w["alpha_cond_time_embed"]) * t_embed)[:, 0]

        latent = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        t = torch.tensor(100)
        noisy = scheduler.add_noise(latent, noise, t)
        seen = {}
        modules = dict(unet.named_modules())
        h1 = unet.time_embedding.register_forward_hook(lambda m, a, out: out + cond_emb)
        h2 = modules[LAYER].register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
        unet(noisy, t, encoder_hidden_states=cond)
        h1.remove()
        h2.remove()
    out = seen["x"]
    return (out[0] if isinstance(out, tuple) else out)[0]


@pytest.mark.parametrize("prompt", ["", "a photo of a cat"])
def test_captioner_conditioning_equals_written_out(tiny_sd, tiny_clip, captioner_file, prompt):
    ex = make(tiny_sd, tiny_clip, captioner_file, prompt=prompt)
    inp = as_input(smooth_texture((120, 80), seed=3))
    (fs,) = ex.extract([inp])
    pixels = ex.preprocess(inp)[None]  # [-1, 1], 64 x 96
    noise = ex.make_noise(inp.key)["noise"][0]
    expected = written_out(tiny_sd, tiny_clip, captioner_file, pixels, noise, prompt)
    torch.testing.assert_close(fs.layers[LAYER][0], expected, atol=1e-5, rtol=1e-5)


def test_tiles_are_conditioned_each_on_its_own_crop(tiny_sd, tiny_clip, captioner_file):
    """The preset's path: 64 px tiles every 32 px, one shared noise, the captioner per tile."""
    ex = make(
        tiny_sd,
        tiny_clip,
        captioner_file,
        image_size=[128, 64],
        tile_size=[64, 64],
        tile_stride=[32, 32],
        noise="shared",
        seed=42,
    )
    inp = as_input(smooth_texture((130, 60), seed=5))
    (fs,) = ex.extract([inp])
    pixels = ex.preprocess(inp)[None]
    c, h, w = ex.latent_shape()
    shared = torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(42))
    tiles = [
        written_out(tiny_sd, tiny_clip, captioner_file, pixels[..., x : x + 64], shared)
        for x in (0, 32, 64)
    ]
    ch, gh, _ = tiles[0].shape  # [C, 2, 2]: 32 px cells
    expected = torch.zeros(ch, gh, 4)
    for tile, x in zip(tiles, (0, 1, 2)):
        expected[..., x : x + 2] += tile
    expected /= torch.tensor([1.0, 2, 2, 1])
    torch.testing.assert_close(fs.layers[LAYER][0], expected, atol=1e-5, rtol=1e-5)


def test_captioner_without_the_time_projection_is_refused(tiny_sd, tiny_clip, tmp_path):
    from safetensors.torch import load_file, save_file

    full = build_tiny_captioner(tmp_path / "full.safetensors", clip_dim=CLIP_DIM)
    partial = {k: v for k, v in load_file(full).items() if "time_embed" not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    ex = make(tiny_sd, tiny_clip, tmp_path / "partial.safetensors")
    with pytest.raises(ModelLoadError, match=r"no tensor 'time_embed_project\.linear\.weight'"):
        ex.extract([as_input(smooth_texture((64, 64)))])


def test_captioner_changes_the_features_and_the_identity(tiny_sd, tiny_clip, captioner_file):
    inp = as_input(smooth_texture((120, 80), seed=3))
    with_captioner = make(tiny_sd, tiny_clip, captioner_file)
    plain = make(tiny_sd, tiny_clip, "")
    a = with_captioner.extract([inp])[0].layers[LAYER]
    b = plain.extract([inp])[0].layers[LAYER]
    assert (a - b).abs().max() > 1e-3
    assert "captioner" in with_captioner.model_identity()
    assert "captioner" not in plain.model_identity()


def test_captioner_file_without_odise_prefix_is_the_same(
    tiny_sd, tiny_clip, captioner_file, tmp_path
):
    bare = build_tiny_captioner(
        tmp_path / "bare.safetensors", clip_dim=CLIP_DIM, odise_prefix=False
    )
    inp = as_input(smooth_texture((120, 80), seed=4))
    a = make(tiny_sd, tiny_clip, captioner_file).extract([inp])[0].layers[LAYER]
    b = make(tiny_sd, tiny_clip, bare).extract([inp])[0].layers[LAYER]
    torch.testing.assert_close(a, b)


def test_missing_captioner_file_says_how_to_make_it(tiny_sd, tiny_clip, tmp_path):
    ex = make(tiny_sd, tiny_clip, tmp_path / "absent.safetensors")
    with pytest.raises(ModelLoadError, match=r"absent\.safetensors.*docs/sd-dino\.md"):
        ex.extract([as_input(smooth_texture((64, 64)))])


def test_captioner_of_another_model_is_refused(tiny_sd, tiny_clip, tmp_path):
    other = build_tiny_captioner(tmp_path / "other.safetensors", clip_dim=CLIP_DIM, time_dim=48)
    ex = make(tiny_sd, tiny_clip, other)
    with pytest.raises(
        ModelLoadError, match=r"time_embed_project\.linear\.weight.*\[48, 16\].*\[32, 16\]"
    ):
        ex.extract([as_input(smooth_texture((64, 64)))])


def test_not_a_safetensors_file_is_refused(tiny_sd, tiny_clip, tmp_path):
    bad = tmp_path / "odise.pth"
    bad.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ModelLoadError, match=r"odise\.pth.*not a readable safetensors"):
        make(tiny_sd, tiny_clip, bad).extract([as_input(smooth_texture((64, 64)))])


def test_more_timesteps_than_time_positions_is_refused(tiny_sd, tiny_clip, captioner_file):
    ex = make(tiny_sd, tiny_clip, captioner_file, timesteps=[100, 200])
    with pytest.raises(ConfigError, match=r"positions\s+for 1 timestep"):
        ex.extract([as_input(smooth_texture((64, 64)))])


def test_captioner_needs_add_noise_mode(tiny_sd, tiny_clip, captioner_file):
    with pytest.raises(ConfigError, match="captioner works with mode = add-noise"):
        make(tiny_sd, tiny_clip, captioner_file, mode="inversion", timesteps=[-1])


def test_clip_input_resizes_the_short_side_and_crops_the_centre():
    from diffeat.plugins.stable_diffusion.captioner import clip_input

    x = torch.rand(1, 3, 40, 60)
    got = clip_input(x, 20, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    resized = F.interpolate(x, size=(20, 30), mode="bicubic", align_corners=False)
    torch.testing.assert_close(got, resized[..., :, 5:25])
