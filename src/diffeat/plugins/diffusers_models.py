"""Finding and loading diffusers Stable Diffusion folders (neutral: shared by the
``stable-diffusion`` extractor and the ``cross-attention`` matcher, imports no plugin).

A model is a local diffusers folder or a hub id resolved to a snapshot of the
files a component needs (:func:`diffeat.plugins.modelfiles.hub_snapshot`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffeat.core.errors import ModelLoadError
from diffeat.plugins.modelfiles import hub_snapshot, is_hub_id, quiet_transformers

#: the UNet weights, the file whose presence marks a usable snapshot
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
#: the hub files of the UNet, VAE and scheduler (text encoder and tokenizer are extra)
UNET_VAE_PATTERNS = [
    "model_index.json",
    "unet/config.json",
    UNET_WEIGHTS,
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/*",
]


def diffusers_folder(
    model: str,
    revision: str,
    *,
    required: Sequence[str],
    patterns: list[str],
    option: str,
    expected: str,
) -> Path:
    """A local folder for ``model``: a folder with the ``required`` subfolders, or a hub id
    resolved to its snapshot of ``patterns``. ``option`` names the setting in messages and
    ``expected`` says what a folder must hold."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [c for c in required if not (path / c).is_dir()]
        if missing:
            raise ModelLoadError(
                f"{path} is not a diffusers Stable Diffusion folder (no "
                f"{', '.join(missing)}/ subfolder); {expected}"
            )
        return path
    if not is_hub_id(model):
        raise ModelLoadError(
            f"{option} {model!r} is neither a folder nor a hub id of the form 'owner/name'"
        )
    return hub_snapshot(model, revision, [patterns], [UNET_WEIGHTS])


def quiet_diffusers() -> None:
    """No telemetry, per-file progress bars or advisory warnings while loading."""
    import diffusers

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    quiet_transformers()


def load_component(cls: Any, folder: Path, sub: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder, subfolder=sub)``, a failure named by folder and part."""
    try:
        return cls.from_pretrained(folder, subfolder=sub, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {sub}/ of {folder}: {type(exc).__name__}: {exc}"
        ) from None


def load_unet_vae_scheduler(
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    *,
    decoder: bool = False,
    vae_dtype: torch.dtype | None = None,
) -> tuple[Any, Any, Any]:
    """The UNet and VAE (frozen, eval mode, on ``device``) and the DDIM scheduler.

    The VAE decoder is kept only when ``decoder`` is true (about a third of the VAE);
    the VAE loads in ``vae_dtype`` when given (float32 for an fp16-unsafe VAE).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    quiet_diffusers()
    unet = load_component(UNet2DConditionModel, folder, "unet", torch_dtype=dtype)
    vae = load_component(AutoencoderKL, folder, "vae", torch_dtype=vae_dtype or dtype)
    if not decoder:
        vae.decoder = None
    scheduler = load_component(DDIMScheduler, folder, "scheduler")
    for module in (unet, vae):
        module.to(device).eval().requires_grad_(False)
    return unet, vae, scheduler
