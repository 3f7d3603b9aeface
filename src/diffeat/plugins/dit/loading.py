"""Finding a diffusion-transformer folder, recognising its family and loading only what
extraction needs (the transformer, the VAE encoder, the text encoders and tokenizers,
the scheduler config)."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffeat.core.errors import ModelLoadError
from diffeat.plugins.diffusers_models import load_component, quiet_diffusers
from diffeat.plugins.dit.families import FAMILIES, TEXT_PARTS, Family
from diffeat.plugins.modelfiles import files_fingerprint, hub_snapshot, is_hub_id

_HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "transformer/*.json",
    "transformer/*.safetensors",
    "text_encoder*/*.json",
    "text_encoder*/*.safetensors",
    "tokenizer*/*",
]
_WEIGHTS = ["transformer/*.safetensors"]
#: libraries model_index.json may name a component's class from (never anything else)
_LIBRARIES = ("diffusers", "transformers")


def supported() -> str:
    return ", ".join(f"{f.transformer_class} ({f.name})" for f in FAMILIES.values())


def resolve_folder(model: str, revision: str = "") -> Path:
    """A local folder for ``model``: a folder, or a hub id resolved to its snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(model):
        raise ModelLoadError(
            f"model {model!r} is neither a folder nor a hub id of the form 'owner/name'"
        )
    return hub_snapshot(model, revision, [_HUB_PATTERNS], _WEIGHTS)


def read_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    try:
        return json.loads(index.read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"{folder} has no model_index.json: give a diffusers pipeline folder of one of "
            f"the supported families: {supported()}"
        ) from None
    except ValueError as exc:
        raise ModelLoadError(f"{index} is not valid JSON ({exc})") from None


def detect_family(folder: Path) -> Family:
    """The family named by ``model_index.json``'s transformer class; anything else is an
    error that says what was found and what is supported."""
    index = read_index(folder)
    entry = index.get("transformer")
    cls = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else None
    if cls in FAMILIES:
        return FAMILIES[cls]
    pipeline = index.get("_class_name", "?")
    if cls is None:
        denoiser = index.get("unet") or index.get("prior")
        found = f"no transformer (a {pipeline}" + (
            f" with unet {denoiser[1]}); use the stable-diffusion extractor for UNet models"
            if isinstance(denoiser, list) and len(denoiser) == 2
            else ")"
        )
    else:
        found = f"transformer class {cls} (pipeline {pipeline})"
    raise ModelLoadError(
        f"{folder / 'model_index.json'} names {found}; the diffusion-transformer extractor "
        f"supports {supported()}"
    )


def component_class(index: dict[str, Any], part: str, folder: Path) -> Any:
    """The class ``model_index.json`` names for ``part``, from diffusers or transformers only."""
    entry = index.get(part)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        return None
    library, name = entry
    if library not in _LIBRARIES:
        raise ModelLoadError(
            f"{folder / 'model_index.json'}: {part} comes from {library!r}; only "
            f"{' and '.join(_LIBRARIES)} classes are loaded"
        )
    cls = getattr(importlib.import_module(library), name, None)
    if cls is None:
        raise ModelLoadError(
            f"{folder / 'model_index.json'}: {part} names {library}.{name}, which this "
            f"{library} version does not have"
        )
    return cls


def needed_parts(index: dict[str, Any], family: Family, t5: bool) -> list[str]:
    """The text components to load: those the pipeline lists, less T5 when it may go."""
    parts = [p for p in TEXT_PARTS if component_class_name(index, p)]
    if not t5 and "text_encoder_3" in family.optional:
        parts = [p for p in parts if p not in ("text_encoder_3", "tokenizer_3")]
    return parts


def component_class_name(index: dict[str, Any], part: str) -> str | None:
    entry = index.get(part)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else None


@dataclass
class DitParts:
    """The loaded components and the pipeline object whose ``encode_prompt`` they serve."""

    family: Family
    transformer: Any
    vae: Any
    scheduler_config: Any
    text: dict[str, Any]
    pipeline: Any
    folder: Path

    @property
    def encoders(self) -> list[Any]:
        return [m for k, m in self.text.items() if k.startswith("text_encoder")]


def load_parts(
    folder: Path,
    family: Family,
    *,
    dtype: torch.dtype,
    device: torch.device,
    text_device: torch.device,
    t5: bool,
) -> DitParts:
    """The transformer (``dtype``, on ``device``), the VAE encoder (float32, decoder dropped),
    the scheduler config and the text encoders (``dtype``, on ``text_device``)."""
    quiet_diffusers()
    index = read_index(folder)
    tcls = component_class(index, "transformer", folder)
    transformer = load_component(tcls, folder, "transformer", torch_dtype=dtype)
    vae = load_component(component_class(index, "vae", folder), folder, "vae")
    vae.decoder = None
    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot read scheduler/scheduler_config.json of {folder}: {exc}"
        ) from None
    text: dict[str, Any] = {}
    for part in needed_parts(index, family, t5):
        cls = component_class(index, part, folder)
        if part.startswith("tokenizer"):
            text[part] = load_component(cls, folder, part)
        else:
            text[part] = load_component(cls, folder, part, torch_dtype=dtype)
            text[part].to(text_device).eval().requires_grad_(False)
    # some diffusers classes keep modules in float32 when loading with torch_dtype (SD3's
    # patch embedding); the transformer runs in one dtype
    transformer.to(device, dtype).eval().requires_grad_(False)
    vae.to(device, torch.float32).eval().requires_grad_(False)
    pipeline_cls = getattr(importlib.import_module("diffusers"), index.get("_class_name", ""), None)
    if pipeline_cls is None:
        raise ModelLoadError(
            f"{folder / 'model_index.json'}: pipeline class {index.get('_class_name')!r} is not "
            f"in this diffusers version"
        )
    kwargs = {p: text.get(p) for p in TEXT_PARTS if component_class_name(index, p)}
    pipeline = pipeline_cls(transformer=transformer, vae=vae, scheduler=None, **kwargs)
    return DitParts(family, transformer, vae, scheduler_config, text, pipeline, folder)


def fingerprint(folder: Path, parts: list[str]) -> str:
    """A content fingerprint of the files of the components ``parts`` (and model_index.json)."""
    files = [folder / "model_index.json"]
    for part in parts:
        sub = folder / part
        if sub.is_dir():
            files.extend(p for p in sub.rglob("*") if p.is_file())
    return files_fingerprint(files, folder)
