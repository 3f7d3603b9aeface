"""The ``dinov2`` extractor: DINOv2 ViTs in transformers format.

``Dinov2Model`` (``facebook/dinov2-small``, ``-base``, ``-large``, ``-giant``)
or ``Dinov2WithRegistersModel`` (``facebook/dinov2-with-registers-*``), chosen
by the config's ``model_type``; the CLS token and the register tokens are
dropped. Facets: ``token`` (block output, before the final LayerNorm unless
``final_norm``), ``key``, ``query``, ``value`` (the outputs of the block's
separate q/k/v ``nn.Linear`` projections, heads concatenated). Position
embeddings are interpolated bicubically for other input sizes, by default as
the DINOv2 repository (torch.hub) does (``position_interpolation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
class Dinov2Options:
    """Options of the ``dinov2`` extractor (defaults: ViT-B/14, last block, 518 x 518)."""

    model: str = opt(
        "facebook/dinov2-base",
        "hub id or local folder of a DINOv2 model in transformers format "
        "(facebook/dinov2-{small,base,large,giant}, facebook/dinov2-with-registers-*)",
    )
    revision: str = revision_field()
    blocks: list[int] = blocks_field([-1])
    facet: Facet = facet_field()
    final_norm: bool = final_norm_field()
    image_size: list[int] = image_size_field([518, 518])
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


class Dinov2Extractor(TransformersViTExtractor):
    """Patch tokens (or q/k/v projections) of chosen blocks of a DINOv2 ViT."""

    Options = Dinov2Options
    model_types = ("dinov2", "dinov2_with_registers")
    other_plugins: ClassVar[dict[str, str]] = {"vit": "dino"}

    def model_class(self) -> tuple[Any, dict[str, Any]]:
        if self.config["model_type"] == "dinov2_with_registers":
            from transformers import Dinov2WithRegistersModel

            return Dinov2WithRegistersModel, {}
        from transformers import Dinov2Model

        return Dinov2Model, {}
