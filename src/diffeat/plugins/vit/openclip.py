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
imported only when a model is resolved. Resolving, identifying and building the
tower live in :mod:`diffeat.plugins.openclip_models`, shared with the Stable
Diffusion extractor's implicit captioner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffeat.core.errors import ConfigError
from diffeat.core.options import opt
from diffeat.plugins.module_capture import HookTarget, first_tensor
from diffeat.plugins.openclip_models import (
    HF_HUB,
    LOCAL_DIR,
    OpenClipSource,
    create_vision_tower,
    resolve_source,
    source_identity,
    tower_shape,
)
from diffeat.plugins.vit.common import (
    DType,
    Facet,
    ModelSpec,
    Resample,
    SizeRule,
    ViTExtractorBase,
    batch_size_field,
    blocks_field,
    compile_field,
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

__all__ = [
    "HF_HUB",
    "LOCAL_DIR",
    "OpenClipExtractor",
    "OpenClipOptions",
    "project",
]

_QKV = {"query": 0, "key": 1, "value": 2}


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
    compile: bool = compile_field()

    def validate(self) -> None:
        validate_common(self)
        if self.model in (HF_HUB, LOCAL_DIR, ""):
            raise ValueError(f"model: {self.model!r} names no model")


class OpenClipExtractor(ViTExtractorBase):
    """Patch tokens (or q/k/v projections) of chosen blocks of an OpenCLIP vision tower."""

    Options = OpenClipOptions

    def __init__(self, options: OpenClipOptions | None = None) -> None:
        super().__init__(options)
        self._source: OpenClipSource | None = None
        self._mean_std: tuple[Sequence[float], Sequence[float]] | None = None

    # -- resolution ------------------------------------------------------------------------------

    @property
    def source(self) -> OpenClipSource:
        """The resolved config and weight files (:func:`resolve_source`; no weights loaded)."""
        if self._source is None:
            o = self.options
            self._source = resolve_source(o.model, o.pretrained, o.revision)
        return self._source

    # -- identity and spec -------------------------------------------------------------------------

    def model_identity(self) -> dict[str, Any]:
        o = self.options
        return source_identity(self.source, o.model, o.pretrained, o.revision)

    def read_spec(self) -> ModelSpec:
        shape = tower_shape(self.source.model_cfg, self.options.model)
        return ModelSpec(
            patch_size=shape.patch_size,
            num_blocks=shape.layers,
            width=shape.width,
            attn_width=shape.width,
            prefix_tokens=1,
        )

    # -- loading ---------------------------------------------------------------------------------

    def load_model(self) -> nn.Module:
        w, h = self.model_size
        visual, mean, std = create_vision_tower(
            self.source, self.options.model, (h, w), self.device, self.dtype
        )
        self._mean_std = (mean, std)
        return visual

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
