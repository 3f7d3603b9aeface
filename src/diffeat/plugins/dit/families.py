"""What differs between the diffusion-transformer families: SD3 / SD3.5, FLUX, PixArt.

A family is recognised from the transformer class that ``model_index.json``
names. Each knows its text encoding (through its own diffusers pipeline's
``encode_prompt``, so prompts go through the model's own encoders exactly as
when sampling), how its transformer is called on a noisy latent, how a latent
is noised at timestep ``t``, and where the AdaLN modulation that reads a
block's output comes from (for DiTF's normalisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Family:
    """One supported family: its transformer class, pipeline kind and conventions."""

    name: str
    transformer_class: str
    #: flow matching (x_t = (1 - sigma) x0 + sigma noise) or DDPM (alphas_cumprod)
    flow: bool
    #: the module whose output is the blocks' conditioning embedding
    conditioning_module: str
    #: the pipeline's default T5 length
    max_sequence_length: int
    #: text components this family can run without (SD3: T5)
    optional: tuple[str, ...] = ()


FAMILIES = {
    "SD3Transformer2DModel": Family(
        "sd3", "SD3Transformer2DModel", True, "time_text_embed", 256, ("text_encoder_3",)
    ),
    "FluxTransformer2DModel": Family(
        "flux", "FluxTransformer2DModel", True, "time_text_embed", 512
    ),
    "PixArtTransformer2DModel": Family(
        "pixart", "PixArtTransformer2DModel", False, "adaln_single", 120
    ),
}
#: the components read from the folder: the VAE, the transformer, the scheduler config and
#: every text encoder / tokenizer the pipeline lists
TEXT_PARTS = (
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)


# -- noise -------------------------------------------------------------------------


def flow_sigma(scheduler_config: Any, t: int, image_seq_len: int, shift: bool) -> float:
    """The flow-matching sigma of timestep ``t``: ``t / num_train_timesteps``, shifted as the
    scheduler config says when ``shift`` (a static ``shift``, or FLUX's dynamic shift with
    ``mu`` interpolated from the image's token count as ``FluxPipeline.calculate_shift``)."""
    c = scheduler_config
    s = t / c.get("num_train_timesteps", 1000)
    if not shift or s == 0:
        return s
    if c.get("use_dynamic_shifting", False):
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        mu = image_seq_len * m + (base_shift - m * base_len)
        if c.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / s - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    k = c.get("shift", 1.0)
    return k * s / (1 + (k - 1) * s)


def ddpm_noise(
    scheduler_config: Any, x0: torch.Tensor, noise: torch.Tensor, t: int
) -> torch.Tensor:
    """``DDPMScheduler.add_noise`` with the model's own beta schedule."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler_config)
    ts = torch.full((x0.shape[0],), t, dtype=torch.long)
    return sched.add_noise(x0, noise, ts)


# -- FLUX packing ------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patch packing: ``[B, c, h, w]`` -> ``[B, (h/2)(w/2), 4c]`` (row-major tokens)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's image position ids ``[(h)(w), 3]`` of an ``h x w`` token grid: (0, row, col)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


# -- the forward of each family ---------------------------------------------------------------


def default_sequence_length(family: Family, pipe: Any) -> int:
    """The text length the pipeline's own ``encode_prompt`` defaults to (PixArt-alpha 120,
    PixArt-Sigma 300, SD3 256, FLUX 512), else the family's."""
    import inspect

    try:
        value = inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default
    except (AttributeError, KeyError, TypeError, ValueError):
        return family.max_sequence_length
    return value if isinstance(value, int) and value > 0 else family.max_sequence_length


def encode_prompt(
    family: Family, pipe: Any, prompt: str, device: torch.device, length: int
) -> dict:
    """The prompt's conditioning tensors (batch 1) from the pipeline's own ``encode_prompt``."""
    if family.name == "flux":
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=[prompt], prompt_2=None, device=device, max_sequence_length=length
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
    if family.name == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=[prompt],
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    embeds, mask, _, _ = pipe.encode_prompt(
        [prompt],
        do_classifier_free_guidance=False,
        device=device,
        clean_caption=False,
        max_sequence_length=length,
    )
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


def forward_kwargs(
    family: Family,
    transformer: nn.Module,
    latents: torch.Tensor,
    sigma_or_t: float,
    cond: dict[str, torch.Tensor],
    guidance: float,
) -> dict[str, Any]:
    """The keyword arguments of one transformer call on noisy latents ``[N, c, h, w]``.

    ``cond`` holds the prompt tensors, already one row per latent. ``sigma_or_t``
    is the flow sigma (FLUX gets it as is, the transformer scales it by 1000;
    SD3 gets ``sigma * 1000``, as its pipeline passes the scheduler's timesteps)
    or, for DDPM models, the integer timestep.
    """
    n, dev, dtype = latents.shape[0], latents.device, latents.dtype
    if family.name == "flux":
        h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
        kwargs = {
            "hidden_states": pack_latents(latents),
            "timestep": torch.full((n,), sigma_or_t, device=dev, dtype=dtype),
            "pooled_projections": cond["pooled_projections"],
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "txt_ids": cond["txt_ids"],
            "img_ids": image_ids(h, w, dev, dtype),
            "return_dict": False,
        }
        if transformer.config.guidance_embeds:
            kwargs["guidance"] = torch.full((n,), guidance, device=dev, dtype=torch.float32)
        return kwargs
    if family.name == "sd3":
        return {
            "hidden_states": latents,
            # float32 as the pipeline passes it: SD3's embedding does not cast it back, and
            # in bfloat16 sigma * 1000 = 513.16 would become 512
            "timestep": torch.full((n,), sigma_or_t * 1000, device=dev, dtype=torch.float32),
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "pooled_projections": cond["pooled_projections"],
            "return_dict": False,
        }
    added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
    if transformer.use_additional_conditions:  # PixArt-alpha 1024: the pixel size and ratio
        hp, wp = latents.shape[-2] * 8, latents.shape[-1] * 8
        added = {
            "resolution": torch.tensor([[hp, wp]], device=dev, dtype=dtype).repeat(n, 1),
            "aspect_ratio": torch.tensor([[hp / wp]], device=dev, dtype=dtype).repeat(n, 1),
        }
    return {
        "hidden_states": latents,
        "encoder_hidden_states": cond["encoder_hidden_states"],
        "encoder_attention_mask": cond["encoder_attention_mask"],
        "timestep": torch.full((n,), int(sigma_or_t), device=dev, dtype=torch.long),
        "added_cond_kwargs": added,
        "return_dict": False,
    }


# -- the AdaLN that reads a block's output --------------------------------------------------


def block_names(transformer: nn.Module) -> list[str]:
    """The blocks in forward order: ``transformer_blocks.*`` then ``single_transformer_blocks.*``."""
    names = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    singles = getattr(transformer, "single_transformer_blocks", None) or []
    return names + [f"single_transformer_blocks.{i}" for i in range(len(singles))]


def config_block_names(family: Family, config: dict[str, Any]) -> list[str]:
    """:func:`block_names` from ``transformer/config.json`` alone (no weights loaded)."""
    names = [f"transformer_blocks.{i}" for i in range(int(config.get("num_layers", 0)))]
    if family.name == "flux":
        singles = int(config.get("num_single_layers", 0))
        names += [f"single_transformer_blocks.{i}" for i in range(singles)]
    return names


def reader_modulation(
    family: Family, transformer: nn.Module, name: str, cond: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` ``[N, C]`` of the AdaLN that reads the output of block ``name``:
    the next block's attention-branch modulation (``shift_msa``, ``scale_msa``), or after
    the last block the output norm's. ``cond`` is the captured output of the family's
    conditioning module (PixArt: ``adaln_single``'s ``(timestep, embedded_timestep)``)."""
    names = block_names(transformer)
    i = names.index(name)
    modules = dict(transformer.named_modules())
    nxt = modules[names[i + 1]] if i + 1 < len(names) else None
    c = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    if family.name == "pixart":
        t_block, embedded = cond
        if nxt is not None:
            table = nxt.scale_shift_table[None] + t_block.reshape(t_block.shape[0], 6, -1)
        else:
            table = transformer.scale_shift_table[None] + embedded[:, None]
        return table[:, 0].float(), table[:, 1].float()
    if nxt is None:  # AdaLayerNormContinuous: scale first, then shift
        emb = transformer.norm_out.linear(F.silu(cond).to(transformer.norm_out.linear.weight.dtype))
        scale, shift = emb.chunk(2, dim=1)
        return shift.float(), scale.float()
    norm = nxt.norm if names[i + 1].startswith("single_") else nxt.norm1
    emb = norm.linear(F.silu(cond))
    emb = emb.view(emb.shape[0], -1, c)  # AdaLayerNormZero(Single/X): shift_msa, scale_msa, ...
    return emb[:, 0].float(), emb[:, 1].float()
