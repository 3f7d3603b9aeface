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

from diffeat.core.errors import ModelLoadError
from diffeat.plugins.diffusers_models import (
    UNET_VAE_PATTERNS,
    diffusers_folder,
    load_component,
    load_unet_vae_scheduler,
)
from diffeat.plugins.modelfiles import file_fingerprint, files_fingerprint, hub_origin

#: the components whose files identify a model (SDXL's second text encoder included;
#: absent folders are skipped, so SD 1.x/2.x fingerprints are as before)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
_HUB_PATTERNS = [
    *UNET_VAE_PATTERNS,
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/*",
]

#: the model families the extractor runs, and what marks each in a diffusers folder
FAMILIES = {
    "sd": "Stable Diffusion 1.x / 2.x (StableDiffusionPipeline: UNet2DConditionModel without "
    "an added embedding, CLIPTextModel text_encoder + tokenizer)",
    "sdxl": "SDXL / SDXL-Turbo (StableDiffusionXLPipeline: UNet2DConditionModel with "
    "addition_embed_type 'text_time', CLIPTextModel text_encoder + "
    "CLIPTextModelWithProjection text_encoder_2, tokenizer + tokenizer_2)",
}


def resolve_model_dir(model: str, revision: str = "") -> Path:
    """A local folder for ``model`` (a folder path, or a hub id resolved to its snapshot)."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        model_family(path)  # a folder of another family: say what it holds
    return diffusers_folder(
        model,
        revision,
        required=("unet",),
        patterns=_HUB_PATTERNS,
        option="model",
        expected="expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/",
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_family(folder: Path) -> str:
    """``"sd"`` or ``"sdxl"`` from a diffusers folder's ``unet/config.json`` and subfolders.

    Anything else raises :class:`ModelLoadError` naming what the folder holds (the
    pipeline and component classes of ``model_index.json``, the UNet's class and added
    embedding) and the supported families.
    """
    index = _json(folder / "model_index.json")
    unet = _json(folder / "unet" / "config.json")
    unet_class = unet.get("_class_name")
    added = unet.get("addition_embed_type")
    has = {c: (folder / c).is_dir() for c in ("text_encoder", "tokenizer", *SDXL_COMPONENTS)}
    if unet_class == "UNet2DConditionModel":
        if added is None and has["text_encoder"] and has["tokenizer"]:
            return "sd"
        if added == "text_time" and all(has.values()):
            return "sdxl"
    parts = [
        f"{name}: {value[1]}"
        for name, value in index.items()
        if isinstance(value, list) and len(value) == 2 and value[1]
    ]
    found = [f"model_index.json names {index.get('_class_name', 'no pipeline class')}"]
    if parts:
        found.append(f"components {', '.join(parts)}")
    found.append(
        f"unet/config.json: {unet_class or 'missing'}"
        + (f" with addition_embed_type {added!r}" if added else "")
    )
    missing = [c for c, ok in has.items() if not ok]
    if missing and unet_class == "UNet2DConditionModel":
        found.append(f"no {', '.join(m + '/' for m in missing)}")
    supported = "; ".join(FAMILIES.values())
    raise ModelLoadError(
        f"{folder} is not a model the stable-diffusion extractor runs ({'; '.join(found)}). "
        f"Supported: {supported}. Other backbones have their own extractors "
        f"(`diffeat plugins` lists them)"
    )


def weights_fingerprint(path: Path) -> str:
    """A content fingerprint of a UNet weights file or of the files of a UNet folder."""
    if path.is_dir():
        return files_fingerprint([f for f in path.rglob("*") if f.is_file()], path)
    if hub_origin(path) is not None:  # a file of a hub snapshot: its commit and name
        return files_fingerprint([path])
    return file_fingerprint(path)[:32]


def model_fingerprint(
    folder: Path, components: tuple[str, ...] = COMPONENTS + SDXL_COMPONENTS
) -> str:
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
    """The loaded components (the VAE decoder is dropped unless generating images);
    SDXL's second text encoder and tokenizer when ``family == "sdxl"``."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    folder: Path
    family: str = "sd"
    text_encoder_2: Any = None
    tokenizer_2: Any = None


def vae_dtype_for(folder: Path, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: float32 when ``dtype`` is float16 and the VAE config says
    ``force_upcast`` (SDXL's VAE overflows in float16), as the SDXL pipeline does."""
    if dtype == torch.float16 and _json(folder / "vae" / "config.json").get("force_upcast"):
        return torch.float32
    return dtype


def load_parts(
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    *,
    decoder: bool = False,
    unet_weights: str = "",
) -> StableDiffusionParts:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and DDIM scheduler from a local folder.

    The VAE decoder is kept only when ``decoder`` is true (generation decodes its image);
    ``unet_weights`` (a safetensors state dict or a UNet folder) replaces the UNet's
    weights (CleanDIFT).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family = model_family(folder)
    unet, vae, scheduler = load_unet_vae_scheduler(
        folder, dtype, device, decoder=decoder, vae_dtype=vae_dtype_for(folder, dtype)
    )
    if unet_weights:
        unet = swap_unet_weights(unet, Path(unet_weights).expanduser(), dtype, device)
    text_encoder = load_component(CLIPTextModel, folder, "text_encoder", torch_dtype=dtype)
    tokenizer = load_component(CLIPTokenizer, folder, "tokenizer")
    text_encoder.to(device).eval().requires_grad_(False)
    parts = StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, folder, family)
    if family == "sdxl":
        parts.text_encoder_2 = load_component(
            CLIPTextModelWithProjection, folder, "text_encoder_2", torch_dtype=dtype
        )
        parts.text_encoder_2.to(device).eval().requires_grad_(False)
        parts.tokenizer_2 = load_component(CLIPTokenizer, folder, "tokenizer_2")
    return parts


def swap_unet_weights(unet: Any, path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """``unet`` with the weights of ``path``: a safetensors state dict with diffusers key
    names (CleanDIFT's ``cleandift_sd21_unet.safetensors``), loaded strictly, or a UNet
    folder (``config.json`` + weights) loaded with ``from_pretrained``."""
    from diffusers import UNet2DConditionModel

    where = f"unet_weights {str(path)!r}"
    if path.is_dir():
        sub = {"subfolder": "unet"} if (path / "unet" / "config.json").is_file() else {}
        try:
            new = UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype, **sub)
        except Exception as exc:
            raise ModelLoadError(f"{where}: cannot load a UNet folder: {exc}") from None
        return new.to(device).eval().requires_grad_(False)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{where}: expected a .safetensors file of UNet weights (diffusers key names, e.g. "
            f"CleanDIFT's cleandift_sd21_unet.safetensors) or a UNet folder"
        )
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{where}: not a readable safetensors file ({exc})") from None
    own = unet.state_dict()
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unknown or wrong:
        problems = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for keys, what in (
                (missing, "keys missing"),
                (unknown, "unknown keys"),
                (wrong, "keys of another shape"),
            )
            if keys
        ]
        raise ModelLoadError(
            f"{where} does not fit the UNet of the model: {', '.join(problems)}; give the "
            f"weights made for this base model (CleanDIFT: cleandift_sd15_unet.safetensors "
            f"with SD 1.5, cleandift_sd21_unet.safetensors with SD 2.1)"
        )
    unet.load_state_dict(state, strict=True)
    return unet


def model_info(folder: Path) -> dict[str, Any]:
    """Scheduler and UNet facts worth recording (prediction type, sample size)."""
    out: dict[str, Any] = {}
    try:
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        out["prediction_type"] = sched.get("prediction_type", "epsilon")
    except (OSError, ValueError):
        pass
    return out
