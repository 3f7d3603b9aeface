"""The parts of a Stable Diffusion checkpoint the cross-attention matcher runs: the UNet, the
VAE encoder and the noise schedule (the text encoder is bypassed: the context is optimised).

Loaded with diffusers directly; hub snapshots and fingerprints come from the neutral
:mod:`diffeat.plugins.modelfiles`, so the identity is that of the files actually loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffeat.core.errors import ModelLoadError
from diffeat.plugins.modelfiles import (
    files_fingerprint,
    hub_snapshot,
    is_hub_id,
    quiet_transformers,
)

_COMPONENTS = ("unet", "vae", "scheduler")
_HUB_PATTERNS = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/*",
]
_UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def model_folder(model: str, revision: str = "") -> Path:
    """A local diffusers folder for ``model`` (a folder, or a hub id resolved to its snapshot)."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [c for c in _COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise ModelLoadError(
                f"{path} is not a diffusers Stable Diffusion folder (no {', '.join(missing)}/ "
                f"subfolder); the cross-attention matcher needs unet/, vae/ and scheduler/"
            )
        return path
    if not is_hub_id(model):
        raise ModelLoadError(
            f"matcher.model {model!r} is neither a folder nor a hub id of the form 'owner/name'"
        )
    return hub_snapshot(model, revision, [_HUB_PATTERNS], [_UNET_WEIGHTS])


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


def _load(cls: Any, folder: Path, sub: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(folder, subfolder=sub, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {sub}/ of {folder}: {type(exc).__name__}: {exc}"
        ) from None


def load_diffusion_parts(folder: Path, dtype: torch.dtype, device: torch.device) -> DiffusionParts:
    """The UNet and VAE encoder on ``device``, eval mode, without gradients."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    quiet_transformers()
    unet = _load(UNet2DConditionModel, folder, "unet", torch_dtype=dtype)
    vae = _load(AutoencoderKL, folder, "vae", torch_dtype=dtype)
    vae.decoder = None  # only encoding is needed
    scheduler = _load(DDIMScheduler, folder, "scheduler")
    for module in (unet, vae):
        module.to(device).eval().requires_grad_(False)
    return DiffusionParts(unet, vae, scheduler.alphas_cumprod.float(), folder)
