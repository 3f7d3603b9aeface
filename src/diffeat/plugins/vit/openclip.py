"""The ``openclip`` extractor: patch tokens of an OpenCLIP vision tower (open_clip_torch).

Models: a built-in architecture name with a pretrained tag or a checkpoint file
(``ViT-H-14`` + ``laion2b_s32b_b79k``), a JSON model config file (registered
with ``open_clip.add_model_config``) with a checkpoint file, an
``hf-hub:org/repo`` id, or a folder holding ``open_clip_config.json`` and the
weights (open_clip's ``local-dir:``). The model is built by open_clip's own
``create_model``; only the vision tower is kept. A pretrained tag trained with
QuickGELU on an architecture whose config says GELU (the ``openai`` tags) gets
``force_quick_gelu``, which open_clip itself only warns about; with a checkpoint
file instead of the tag, name the ``-quickgelu`` architecture
(``ViT-L-14-336-quickgelu``).

Input sizes other than the training size: the tower is created at
``image_size`` (``force_image_size``) and open_clip resamples the checkpoint's
position embeddings bicubically while loading it (its ``resize_pos_embed``,
``antialias=True``, which only matters when shrinking).

Facets: ``token`` (block output; ``final_norm`` applies ``ln_post``), ``key``,
``query``, ``value``: the block's attention input projected with the matching
third of the fused ``in_proj_weight`` / ``in_proj_bias`` (``nn.MultiheadAttention``
or open_clip's ``Attention``), heads concatenated (``C`` = width). Only towers of
open_clip's own ``VisionTransformer`` are supported (not timm or ResNet towers).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffeat.core.errors import ConfigError, ModelLoadError
from diffeat.core.options import opt
from diffeat.plugins.modelfiles import files_fingerprint, hub_snapshot, is_hub_id
from diffeat.plugins.module_capture import HookTarget, first_tensor
from diffeat.plugins.vit.common import (
    DType,
    Facet,
    ModelSpec,
    Resample,
    SizeRule,
    ViTExtractorBase,
    batch_size_field,
    blocks_field,
    device_field,
    dtype_field,
    facet_field,
    image_size_field,
    layer_name,
    resample_field,
    size_rule_field,
    stop_early_field,
    validate_common,
)

INSTALL_HINT = 'pip install "diffeat[openclip]"'
HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
_CONFIG_FILE = "open_clip_config.json"
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
_QKV = {"query": 0, "key": 1, "value": 2}


def import_open_clip() -> Any:
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
class OpenClipOptions:
    """Options of the ``openclip`` extractor (defaults: ViT-H-14 laion2b_s32b_b79k, 224 x 224)."""

    model: str = opt(
        "ViT-H-14",
        "an open_clip architecture name (ViT-H-14, ViT-B-16, ...), a JSON model config file "
        "(registered with open_clip.add_model_config), hf-hub:org/repo, or a folder with "
        "open_clip_config.json and the weights",
    )
    pretrained: str = opt(
        "laion2b_s32b_b79k",
        "weights of an architecture name or JSON config: an open_clip pretrained tag or a "
        "checkpoint file (.safetensors; .pt/.bin are read with weights_only=True); ignored "
        "for hf-hub: and folder models",
    )
    revision: str = opt("", "hub revision of an hf-hub: model; empty: the default branch")
    blocks: list[int] = blocks_field([-1])
    facet: Facet = facet_field()
    final_norm: bool = opt(
        False, "apply the tower's ln_post to the token features; facet token only"
    )
    image_size: list[int] = image_size_field(
        [224, 224], "bicubic with antialias, by open_clip when loading"
    )
    size_rule: SizeRule = size_rule_field()
    resample: Resample = resample_field()
    dtype: DType = dtype_field()
    device: str = device_field()
    batch_size: int = batch_size_field()
    stop_early: bool = stop_early_field()

    def validate(self) -> None:
        validate_common(self)
        if self.model in (HF_HUB, LOCAL_DIR, ""):
            raise ValueError(f"model: {self.model!r} names no model")


@dataclass
class _Source:
    """Where the model comes from: what ``create_model`` gets and which files identify it."""

    create_name: str
    pretrained: str | None
    model_cfg: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    root: Path | None = None
    #: the pretrained tag was trained with QuickGELU but the architecture config says GELU
    quick_gelu: bool = False


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


class OpenClipExtractor(ViTExtractorBase):
    """Patch tokens (or q/k/v projections) of chosen blocks of an OpenCLIP vision tower."""

    Options = OpenClipOptions

    def __init__(self, options: OpenClipOptions | None = None) -> None:
        super().__init__(options)
        self._source: _Source | None = None
        self._mean_std: tuple[Sequence[float], Sequence[float]] | None = None

    # -- resolution ------------------------------------------------------------------------------

    @property
    def source(self) -> _Source:
        if self._source is None:
            self._source = self._resolve()
        return self._source

    def _resolve(self) -> _Source:
        oc = import_open_clip()
        model = self.options.model
        if model.startswith(HF_HUB):
            repo = model[len(HF_HUB) :]
            folder = hub_snapshot(
                repo,
                self.options.revision,
                [[_CONFIG_FILE, *_SAFE_WEIGHTS], [_CONFIG_FILE, *_PICKLE_WEIGHTS]],
                _SAFE_WEIGHTS + _PICKLE_WEIGHTS,
            )
            return self._folder_source(folder)
        raw = model[len(LOCAL_DIR) :] if model.startswith(LOCAL_DIR) else model
        path = Path(raw).expanduser()
        if path.is_dir():
            return self._folder_source(path)
        if model.startswith(LOCAL_DIR):
            raise ModelLoadError(f"folder {path} does not exist")
        if model.endswith(".json"):
            name = self._register_config(path)
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
                f"or a folder with {_CONFIG_FILE}"
            )
        return self._named_source(oc, name, cfg)

    def _register_config(self, path: Path) -> str:
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

    def _named_source(self, oc: Any, name: str, cfg: dict[str, Any]) -> _Source:
        pretrained = self.options.pretrained
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
            return _Source(name, pretrained, cfg, [Path(checkpoint)], quick_gelu=quick)
        path = Path(pretrained).expanduser()
        if path.is_file():
            return _Source(name, str(path), cfg, [path])
        raise ConfigError(
            f"[extractor] pretrained: {pretrained!r} is neither a pretrained tag of {name} "
            f"({', '.join(tags) or 'none known'}) nor a checkpoint file"
        )

    def _folder_source(self, folder: Path) -> _Source:
        oc = import_open_clip()
        if getattr(getattr(oc, "factory", None), "LOCAL_DIR_PREFIX", None) is None:
            raise ModelLoadError(
                "this open_clip_torch cannot load folders (local-dir:); upgrade it "
                f"({INSTALL_HINT} --upgrade) or pass an architecture name and a checkpoint file"
            )
        config = folder / _CONFIG_FILE
        try:
            model_cfg = json.loads(config.read_text())["model_cfg"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"{folder} is not an open_clip model folder: {_CONFIG_FILE} with a model_cfg "
                f"is missing or unreadable ({type(exc).__name__}: {exc})"
            ) from None
        checkpoint = _checkpoint_in_dir(folder)
        if checkpoint is None:
            raise ModelLoadError(
                f"{folder} has no weights (open_clip_model.safetensors or "
                f"open_clip_pytorch_model.bin)"
            )
        return _Source(LOCAL_DIR + str(folder), None, model_cfg, [config, checkpoint], folder)

    # -- identity and spec -------------------------------------------------------------------------

    def model_identity(self) -> dict[str, Any]:
        src = self.source
        cfg = json.dumps(src.model_cfg, sort_keys=True).encode()
        return {
            "model": self.options.model,
            "pretrained": self.options.pretrained if src.pretrained is not None else "",
            "revision": self.options.revision if self.options.model.startswith(HF_HUB) else "",
            "config": hashlib.sha256(cfg).hexdigest()[:16],
            "fingerprint": files_fingerprint(src.files, src.root),
            **({"quick_gelu": True} if src.quick_gelu else {}),
        }

    def read_spec(self) -> ModelSpec:
        vision = self.source.model_cfg.get("vision_cfg", {})
        if vision.get("timm_model_name"):
            raise ModelLoadError(
                f"{self.options.model} has a timm vision tower ({vision['timm_model_name']}); "
                f"the openclip extractor supports open_clip's own VisionTransformer towers"
            )
        layers = vision.get("layers", 12)
        if not isinstance(layers, int):
            raise ModelLoadError(
                f"{self.options.model} has a ResNet vision tower (layers {layers}): it has no "
                f"patch tokens"
            )
        patch = vision.get("patch_size", 16)
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ModelLoadError(f"non-square patches {patch} are not supported")
            patch = patch[0]
        width = int(vision.get("width", 768))
        return ModelSpec(
            patch_size=int(patch),
            num_blocks=int(layers),
            width=width,
            attn_width=width,
            prefix_tokens=1,
        )

    # -- loading ---------------------------------------------------------------------------------

    def load_model(self) -> nn.Module:
        oc = import_open_clip()
        src = self.source
        w, h = self.model_size
        try:
            clip = oc.create_model(
                src.create_name,
                pretrained=src.pretrained,
                device="cpu",
                force_image_size=(h, w),
                force_quick_gelu=src.quick_gelu,
                require_pretrained=True,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"cannot create the open_clip model {self.options.model}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        from open_clip.transformer import VisionTransformer

        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ModelLoadError(
                f"{self.options.model}'s vision tower is a {type(visual).__name__}; the openclip "
                f"extractor supports open_clip's own VisionTransformer towers"
            )
        pp = oc.get_model_preprocess_cfg(clip)
        self._mean_std = (tuple(pp["mean"]), tuple(pp["std"]))
        del clip  # the text tower is not needed
        return visual.to(self.device, self.dtype).eval().requires_grad_(False)

    def normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        """The mean and std of the model's preprocess config (pretrained tag or folder config)."""
        if self._mean_std is None:
            _ = self.model
        assert self._mean_std is not None
        return self._mean_std

    # -- hooks -----------------------------------------------------------------------------------

    def hook_targets(self, model: nn.Module, blocks: list[int], facet: str) -> list[HookTarget]:
        transformer = model.transformer
        batch_first = getattr(transformer, "batch_first", False)
        targets = []
        for b in blocks:
            block = transformer.resblocks[b]
            name = layer_name(b, facet)
            if facet == "token":

                def read_out(out: Any, bf: bool = batch_first) -> torch.Tensor:
                    t = first_tensor(out)
                    return t if bf else t.transpose(0, 1)

                targets.append(HookTarget(name, block, "output", read_out))
            else:

                def read_in(args: Any, attn: nn.Module = block.attn, which: int = _QKV[facet]):
                    x = args[0]
                    if not getattr(attn, "batch_first", True):
                        x = x.transpose(0, 1)
                    return project(attn, x, which)

                targets.append(HookTarget(name, block.attn, "input", read_in))
        return targets

    def final_norm(self, model: nn.Module) -> nn.Module:
        norm = model.ln_post
        shape = getattr(norm, "normalized_shape", (self.spec.width,))
        if tuple(shape) != (self.spec.width,):
            raise ConfigError(
                f"final_norm: {self.options.model}'s ln_post normalises pooled outputs "
                f"{tuple(shape)}, not the {self.spec.width}-channel tokens"
            )
        return norm

    def forward(self, model: nn.Module, pixels: torch.Tensor) -> Any:
        return model(pixels)


def project(attn: nn.Module, x: torch.Tensor, which: int) -> torch.Tensor:
    """Query (0), key (1) or value (2) projection of ``x`` ``[B, N, C]`` with a fused in_proj."""
    weight = getattr(attn, "in_proj_weight", None)
    bias = getattr(attn, "in_proj_bias", None)
    if weight is not None:
        d = weight.shape[0] // 3
        w = weight[which * d : (which + 1) * d]
    else:  # nn.MultiheadAttention with separate projection weights
        w = getattr(attn, ("q_proj_weight", "k_proj_weight", "v_proj_weight")[which])
        d = w.shape[0]
    b = bias[which * d : (which + 1) * d] if bias is not None else None
    return F.linear(x, w, b)
