"""Tests for the offline tiny Stable Diffusion builders in ``diffeat.testing.sd``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast

from diffeat.testing.sd import (
    BOS_TOKEN,
    EOS_TOKEN,
    build_tiny_stable_diffusion,
    clip_bpe_path,
    write_clip_tokenizer,
)

PROMPT = "a photo of a cat"
WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd1") / "model", sample_size=8)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_stable_diffusion(
        tmp_path_factory.mktemp("sd2") / "model",
        prediction_type="v_prediction",
        sd2_style=True,
        sample_size=8,
    )


def test_folder_layout(sd1: Path) -> None:
    for name in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        *WEIGHT_FILES,
    ):
        assert (sd1 / name).is_file(), name
    assert not list(sd1.rglob("*.bin")), "weights must be safetensors only"
    index = json.loads((sd1 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    size = sum(p.stat().st_size for p in sd1.rglob("*") if p.is_file())
    assert size < 12_000_000


def test_components_load(sd1: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(sd1, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd1, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(sd1, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(sd1, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(sd1, subfolder="scheduler")

    assert unet.config.sample_size == 8
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 32
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert text_encoder.config.num_hidden_layers == 2
    assert text_encoder.config.max_position_embeddings == 77

    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert vae.config.sample_size == 64
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8

    cfg = scheduler.config
    assert cfg.beta_start == pytest.approx(0.00085)
    assert cfg.beta_end == pytest.approx(0.012)
    assert cfg.beta_schedule == "scaled_linear"
    assert cfg.num_train_timesteps == 1000
    assert cfg.clip_sample is False
    assert cfg.set_alpha_to_one is False
    assert cfg.steps_offset == 1
    assert cfg.prediction_type == "epsilon"


def test_unet_has_sd_block_structure(sd1: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(sd1, subfolder="unet")
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in unet.up_blocks] == [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    assert len(unet.up_blocks) == 4
    assert all(len(b.resnets) == 3 for b in unet.up_blocks)
    assert all(len(b.resnets) == 2 for b in unet.down_blocks)
    assert unet.config.use_linear_projection is False


def test_decoder_features_finite_and_varied(sd1: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(sd1, subfolder="unet").eval()
    feats: dict[tuple[int, int], torch.Tensor] = {}
    handles = [
        resnet.conv2.register_forward_hook(
            lambda _m, _i, out, key=(i, j): feats.__setitem__(key, out.detach())
        )
        for i, block in enumerate(unet.up_blocks)
        for j, resnet in enumerate(block.resnets)
    ]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 32, 32, generator=gen)
    text = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        out = unet(latents, torch.tensor([261, 261]), encoder_hidden_states=text).sample
    for h in handles:
        h.remove()

    assert out.shape == latents.shape
    assert torch.isfinite(out).all() and out.std() > 1e-3
    assert len(feats) == 12
    channels = unet.config.block_out_channels[::-1]
    for (i, _j), feat in feats.items():
        side = 32 // 2 ** (3 - i)  # up_blocks[0] runs at 1/8 of the latent, up_blocks[3] at 1/1
        assert feat.shape == (2, channels[i], side, side)
        assert torch.isfinite(feat).all()
        assert 1e-3 < feat.std() < 1e3


def test_tokenizer_prompt(sd1: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(sd1, subfolder="tokenizer")
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 77
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    assert tokenizer.pad_token == EOS_TOKEN
    eos = tokenizer.eos_token_id
    first_eos = ids.index(eos)
    assert ids[first_eos:] == [eos] * (77 - first_eos)
    if clip_bpe_path() is not None:
        # Real CLIP vocabulary: the same ids as openai/clip-vit-large-patch14 gives.
        assert len(tokenizer) == 49408
        assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tokenizer_fast_alias_and_sd2_pad(tmp_path: Path) -> None:
    path = write_clip_tokenizer(tmp_path / "tok", pad_token="!")
    tokenizer = CLIPTokenizerFast.from_pretrained(path)
    ids = tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
    assert tokenizer.pad_token == "!"
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.pad_token_id
    assert len(ids) == 77


def test_tiny_vocabulary(tmp_path: Path) -> None:
    path = write_clip_tokenizer(tmp_path / "tok", vocabulary="tiny")
    tokenizer = CLIPTokenizer.from_pretrained(path)
    assert len(tokenizer) == 2 * 256 + len((path / "merges.txt").read_text().splitlines()) - 1 + 2
    ids = tokenizer("a photo of a cat dog").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == [BOS_TOKEN, "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "dog</w>"] + [
        EOS_TOKEN
    ]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat dog"


def test_pipeline_call(sd1: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(sd1)
    assert pipe.safety_checker is None
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)  # default size: unet sample_size * 8
    assert np.isfinite(images).all()


def test_sd2_variant(sd2: Path) -> None:
    scheduler = DDIMScheduler.from_pretrained(sd2, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    unet = UNet2DConditionModel.from_pretrained(sd2, subfolder="unet")
    assert unet.config.use_linear_projection is True
    assert isinstance(unet.config.attention_head_dim, (list, tuple))
    assert len(unet.config.attention_head_dim) == 4
    tokenizer = CLIPTokenizer.from_pretrained(sd2, subfolder="tokenizer")
    assert tokenizer.pad_token == "!"

    pipe = StableDiffusionPipeline.from_pretrained(sd2)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=2, output_type="np", height=64, width=64).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_same_seed_same_weights(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    a = build_tiny_stable_diffusion(tmp_path / "a", seed=3)
    b = build_tiny_stable_diffusion(tmp_path / "b", seed=3)
    c = build_tiny_stable_diffusion(tmp_path / "c", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state), "global RNG must be left untouched"
    for name in WEIGHT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert (a / name).read_bytes() != (c / name).read_bytes(), name
    for name in ("unet/config.json", "tokenizer/vocab.json", "model_index.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cross_attention_dim(tmp_path: Path) -> None:
    path = build_tiny_stable_diffusion(tmp_path / "m", cross_attention_dim=48, vocabulary="tiny")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 48
