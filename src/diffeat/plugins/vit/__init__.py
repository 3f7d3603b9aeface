"""ViT extractor plugins for the baselines: ``dino``, ``dinov2`` and ``openclip``.

Facets per model (``facet`` option; see :mod:`diffeat.plugins.vit.common`):

| extractor | models | token | key / query / value |
|---|---|---|---|
| ``dino`` | transformers ``ViTModel`` (facebook/dino-*) | block output | separate q/k/v projections |
| ``dinov2`` | ``Dinov2Model``, ``Dinov2WithRegistersModel`` | block output | separate q/k/v projections |
| ``openclip`` | open_clip ``VisionTransformer`` towers | block output | thirds of the fused in_proj |

open_clip_torch is optional: this module imports without it.
"""

from __future__ import annotations

from diffeat.core.hookspecs import Register, hookimpl
from diffeat.plugins.vit.dino import DinoExtractor
from diffeat.plugins.vit.dinov2 import Dinov2Extractor
from diffeat.plugins.vit.openclip import OpenClipExtractor

__all__ = ["DinoExtractor", "Dinov2Extractor", "OpenClipExtractor"]


@hookimpl
def register_extractors(register: Register) -> None:
    register("dino", DinoExtractor)
    register("dinov2", Dinov2Extractor)
    register("openclip", OpenClipExtractor)
