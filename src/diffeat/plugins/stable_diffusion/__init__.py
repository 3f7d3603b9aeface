"""The ``stable-diffusion`` extractor plugin, with the ``diffeat generate`` command."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffeat.core.hookspecs import Register, hookimpl
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor

if TYPE_CHECKING:
    import click


@hookimpl
def register_extractors(register: Register) -> None:
    register("stable-diffusion", StableDiffusionExtractor)


@hookimpl
def register_commands(cli: click.Group) -> None:
    from diffeat.plugins.stable_diffusion.commands import add_commands

    add_commands(cli)
