"""The plugin API: pluggy hook specifications.

A plugin is a module or object with functions decorated by :data:`hookimpl`.
Each ``register_*`` hook receives a ``register(name, factory)`` callable; the
core owns name collisions and records which plugin supplied what. Built-in
plugins use exactly these hooks.

Example::

    from diffeat import hookimpl

    @hookimpl
    def register_matchers(register):
        register("my-matcher", MyMatcher)

A factory is a class (or callable) taking one argument, its validated options
(an instance of ``factory.Options``, a dataclass) and returning the component.
See ``docs/writing-a-plugin.md`` for the component protocols.

Implementations are called with the arguments they declare, by name (as pluggy
itself calls them): an implementation may declare fewer arguments than its
specification, so a hook that gains an argument later keeps working with
plugins written before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

PROJECT = "diffeat"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Any], None]


@hookspec
def register_extractors(register: Register) -> None:
    """Register feature extractors: ``register(name, factory)``."""


@hookspec
def register_aggregators(register: Register) -> None:
    """Register aggregators (per-layer, per-timestep maps -> one descriptor map)."""


@hookspec
def register_matchers(register: Register) -> None:
    """Register matchers (source view, target view, points -> target points, scores)."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets (image pairs with keypoints in one schema)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands to the ``diffeat`` command group ``cli``.

    Called when the CLI starts, for every command: import heavy modules (torch,
    diffusers) inside the command functions, not here. :mod:`diffeat.cli.api`
    holds the helpers plugin commands share with the built-in ones.
    """
