"""The parts of a Stable Diffusion checkpoint the cross-attention matcher runs: the UNet, the
VAE encoder and the noise schedule (the text encoder is bypassed: the context is optimised).

Loaded with diffusers directly; hub snapshots and fingerprints come from the neutral
:mod:`diffeat.plugins.modelfiles`, so the identity is that of the files actually loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffeat.plugins.diffusers_models import (
    UNET_VAE_PATTERNS,
    diffusers_folder,
    load_unet_vae_scheduler,
)
from diffeat.plugins.modelfiles import files_fingerprint

_COMPONENTS = ("unet", "vae", "scheduler")


def model_folder(model: str, revision: str = "") -> Path:
    """A local diffusers folder for ``model`` (a folder, or a hub id resolved to its snapshot)."""
    return diffusers_folder(
        model,
        revision,
        required=_COMPONENTS,
        patterns=UNET_VAE_PATTERNS,
        option="matcher.model",
        expected="the cross-attention matcher needs unet/, vae/ and scheduler/",
    )


@dataclass
class DiffusionParts:
    """A frozen UNet, a VAE (encoder only), ``alphas_cumprod`` and the folder they came from."""

    unet: Any
    vae: Any
    alphas_cumprod: torch.Tensor
    folder: Path

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def identity(self) -> dict[str, str]:
        """A content fingerprint of the loaded files."""
        files = [p for c in _COMPONENTS for p in (self.folder / c).rglob("*") if p.is_file()]
        return {"fingerprint": files_fingerprint(files, self.folder)}


#: the model dtypes of the ``dtype`` option
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def vae_dtype(folder: Path, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: float32 when ``dtype`` is float16 and ``vae/config.json`` says
    ``force_upcast`` (SDXL's VAE overflows in float16), else ``dtype``."""
    if dtype != torch.float16:
        return dtype
    try:
        config = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return dtype
    return torch.float32 if config.get("force_upcast") else dtype


def load_diffusion_parts(folder: Path, dtype: torch.dtype, device: torch.device) -> DiffusionParts:
    """The UNet (in ``dtype``) and VAE encoder (see :func:`vae_dtype`) on ``device``, eval
    mode, without gradients; the noise schedule in float32."""
    unet, vae, scheduler = load_unet_vae_scheduler(
        folder, dtype, device, vae_dtype=vae_dtype(folder, dtype)
    )
    return DiffusionParts(unet, vae, scheduler.alphas_cumprod.float(), folder)
