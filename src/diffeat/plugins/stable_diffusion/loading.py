"""Finding and loading a Stable Diffusion checkpoint in diffusers format.

A model is a hub id (``stabilityai/stable-diffusion-2-1``) or a local folder.
Hub ids are resolved to a local snapshot first (downloaded when online, from
the cache when offline), so the model identity is always a fingerprint of the
files actually loaded (hub snapshots and file fingerprints come from
:mod:`diffeat.plugins.modelfiles`, shared with the other extractors).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffeat.plugins.diffusers_models import (
    UNET_VAE_PATTERNS,
    diffusers_folder,
    load_component,
    load_unet_vae_scheduler,
)
from diffeat.plugins.modelfiles import file_fingerprint

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_PATTERNS = [
    *UNET_VAE_PATTERNS,
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
]


def resolve_model_dir(model: str, revision: str = "") -> Path:
    """A local folder for ``model`` (a folder path, or a hub id resolved to its snapshot)."""
    return diffusers_folder(
        model,
        revision,
        required=("unet",),
        patterns=_HUB_PATTERNS,
        option="model",
        expected="expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/",
    )


def model_fingerprint(folder: Path, components: tuple[str, ...] = COMPONENTS) -> str:
    """A content fingerprint of the files of ``components`` in a diffusers folder."""
    h = hashlib.sha256()
    for comp in components:
        sub = folder / comp
        if not sub.is_dir():
            continue
        for f in sorted(p for p in sub.rglob("*") if p.is_file()):
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(file_fingerprint(f).encode())
    return h.hexdigest()[:32]


@dataclass
class StableDiffusionParts:
    """The loaded components (the VAE decoder is dropped unless generating images)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    folder: Path


def load_parts(
    folder: Path, dtype: torch.dtype, device: torch.device, *, decoder: bool = False
) -> StableDiffusionParts:
    """Load UNet, VAE, text encoder, tokenizer and DDIM scheduler from a local folder.

    The VAE decoder is kept only when ``decoder`` is true (generation decodes its image).
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    unet, vae, scheduler = load_unet_vae_scheduler(folder, dtype, device, decoder=decoder)
    text_encoder = load_component(CLIPTextModel, folder, "text_encoder", torch_dtype=dtype)
    tokenizer = load_component(CLIPTokenizer, folder, "tokenizer")
    text_encoder.to(device).eval().requires_grad_(False)
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, folder)


def model_info(folder: Path) -> dict[str, Any]:
    """Scheduler and UNet facts worth recording (prediction type, sample size)."""
    out: dict[str, Any] = {}
    try:
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        out["prediction_type"] = sched.get("prediction_type", "epsilon")
    except (OSError, ValueError):
        pass
    return out
