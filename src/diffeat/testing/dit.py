"""Offline builders for tiny random-weight diffusion transformers: SD3 (MMDiT), FLUX and PixArt.

Each folder is in the ordinary diffusers layout (``model_index.json`` naming the
pipeline class, ``transformer/``, ``vae/``, ``scheduler/``, the text encoders and
their tokenizers) and loads component by component with ``from_pretrained``, so
tests run the same code paths as with a real checkpoint. The classes are the real
ones (``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
``PixArtTransformer2DModel``, ``AutoencoderKL``, CLIP and T5 encoders from
transformers); only the widths and depths are tiny. Tokenizers are written
offline: CLIP as :func:`diffeat.testing.sd.write_clip_tokenizer` does, T5 as a
small Unigram ``tokenizer.json`` built with the ``tokenizers`` library.

The structure that extraction depends on is kept: patch size 2 (FLUX packs 2x2
latent patches into 64-channel tokens with ``patch_size=1`` in the transformer),
a VAE with 3 downsamplings (factor 8, so one token covers 16 pixels), 16 latent
channels with ``shift_factor`` for SD3/FLUX, double- and single-stream blocks
for FLUX, a last ``context_pre_only`` joint block for SD3, AdaLN-single for PixArt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffeat.testing.sd import EOS_TOKEN, write_clip_tokenizer

__all__ = [
    "TINY_DIT_HEADS",
    "TINY_DIT_HEAD_DIM",
    "build_tiny_flux",
    "build_tiny_pixart",
    "build_tiny_sd3",
    "write_t5_tokenizer",
]

#: heads and head dim of every tiny transformer (inner dim 16)
TINY_DIT_HEADS = 2
TINY_DIT_HEAD_DIM = 8
_T5_DIM = 32
_CLIP_DIM = 16
_T5_WORDS = (
    "a", "an", "the", "of", "and", "in", "on", "with", "photo", "picture", "image", "cat",
    "dog", "bird", "car", "horse", "person",
)  # fmt: skip


def write_t5_tokenizer(path: str | Path, *, model_max_length: int = 512) -> Path:
    """Write a small T5-style tokenizer (Unigram, ``</s>`` appended, ``<pad>`` id 0) offline.

    The folder holds ``tokenizer.json`` and ``tokenizer_config.json`` and loads with
    ``transformers.T5TokenizerFast.from_pretrained(path)`` (or ``AutoTokenizer``):
    pieces for a few caption words, every lowercase letter and digit with and
    without the ``▁`` word marker, so any lowercase prompt tokenises.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [f"▁{w}" for w in _T5_WORDS] + ["▁"] + [f"▁{c}" for c in chars] + list(chars)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -1.0 - 0.1 * i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    ).save_pretrained(out)
    return out


def _t5_encoder(vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=_T5_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _clip_encoder(tokenizer: Any, *, projection: bool, hidden: int = _CLIP_DIM) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(latent_channels: int, scaling: float, shift: float | None, quant: bool) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    )


def _save(folder: Path, pipeline: Any, models: dict[str, Any]) -> None:
    """Models by ``save_pretrained`` (safetensors), tokenizers already written, index by config."""
    for name, model in models.items():
        model.eval().save_pretrained(folder / name, safe_serialization=True)
    pipeline.save_config(folder)


def _seeded(seed: int, builders: list[Any]) -> list[Any]:
    import torch

    out = []
    with torch.random.fork_rng(devices=[]):
        for i, build in enumerate(builders):
            torch.manual_seed(seed + i)
            out.append(build())
    return out


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's rotary axes for a head dim: (16, 56, 56) for 128, (2, 2, 4) for 8."""
    first = 2 * max(1, head_dim // 16)
    second = (head_dim - first) // 4 * 2
    return (first, second, head_dim - first - second)


def build_tiny_flux(
    path: str | Path,
    *,
    seed: int = 0,
    guidance_embeds: bool = True,
    heads: int = TINY_DIT_HEADS,
    head_dim: int = TINY_DIT_HEAD_DIM,
    num_layers: int = 2,
    num_single_layers: int = 3,
) -> Path:
    """A tiny random FLUX folder (``FluxPipeline`` layout, FLUX.1-dev's structure).

    ``num_layers`` double-stream ``transformer_blocks`` and ``num_single_layers``
    ``single_transformer_blocks`` of width ``heads * head_dim`` (16; FLUX.1-dev:
    19, 38, 24 x 128), a CLIP text encoder (pooled) and a T5 encoder, a 16-channel
    VAE with FLUX's scaling and shift factors, FLUX.1-dev's flow-matching
    scheduler config (dynamic shifting) and, with ``guidance_embeds``, its
    guidance embedding.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5TokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(out / "tokenizer", pad_token=EOS_TOKEN, vocabulary="tiny")
    )
    tokenizer_2 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(out / "tokenizer_2"))
    transformer, vae, text_encoder, text_encoder_2 = _seeded(
        seed,
        [
            lambda: FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=num_layers,
                num_single_layers=num_single_layers,
                attention_head_dim=head_dim,
                num_attention_heads=heads,
                joint_attention_dim=_T5_DIM,
                pooled_projection_dim=_CLIP_DIM,
                guidance_embeds=guidance_embeds,
                axes_dims_rope=_rope_axes(head_dim),
            ),
            lambda: _vae(16, 0.3611, 0.1159, quant=False),
            lambda: _clip_encoder(tokenizer, projection=False),
            lambda: _t5_encoder(len(tokenizer_2)),
        ],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    scheduler.save_pretrained(out / "scheduler")
    _save(
        out,
        pipe,
        {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
        },
    )
    return out


def build_tiny_sd3(
    path: str | Path,
    *,
    seed: int = 0,
    t5: bool = True,
    sd35: bool = False,
    heads: int = TINY_DIT_HEADS,
    head_dim: int = TINY_DIT_HEAD_DIM,
    num_layers: int = 3,
) -> Path:
    """A tiny random Stable Diffusion 3 folder (``StableDiffusion3Pipeline`` layout).

    ``num_layers`` ``JointTransformerBlock``s of width ``heads * head_dim`` (16;
    SD3 medium: 24 blocks, 24 x 64), the last ``context_pre_only`` as in SD3; with
    ``sd35`` the first two blocks have SD3.5 medium's second attention (``dual_attention_layers``,
    ``SD35AdaLayerNormZeroX``) and the attentions RMS-normalise q and k. Two CLIP encoders with projection (their penultimate states and pooled
    outputs concatenated as SD3 does) and, with ``t5``, a T5 encoder (without it
    ``text_encoder_3`` is absent, as ``StableDiffusion3Pipeline(text_encoder_3=None)``
    allows); a 16-channel VAE with SD3's scaling and shift factors and SD3's
    flow-matching scheduler config (``shift = 3``).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTokenizer, T5TokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(out / "tokenizer", pad_token=EOS_TOKEN, vocabulary="tiny")
    )
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(out / "tokenizer_2", pad_token="!", vocabulary="tiny")
    )
    tokenizer_3 = (
        T5TokenizerFast.from_pretrained(write_t5_tokenizer(out / "tokenizer_3")) if t5 else None
    )
    builders = [
        lambda: SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=_T5_DIM,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=2 * _CLIP_DIM,
            out_channels=16,
            pos_embed_max_size=96,
            dual_attention_layers=(0, 1) if sd35 else (),
            qk_norm="rms_norm" if sd35 else None,
        ),
        lambda: _vae(16, 1.5305, 0.0609, quant=False),
        lambda: _clip_encoder(tokenizer, projection=True),
        lambda: _clip_encoder(tokenizer_2, projection=True),
    ]
    if t5:
        builders.append(lambda: _t5_encoder(len(tokenizer_3)))
    models = _seeded(seed, builders)
    transformer, vae, text_encoder, text_encoder_2 = models[:4]
    text_encoder_3 = models[4] if t5 else None
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    scheduler.save_pretrained(out / "scheduler")
    parts = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
    }
    if t5:
        parts["text_encoder_3"] = text_encoder_3
    _save(out, pipe, parts)
    return out


def build_tiny_pixart(
    path: str | Path,
    *,
    seed: int = 0,
    heads: int = TINY_DIT_HEADS,
    head_dim: int = TINY_DIT_HEAD_DIM,
    num_layers: int = 3,
) -> Path:
    """A tiny random PixArt-alpha folder (``PixArtAlphaPipeline`` layout).

    ``num_layers`` ``BasicTransformerBlock``s with AdaLN-single
    (``norm_type="ada_norm_single"``) of width ``heads * head_dim`` (16; PixArt-alpha
    XL: 28 blocks, 16 x 72), a T5 encoder, an SD-style 4-channel VAE (scaling 0.18215, no
    shift) and PixArt's DPM-Solver scheduler config (linear betas, 1000 steps),
    whose ``add_noise`` the extractor uses.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5TokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(out / "tokenizer"))
    transformer, vae, text_encoder = _seeded(
        seed,
        [
            lambda: PixArtTransformer2DModel(
                num_attention_heads=heads,
                attention_head_dim=head_dim,
                in_channels=4,
                out_channels=8,
                num_layers=num_layers,
                cross_attention_dim=heads * head_dim,
                sample_size=64,
                patch_size=2,
                caption_channels=_T5_DIM,
                use_additional_conditions=False,
            ),
            lambda: _vae(4, 0.18215, None, quant=True),
            lambda: _t5_encoder(len(tokenizer)),
        ],
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    scheduler.save_pretrained(out / "scheduler")
    _save(out, pipe, {"transformer": transformer, "vae": vae, "text_encoder": text_encoder})
    return out
