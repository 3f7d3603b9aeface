"""The ``adm`` extractor plugin (DIFT on guided-diffusion's ADM UNet, DIFT_adm), with the
``diffeat convert adm`` command that turns the official state dict into a diffusers folder.

Start-up: this module imports no torch or diffusers; the extractor is imported when the
plugin manager asks for it (``register_extractors``) and the command module when ``diffeat``
lists or runs commands (``register_commands``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffeat.core.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    import click


@hookimpl
def register_extractors(register: Register) -> None:
    from diffeat.plugins.adm.extractor import AdmExtractor

    register("adm", AdmExtractor)


@hookimpl
def register_commands(cli: click.Group) -> None:
    from diffeat.plugins.adm.commands import add_commands

    add_commands(cli)
