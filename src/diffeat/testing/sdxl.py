"""An offline builder for a tiny random-weight SDXL (or SDXL-Turbo) folder in diffusers format.

The folder has SDXL's layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``) and its architecture
with tiny channels: a ``UNet2DConditionModel`` with SDXL's block structure (a ``DownBlock2D``
and two ``CrossAttnDownBlock2D``, two ``CrossAttnUpBlock2D`` and an ``UpBlock2D``, two
downsamplings, more transformer layers in the deeper blocks) and its added embedding
``addition_embed_type = "text_time"`` (pooled text embedding + six size/crop time ids), a
``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` whose penultimate hidden states are
concatenated (the cross-attention width), two CLIP tokenizers (the second pads with ``"!"``,
as SDXL's), SDXL's VAE config (``scaling_factor = 0.13025``, ``force_upcast``) and its
scheduler config (Euler, or SDXL-Turbo's Euler-ancestral with trailing spacing). It loads with
``StableDiffusionXLPipeline.from_pretrained(path)`` and by component; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from diffeat.testing.sd import (
    EOS_TOKEN,
    SD2_PAD_TOKEN,
    TINY_UNET_NORM_NUM_GROUPS,
    tiny_text_encoder_config,
    tiny_vae_config,
    write_clip_tokenizer,
)

__all__ = [
    "TINY_SDXL_BLOCK_OUT_CHANNELS",
    "TINY_SDXL_POOLED_DIM",
    "TINY_SDXL_TEXT_WIDTHS",
    "TINY_SDXL_TIME_EMBED_DIM",
    "build_tiny_sdxl",
    "tiny_sdxl_unet_config",
]

#: SDXL's UNet ``(320, 640, 1280)`` divided by 40.
TINY_SDXL_BLOCK_OUT_CHANNELS: tuple[int, ...] = (8, 16, 32)
#: hidden sizes of the two text encoders (SDXL: 768 and 1280); their sum is the
#: UNet's cross-attention width (SDXL: 2048)
TINY_SDXL_TEXT_WIDTHS: tuple[int, int] = (16, 24)
#: the pooled, projected embedding of the second text encoder (SDXL: 1280)
TINY_SDXL_POOLED_DIM = 16
#: the sinusoidal width of each time id (SDXL: 256); six ids
TINY_SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_unet_config(*, sample_size: int = 32) -> dict[str, Any]:
    """UNet2DConditionModel config with SDXL's block structure and tiny channels."""
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": TINY_SDXL_BLOCK_OUT_CHANNELS,
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],  # SDXL: [1, 2, 10]
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": TINY_UNET_NORM_NUM_GROUPS,
        "norm_eps": 1e-5,
        "cross_attention_dim": sum(TINY_SDXL_TEXT_WIDTHS),
        "attention_head_dim": [1, 2, 4],  # SDXL: [5, 10, 20] (head dim 64); here head dim 8
        "use_linear_projection": True,
        "upcast_attention": False,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TINY_SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * TINY_SDXL_TIME_EMBED_DIM
        + TINY_SDXL_POOLED_DIM,
    }


def _scheduler_config(turbo: bool) -> dict[str, Any]:
    common = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
    }
    if turbo:  # SDXL-Turbo's scheduler_config.json
        return {**common, "timestep_spacing": "trailing"}
    return {
        **common,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }


def build_tiny_sdxl(
    path: str | Path,
    *,
    sample_size: int = 32,
    seed: int = 0,
    turbo: bool = False,
    vocabulary: Literal["auto", "clip", "tiny"] = "tiny",
) -> Path:
    """Build a tiny random-weight SDXL pipeline folder (SDXL-Turbo's scheduler with ``turbo``).

    Weights are float32 safetensors; the same ``seed`` gives identical files and the
    caller's torch RNG state is left untouched. Returns the folder.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok1 = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(out / "tokenizer", pad_token=EOS_TOKEN, vocabulary=vocabulary)
    )
    tok2 = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(out / "tokenizer_2", pad_token=SD2_PAD_TOKEN, vocabulary=vocabulary)
    )

    def text_config(tok: Any, width: int, sd2_style: bool, projection: int) -> Any:
        cfg = tiny_text_encoder_config(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            hidden_size=width,
            sd2_style=sd2_style,
        )
        return CLIPTextConfig(**{**cfg, "projection_dim": projection})

    w1, w2 = TINY_SDXL_TEXT_WIDTHS
    vae_config = {
        **tiny_vae_config(sample_size=sample_size),
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_sdxl_unet_config(sample_size=sample_size))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config)
        torch.manual_seed(seed + 2)
        enc1 = CLIPTextModel(text_config(tok1, w1, False, w1))
        torch.manual_seed(seed + 3)
        enc2 = CLIPTextModelWithProjection(text_config(tok2, w2, True, TINY_SDXL_POOLED_DIM))
    sched_cls = EulerAncestralDiscreteScheduler if turbo else EulerDiscreteScheduler
    scheduler = sched_cls(**_scheduler_config(turbo))
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=enc1.eval(),
        text_encoder_2=enc2.eval(),
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=not turbo,
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        getattr(pipe, name).save_pretrained(out / name, safe_serialization=True)
    pipe.save_config(out)
    return out
