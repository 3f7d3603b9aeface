"""The ``stable-diffusion`` extractor plugin."""

from __future__ import annotations

from diffeat.core.hookspecs import Register, hookimpl
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor


@hookimpl
def register_extractors(register: Register) -> None:
    register("stable-diffusion", StableDiffusionExtractor)
