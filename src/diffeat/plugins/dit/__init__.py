"""The ``diffusion-transformer`` extractor plugin: SD3 / SD3.5 (MMDiT), FLUX and PixArt.

Start-up: this module imports no torch or diffusers; the extractor is imported
when the plugin manager asks for it (``register_extractors``).
"""

from __future__ import annotations

from diffeat.core.hookspecs import Register, hookimpl


@hookimpl
def register_extractors(register: Register) -> None:
    from diffeat.plugins.dit.extractor import DiffusionTransformerExtractor

    register("diffusion-transformer", DiffusionTransformerExtractor)
