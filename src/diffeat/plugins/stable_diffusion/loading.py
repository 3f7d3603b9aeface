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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffeat.core.errors import ModelLoadError
from diffeat.plugins.modelfiles import (
    file_fingerprint,
    hub_snapshot,
    is_hub_id,
    quiet_transformers,
)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_PATTERNS = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
    "scheduler/*",
]
_UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def resolve_model_dir(model: str, revision: str = "") -> Path:
    """A local folder for ``model`` (a folder path, or a hub id resolved to its snapshot)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise ModelLoadError(
                f"{path} is not a diffusers Stable Diffusion folder (no unet/ subfolder); "
                f"expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"
            )
        return path
    if not is_hub_id(model):
        raise ModelLoadError(
            f"model {model!r} is neither a folder nor a hub id of the form 'owner/name'"
        )
    return hub_snapshot(model, revision, [_HUB_PATTERNS], [_UNET_WEIGHTS])


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


def _load(cls: Any, folder: Path, sub: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(folder, subfolder=sub, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {sub}/ of {folder}: {type(exc).__name__}: {exc}"
        ) from None


def _quiet_libraries() -> None:
    """Silence per-file progress bars and advisory warnings of diffusers/transformers loading."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    quiet_transformers()


def load_parts(
    folder: Path, dtype: torch.dtype, device: torch.device, *, decoder: bool = False
) -> StableDiffusionParts:
    """Load UNet, VAE, text encoder, tokenizer and DDIM scheduler from a local folder.

    The VAE decoder is kept only when ``decoder`` is true (generation decodes its image).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    _quiet_libraries()
    unet = _load(UNet2DConditionModel, folder, "unet", torch_dtype=dtype)
    vae = _load(AutoencoderKL, folder, "vae", torch_dtype=dtype)
    if not decoder:
        vae.decoder = None  # not needed to encode; frees about a third of the VAE
    text_encoder = _load(CLIPTextModel, folder, "text_encoder", torch_dtype=dtype)
    tokenizer = _load(CLIPTokenizer, folder, "tokenizer")
    scheduler = _load(DDIMScheduler, folder, "scheduler")
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
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
