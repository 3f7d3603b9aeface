"""Finding, identifying and building OpenCLIP vision towers (open_clip_torch).

A neutral module shared by the ``openclip`` extractor (plugins/vit) and the
Stable Diffusion extractor's implicit captioner (plugins/stable_diffusion), so
that neither plugin imports the other.

Models: a built-in architecture name with a pretrained tag or a checkpoint file
(``ViT-H-14`` + ``laion2b_s32b_b79k``), a JSON model config file (registered
with ``open_clip.add_model_config``) with a checkpoint file, an
``hf-hub:org/repo`` id, or a folder holding ``open_clip_config.json`` and the
weights (open_clip's ``local-dir:``). :func:`resolve_source` finds the files
without loading weights; :func:`create_vision_tower` builds the model with
open_clip's own ``create_model`` and keeps only the vision tower. A pretrained
tag trained with QuickGELU on an architecture whose config says GELU (the
``openai`` tags) gets ``force_quick_gelu``, which open_clip itself only warns
about.

open_clip_torch is an optional dependency (``pip install "diffeat[openclip]"``),
imported only when a model is resolved.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError, ModelLoadError
from diffeat.plugins.modelfiles import files_fingerprint, hub_snapshot, is_hub_id

__all__ = [
    "CONFIG_FILE",
    "HF_HUB",
    "INSTALL_HINT",
    "LOCAL_DIR",
    "OpenClipSource",
    "OpenClipTower",
    "TowerShape",
    "create_vision_tower",
    "import_open_clip",
    "resolve_source",
    "source_identity",
    "tower_shape",
]

INSTALL_HINT = 'pip install "diffeat[openclip]"'
HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
_SAFE_WEIGHTS = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors"]
# read by open_clip with torch.load(weights_only=True); only when a repo has no safetensors
_PICKLE_WEIGHTS = ["open_clip_pytorch_model.bin"]
_CHECKPOINT_ORDER = [
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
]


def import_open_clip() -> ModuleType:
    """``open_clip``, or a :class:`ModelLoadError` naming the extra to install."""
    try:
        import open_clip
    except ImportError as exc:
        raise ModelLoadError(
            f"the openclip extractor needs the open_clip_torch package, which cannot be "
            f"imported ({exc}); install it with: {INSTALL_HINT}"
        ) from None
    return open_clip


@dataclass
class OpenClipSource:
    """Where a model comes from: what ``create_model`` gets and which files identify it."""

    create_name: str
    pretrained: str | None
    model_cfg: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    root: Path | None = None
    #: the pretrained tag was trained with QuickGELU but the architecture config says GELU
    quick_gelu: bool = False


# -- resolution ------------------------------------------------------------------------------------


def resolve_source(model: str, pretrained: str, revision: str = "") -> OpenClipSource:
    """Find the config and weight files of ``model`` (see the module docstring for the forms)
    without loading weights; ``pretrained`` is a tag or checkpoint file of a named
    architecture, ``revision`` the hub revision of an ``hf-hub:`` model."""
    oc = import_open_clip()
    if model.startswith(HF_HUB):
        repo = model[len(HF_HUB) :]
        folder = hub_snapshot(
            repo,
            revision,
            [[CONFIG_FILE, *_SAFE_WEIGHTS], [CONFIG_FILE, *_PICKLE_WEIGHTS]],
            _SAFE_WEIGHTS + _PICKLE_WEIGHTS,
        )
        return _folder_source(folder)
    raw = model[len(LOCAL_DIR) :] if model.startswith(LOCAL_DIR) else model
    path = Path(raw).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if model.startswith(LOCAL_DIR):
        raise ModelLoadError(f"folder {path} does not exist")
    if model.endswith(".json"):
        name = _register_config(path)
    else:
        name = model.replace("/", "-")  # as create_model cleans it: ViT-B/32 -> ViT-B-32
    cfg = oc.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, oc.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        if is_hub_id(model):
            hint = f" (for a hub repository write hf-hub:{model})"
        raise ConfigError(
            f"[extractor] model: {name!r} is not an open_clip architecture{hint}; give a "
            f"name from open_clip.list_models(), a JSON model config file, hf-hub:org/repo "
            f"or a folder with {CONFIG_FILE}"
        )
    return _named_source(oc, name, cfg, pretrained)


def _checkpoint_in_dir(folder: Path) -> Path | None:
    """The checkpoint open_clip's ``local-dir:`` loading picks in ``folder``."""
    oc = import_open_clip()
    finder = getattr(getattr(oc, "factory", None), "_find_checkpoint_in_dir", None)
    if finder is not None:
        found = finder(folder)
        return Path(found) if found else None
    for name in _CHECKPOINT_ORDER:
        if (folder / name).is_file():
            return folder / name
    return None


def _tag_hint(name: str, cfg: dict[str, Any]) -> str:
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)  # as open_clip splits it: "org/repo/[file]"
        file = filename or _SAFE_WEIGHTS[0]
        return (
            f"To use it without network access, download the checkpoint where the hub is "
            f"reachable (`hf download {repo} {file} --local-dir DIR`; "
            f"{_PICKLE_WEIGHTS[0]} if the repo has no safetensors), copy it here and pass "
            f'the file: model = "{name}", pretrained = "DIR/{file}".'
        )
    url = cfg.get("url", "")
    return (
        f"To use it without network access, download {url or 'the checkpoint'} where it is "
        f'reachable and pass the file: model = "{name}", pretrained = "FILE".'
    )


def _register_config(path: Path) -> str:
    oc = import_open_clip()
    if not path.is_file():
        raise ModelLoadError(f"model config file {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model config {path}: {exc}") from None
    if not all(k in content for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelLoadError(
            f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)"
        )
    oc.add_model_config(path)
    if oc.get_model_config(path.stem) != content:
        raise ModelLoadError(
            f"open_clip already knows another model named {path.stem!r}; rename {path}"
        )
    return path.stem


def _named_source(
    oc: ModuleType, name: str, cfg: dict[str, Any], pretrained: str
) -> OpenClipSource:
    tags = oc.list_pretrained_tags_by_model(name)
    if not pretrained:
        raise ConfigError(
            f"[extractor] pretrained is empty: give a tag of {name} "
            f"({', '.join(tags) or 'none known'}) or a checkpoint file"
        )
    tag_cfg = oc.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        try:
            checkpoint = oc.download_pretrained(tag_cfg)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelLoadError(
                f"cannot load the {name} weights {pretrained!r} ({type(exc).__name__}: "
                f"{first}). {_tag_hint(name, tag_cfg)}"
            ) from None
        if not checkpoint:
            raise ModelLoadError(f"open_clip gives no file for {name} / {pretrained}")
        # e.g. the openai tags: open_clip builds plain GELU and only warns
        quick = bool(tag_cfg.get("quick_gelu")) and not cfg.get("quick_gelu")
        return OpenClipSource(name, pretrained, cfg, [Path(checkpoint)], quick_gelu=quick)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return OpenClipSource(name, str(path), cfg, [path])
    raise ConfigError(
        f"[extractor] pretrained: {pretrained!r} is neither a pretrained tag of {name} "
        f"({', '.join(tags) or 'none known'}) nor a checkpoint file"
    )


def _folder_source(folder: Path) -> OpenClipSource:
    oc = import_open_clip()
    if getattr(getattr(oc, "factory", None), "LOCAL_DIR_PREFIX", None) is None:
        raise ModelLoadError(
            "this open_clip_torch cannot load folders (local-dir:); upgrade it "
            f"({INSTALL_HINT} --upgrade) or pass an architecture name and a checkpoint file"
        )
    config = folder / CONFIG_FILE
    try:
        model_cfg = json.loads(config.read_text())["model_cfg"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{folder} is not an open_clip model folder: {CONFIG_FILE} with a model_cfg "
            f"is missing or unreadable ({type(exc).__name__}: {exc})"
        ) from None
    checkpoint = _checkpoint_in_dir(folder)
    if checkpoint is None:
        raise ModelLoadError(
            f"{folder} has no weights (open_clip_model.safetensors or open_clip_pytorch_model.bin)"
        )
    return OpenClipSource(LOCAL_DIR + str(folder), None, model_cfg, [config, checkpoint], folder)


# -- identity and shape ----------------------------------------------------------------------------


def source_identity(
    source: OpenClipSource, model: str, pretrained: str, revision: str
) -> dict[str, Any]:
    """The model identity of ``source`` resolved from these options (what keys the store):
    the options as given, a hash of the model config and a fingerprint of its files."""
    cfg = json.dumps(source.model_cfg, sort_keys=True).encode()
    return {
        "model": model,
        "pretrained": pretrained if source.pretrained is not None else "",
        "revision": revision if model.startswith(HF_HUB) else "",
        "config": hashlib.sha256(cfg).hexdigest()[:16],
        "fingerprint": files_fingerprint(source.files, source.root),
        **({"quick_gelu": True} if source.quick_gelu else {}),
    }


@dataclass(frozen=True)
class TowerShape:
    """What a vision tower's config says about its ViT (read without loading weights)."""

    patch_size: int
    layers: int
    width: int
    #: the training input size ``(height, width)``
    image_size: tuple[int, int]


def tower_shape(model_cfg: dict[str, Any], label: str) -> TowerShape:
    """The ViT shape of ``model_cfg``'s vision tower; a :class:`ModelLoadError` for towers
    that are not open_clip's own ``VisionTransformer`` (timm, ResNet) or non-square patches."""
    vision = model_cfg.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        raise ModelLoadError(
            f"{label} has a timm vision tower ({vision['timm_model_name']}); "
            f"the openclip extractor supports open_clip's own VisionTransformer towers"
        )
    layers = vision.get("layers", 12)
    if not isinstance(layers, int):
        raise ModelLoadError(
            f"{label} has a ResNet vision tower (layers {layers}): it has no patch tokens"
        )
    patch = vision.get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ModelLoadError(f"non-square patches {patch} are not supported")
        patch = patch[0]
    size = vision.get("image_size", 224)
    h, w = (size[0], size[1]) if isinstance(size, (list, tuple)) else (size, size)
    return TowerShape(int(patch), int(layers), int(vision.get("width", 768)), (int(h), int(w)))


# -- building --------------------------------------------------------------------------------------


def create_vision_tower(
    source: OpenClipSource,
    label: str,
    image_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """The vision tower of ``source`` created at ``image_size`` ``(height, width)`` (open_clip
    resamples the position embeddings), frozen on ``device`` in ``dtype``, with the mean and
    std of the model's preprocess config. The text tower is dropped."""
    oc = import_open_clip()
    try:
        clip = oc.create_model(
            source.create_name,
            pretrained=source.pretrained,
            device="cpu",
            force_image_size=image_size,
            force_quick_gelu=source.quick_gelu,
            require_pretrained=True,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot create the open_clip model {label}: {type(exc).__name__}: {exc}"
        ) from None
    from open_clip.transformer import VisionTransformer

    visual = clip.visual
    if not isinstance(visual, VisionTransformer):
        raise ModelLoadError(
            f"{label}'s vision tower is a {type(visual).__name__}; the openclip "
            f"extractor supports open_clip's own VisionTransformer towers"
        )
    pp = oc.get_model_preprocess_cfg(clip)
    mean, std = tuple(pp["mean"]), tuple(pp["std"])
    del clip  # the text tower is not needed
    return visual.to(device, dtype).eval().requires_grad_(False), mean, std


class OpenClipTower:
    """A CLIP vision tower at its own training input size, giving pooled, projected image
    embeddings (the tower's full forward), resolved on first use and loaded on first
    :attr:`model`; float32.

    What a component needs to embed whole images with CLIP, as ODISE's implicit
    captioner does; the ``openclip`` extractor is the one for patch-token features.
    """

    def __init__(self, model: str, pretrained: str, device: str = "auto") -> None:
        if model in (HF_HUB, LOCAL_DIR, ""):
            raise ConfigError(f"CLIP tower model {model!r} names no model")
        self.model_name = model
        self.pretrained = pretrained
        self.device = pick_device(device)
        self.dtype = torch.float32
        self._source: OpenClipSource | None = None
        self._model: nn.Module | None = None
        self._mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def source(self) -> OpenClipSource:
        """The resolved config and weight files (no weights loaded)."""
        if self._source is None:
            self._source = resolve_source(self.model_name, self.pretrained)
        return self._source

    @property
    def shape(self) -> TowerShape:
        """The tower's ViT shape, from its config."""
        return tower_shape(self.source.model_cfg, self.model_name)

    @property
    def size(self) -> int:
        """The side of the square input the tower runs at (its training size)."""
        return self.shape.image_size[0]

    @property
    def embed_dim(self) -> int:
        """The width of the pooled, projected embedding."""
        return int(self.source.model_cfg.get("embed_dim", 0))

    def model_identity(self) -> dict[str, Any]:
        """The identity the ``openclip`` extractor gives the same model and weights."""
        return source_identity(self.source, self.model_name, self.pretrained, "")

    @property
    def model(self) -> nn.Module:
        """The loaded vision tower, frozen, on :attr:`device`."""
        if self._model is None:
            shape = self.shape  # config checks before the (slow) weight loading
            size = self.size
            if size % shape.patch_size:
                raise ModelLoadError(
                    f"{self.model_name}: input size {size} is not a multiple of the patch "
                    f"size {shape.patch_size}"
                )
            self._model, mean, std = create_vision_tower(
                self.source, self.model_name, (size, size), self.device, self.dtype
            )
            self._mean_std = (mean, std)
        return self._model

    def normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        """The mean and std of the model's preprocess config."""
        if self._mean_std is None:
            _ = self.model
        assert self._mean_std is not None
        return self._mean_std
