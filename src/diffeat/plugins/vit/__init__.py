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

from importlib import import_module
from typing import TYPE_CHECKING

from diffeat.core.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from diffeat.plugins.vit.dino import DinoExtractor
    from diffeat.plugins.vit.dinov2 import Dinov2Extractor
    from diffeat.plugins.vit.openclip import OpenClipExtractor

# Imported on first use (they need torch), so listing commands stays fast.
_EXPORTS = {"DinoExtractor": "dino", "Dinov2Extractor": "dinov2", "OpenClipExtractor": "openclip"}

__all__ = ["DinoExtractor", "Dinov2Extractor", "OpenClipExtractor"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


@hookimpl
def register_extractors(register: Register) -> None:
    from diffeat.plugins.vit.dino import DinoExtractor
    from diffeat.plugins.vit.dinov2 import Dinov2Extractor
    from diffeat.plugins.vit.openclip import OpenClipExtractor

    register("dino", DinoExtractor)
    register("dinov2", Dinov2Extractor)
    register("openclip", OpenClipExtractor)
