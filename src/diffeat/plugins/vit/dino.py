"""The ``dino`` extractor: DINO (v1) ViTs in transformers format (``ViTModel``).

Checkpoints: ``facebook/dino-vits8``, ``-vits16``, ``-vitb8``, ``-vitb16`` (or a
folder written by ``save_pretrained``). Facets: ``token`` (block output),
``key``, ``query``, ``value`` (the outputs of the block's separate q/k/v
``nn.Linear`` projections, heads concatenated: ``C`` = hidden size). For input
sizes other than 224 the position embeddings are interpolated bicubically, by
default as the DINO repository does (``position_interpolation``, see
:func:`diffeat.plugins.vit.hf.official_position_interpolation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from diffeat.core.options import opt
from diffeat.plugins.vit.common import (
    DType,
    Facet,
    PositionInterpolation,
    Resample,
    SizeRule,
    batch_size_field,
    blocks_field,
    compile_field,
    device_field,
    dtype_field,
    facet_field,
    final_norm_field,
    image_size_field,
    position_interpolation_field,
    resample_field,
    revision_field,
    size_rule_field,
    stop_early_field,
    stride_field,
    validate_common,
)
from diffeat.plugins.vit.hf import TransformersViTExtractor


@dataclass
class DinoOptions:
    """Options of the ``dino`` extractor (defaults: ViT-B/8, last block, 224 x 224)."""

    model: str = opt(
        "facebook/dino-vitb8",
        "hub id or local folder of a DINO ViT in transformers format (facebook/dino-vits8, "
        "-vits16, -vitb8, -vitb16)",
    )
    revision: str = revision_field()
    blocks: list[int] = blocks_field([-1])
    facet: Facet = facet_field()
    final_norm: bool = final_norm_field()
    image_size: list[int] = image_size_field([224, 224])
    position_interpolation: PositionInterpolation = position_interpolation_field()
    stride: int = stride_field()
    size_rule: SizeRule = size_rule_field()
    resample: Resample = resample_field()
    dtype: DType = dtype_field()
    device: str = device_field()
    batch_size: int = batch_size_field()
    stop_early: bool = stop_early_field()
    compile: bool = compile_field()

    def validate(self) -> None:
        validate_common(self)


class DinoExtractor(TransformersViTExtractor):
    """Patch tokens (or q/k/v projections) of chosen blocks of a DINO ViT."""

    Options = DinoOptions
    model_types = ("vit",)
    other_plugins: ClassVar[dict[str, str]] = {
        "dinov2": "dinov2",
        "dinov2_with_registers": "dinov2",
    }

    def model_class(self) -> tuple[Any, dict[str, Any]]:
        from transformers import ViTModel

        return ViTModel, {"add_pooling_layer": False}

    def forward(self, model: nn.Module, pixels: torch.Tensor) -> Any:
        return model(pixel_values=pixels, interpolate_pos_encoding=True)
