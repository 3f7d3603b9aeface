"""Options of the ``cross-attention`` matcher; the defaults are Hedlin et al.'s official recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffeat.core.options import opt

#: the official layers: the cross-attention of up_blocks.1 (16x16, three) and up_blocks.2's first
#: (32x32), layers 5..8 of the official indexing of maps of at most 32x32
HEDLIN_LAYERS = [
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
]


@dataclass
class CrossAttentionOptions:
    model: str = opt("CompVis/stable-diffusion-v1-4", "hub id or local diffusers SD folder")
    revision: str = opt("", "hub revision (branch, tag or commit); empty: the default branch")
    layers: list[str] = opt(
        list(HEDLIN_LAYERS),
        "UNet modules whose cross-attention (every attn2 inside) is supervised and read",
    )
    token: int = opt(1, "the context token whose attention map is optimised and read")
    context_length: int = opt(77, "tokens of the optimised context (the text encoder's length)")
    size: int = opt(512, "images are squashed to size x size; maps and the canvas are this size")
    steps: int = opt(129, "Adam steps per context")
    lr: float = opt(0.0023755632081200314, "Adam learning rate")
    restarts: int = opt(5, "independent contexts optimised per source point (maps averaged)")
    optimise_timestep: int = opt(
        140, "UNet timestep of the optimisation (the 50-step DDIM grid's index -8)"
    )
    inference_timestep: int = opt(
        40, "UNet timestep at inference (the grid's index -3)", cache=False
    )
    noise: Literal["uniform", "normal"] = opt(
        "uniform", "noise added to the latent: uniform [0, 1) as the official rand_like, or normal"
    )
    crop_percent: float = opt(
        93.16549294381423, "side of the random crops in percent of the image side"
    )
    margin: float = opt(0.15, "the point stays this fraction of the crop side from its border")
    sigma: float = opt(27.97853316316864, "target Gaussian sigma in pixels of the size frame")
    crops: int = opt(
        20,
        "inference crops per context: the 4 corners, then crops around the running argmax",
        cache=False,
    )
    heads: Literal["upper-half", "all"] = opt(
        "upper-half",
        "attention heads averaged: upper-half keeps heads n/2..n-1 as the official code "
        "(Prompt-to-Prompt's CFG slice), all averages every head",
    )
    offset: float = opt(
        0.5, "added to the argmax pixel (in the size frame) as the official", cache=False
    )
    return_maps: bool = opt(
        False,
        "keep each point's per-layer softmax maps [L, size, size] in the result's "
        "extras['attention'] (memory: 4 * L * size^2 bytes a point)",
        cache=False,
    )
    seed: int = opt(0, "seed of the contexts, crops and noise")
    max_batch: int = opt(
        1, "independent optimisations per UNet call (results do not depend on it)", cache=False
    )
    dtype: Literal["float32", "float16", "bfloat16"] = opt(
        "float32",
        "UNet and VAE dtype (the official runs float32); float16 or bfloat16 is a speed-up "
        "that changes results: the contexts, Adam and the loss stay float32",
    )
    crop_bank: int = opt(
        0,
        "0: VAE-encode every step's random crop (official); N > 0: encode N random crops per "
        "source point once (the same crop rule) and draw each step's crop from them",
        cache="if-set",
    )
    progress: bool = opt(
        True,
        "a progress bar on stderr counting UNet calls (hidden by diffeat --quiet, "
        "DIFFEAT_QUIET=1, or when stderr is not a terminal)",
        cache=False,
    )
    device: str = opt("auto", "torch device; auto: cuda if available, else cpu", cache=False)

    def validate(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype = {self.dtype!r} is not one of 'float32' (official), 'float16', 'bfloat16'"
            )
        if not self.layers:
            raise ValueError("layers must name at least one UNet module with cross-attention")
        checks = {
            "steps": self.steps >= 0,
            "restarts": self.restarts >= 1,
            "crops": self.crops >= 1,
            "size": self.size >= 8 and self.size % 8 == 0,
            "lr": self.lr > 0,
            "sigma": self.sigma > 0,
            "crop_percent": 0 < self.crop_percent <= 100,
            "margin": 0 <= self.margin < 0.5,
            "context_length": self.context_length >= 1,
            "token": 0 <= self.token < self.context_length,
            "max_batch": self.max_batch >= 1,
            "crop_bank": self.crop_bank >= 0,
            "optimise_timestep": self.optimise_timestep >= 0,
            "inference_timestep": self.inference_timestep >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            name = bad[0]
            raise ValueError(
                f"{name} = {getattr(self, name)!r} is out of range (size: a multiple of 8; "
                f"token: below context_length; margin: below 0.5; crop_bank: 0 (off) or a "
                f"number of crops; counts: at least 1)"
            )
