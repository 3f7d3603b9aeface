"""The public API for plugin commands: what a ``register_commands`` hook may import.

A plugin adds click commands to the ``diffeat`` group in its
``register_commands(cli)`` hook. Commands built from these helpers look, read
their options and fail like the built-in ones; everything else in
:mod:`diffeat.cli` is internal and may change.

Output
    :func:`emit_json` prints a ``--json`` report; :func:`progress_bar` is the
    progress bar on stderr; :func:`is_quiet` says whether ``--quiet`` (given
    before the command's name or after it) asked for neither bars nor
    progress lines. Every command gets ``--quiet`` and ``-v/--verbose`` from
    ``diffeat`` itself: do not declare them.
Options and the pipeline
    :func:`config_options` adds ``--set``, ``--model`` and ``--device``;
    :func:`collect_overrides` turns them into overrides (``--model`` and ``--device``
    go to every stage that takes them: the extractor, and a matcher that owns its model);
    :func:`store_option` adds ``--store``, ``--no-store`` and ``--store-dtype`` (the
    command receives ``store_path``: ``--store``, else ``$DIFFEAT_STORE``, else ``None``;
    the storage dtype goes to :func:`open_pipeline` on its own);
    :func:`open_pipeline` builds the
    pipeline of a config file in front of that store. :func:`parse_point`
    reads a ``--point X,Y``.
Command groups
    :func:`command_group` returns a subgroup of ``diffeat`` (``plot``, say),
    creating it if no plugin did, so several plugins can add to one group.
Errors
    Raise :class:`DiffeatError` (or a subclass such as :class:`ConfigError`)
    for a problem the user can fix: ``diffeat`` prints ``error: <message>``
    without a traceback and exits with status 2. Any other exception is
    printed with its traceback as an internal error (exit 1).

Start-up: ``register_commands`` runs whenever ``diffeat`` lists its commands
(``diffeat --help``) or looks for one that is not built in, without the rest
of the registry; so the plugin's top module and its command module should
import only click, this module and :mod:`diffeat.core.hookspecs` at their top,
and import torch, diffusers and the plugin's own heavy modules inside the hook
or command functions.
"""

from __future__ import annotations

from diffeat.cli.common import (
    collect_overrides,
    command_group,
    config_options,
    emit_json,
    is_quiet,
    open_pipeline,
    parse_point,
    progress_bar,
    store_option,
)
from diffeat.core.errors import ConfigError, DiffeatError

__all__ = [
    "ConfigError",
    "DiffeatError",
    "collect_overrides",
    "command_group",
    "config_options",
    "emit_json",
    "is_quiet",
    "open_pipeline",
    "parse_point",
    "progress_bar",
    "store_option",
]
