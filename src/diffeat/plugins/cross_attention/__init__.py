"""The ``cross-attention`` matcher plugin: Hedlin et al.'s optimised-context correspondence
(Unsupervised Semantic Correspondence Using Stable Diffusion, NeurIPS 2023).

The matcher module (torch, diffusers) is imported inside the hook, so loading the
plugin to list commands stays fast. Its command: ``diffeat plot attention``.
"""

from __future__ import annotations

import click

from diffeat.core.hookspecs import Register, hookimpl


@hookimpl
def register_matchers(register: Register) -> None:
    from diffeat.plugins.cross_attention.matcher import CrossAttentionMatcher

    register("cross-attention", CrossAttentionMatcher)


@hookimpl
def register_commands(cli: click.Group) -> None:
    from diffeat.plugins.cross_attention.commands import add_commands

    add_commands(cli)
