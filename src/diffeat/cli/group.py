"""The root ``diffeat`` group: commands loaded on demand, and the options every command takes.

Start-up is kept short by importing nothing heavy until a command runs:

- the built-in command modules (``diffeat.cli.extract``, ...) are imported when
  their command is asked for (``diffeat extract ...``) or listed (``--help``);
  they import only click and light diffeat modules at their top;
- plugin commands are found without loading the plugin registry: each enabled
  plugin module is imported and only its ``register_commands`` hook is called
  (the registry, which imports every extractor and so torch, loads when a
  command builds a pipeline). Built-in plugin packages import their heavy
  modules inside their hooks; a single-module built-in plugin brings no
  commands (``tests/test_cli_conventions.py`` holds both to that).

Every command, built-in or from a plugin, also accepts ``--quiet`` and
``-v/--verbose`` after its name (:func:`add_conventions`), the same switches as
before it (``diffeat --quiet extract ...`` = ``diffeat extract ... --quiet``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from diffeat.core.progress import QUIET_ENV

log = logging.getLogger("diffeat.cli")

# Command name -> the built-in module whose ``add_to(cli)`` adds it.
BUILTIN_COMMANDS = {
    "plugins": "diffeat.cli.info",
    "plugin": "diffeat.cli.plugin_new",
    "layers": "diffeat.cli.info",
    "config": "diffeat.cli.info",
    "extract": "diffeat.cli.extract",
    "match": "diffeat.cli.match",
    "store": "diffeat.cli.store",
    "eval": "diffeat.cli.evaluate",
    "datasets": "diffeat.cli.evaluate",
    "train": "diffeat.cli.train",
    "plot": "diffeat.cli.plot_features",
    "quickstart": "diffeat.cli.quickstart",
    "propagate": "diffeat.cli.propagate",
}

_LOG_HANDLER_NAME = "diffeat-cli"


def set_verbosity(level: int) -> None:
    """``-v``: diffeat's log messages at INFO on stderr; ``-vv``: DEBUG, every library's too."""
    if level <= 0:
        return
    root = logging.getLogger()
    if not any(h.get_name() == _LOG_HANDLER_NAME for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_LOG_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("diffeat").setLevel(logging.INFO if level == 1 else logging.DEBUG)
    if level >= 2:
        root.setLevel(logging.DEBUG)


def _root_obj(ctx: click.Context) -> dict[str, Any]:
    root = ctx.find_root()
    obj: dict[str, Any] = root.ensure_object(dict)
    return obj


def quiet_callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _root_obj(ctx)["quiet"] = True
        os.environ[QUIET_ENV] = "1"  # read by library progress bars (diffeat.core.progress)


def verbose_callback(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    if value:
        obj = _root_obj(ctx)
        obj["verbose"] = obj.get("verbose", 0) + value
        set_verbosity(obj["verbose"])


def _taken(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def quiet_param(command: click.Command) -> click.Option | None:
    """The ``--quiet/-q`` option for ``command`` (``None`` if it has one already)."""
    taken = _taken(command)
    if "--quiet" in taken:
        return None
    names = ["--quiet"] + ([] if "-q" in taken else ["-q"])
    return click.Option(
        names,
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=quiet_callback,
        help="No progress bars or progress lines (same as `diffeat --quiet`).",
    )


def verbose_param(command: click.Command) -> click.Option | None:
    """The ``--verbose/-v`` option for ``command`` (``None`` if it has one already)."""
    taken = _taken(command)
    if "--verbose" in taken:
        return None
    names = ["--verbose"] + ([] if "-v" in taken else ["-v"])
    return click.Option(
        names,
        count=True,
        expose_value=False,
        is_eager=True,
        callback=verbose_callback,
        help="Log what happens on stderr (-vv: debug, every library).",
    )


def add_conventions(command: click.Command) -> None:
    """Give ``command`` (and every command of a group) ``--quiet`` and ``-v/--verbose``."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_conventions(sub)
        return
    for make in (quiet_param, verbose_param):
        param = make(command)
        if param is not None:
            command.params.append(param)


def _env_names(var: str) -> set[str] | None:
    """The names in a comma-separated plugin variable (as the plugin registry reads them)."""
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip() and p.strip() != "none"}


def discover_plugin_commands(cli: click.Group) -> None:
    """Add the commands of every enabled plugin to ``cli`` without loading the registry.

    Honours ``DIFFEAT_PLUGINS`` and ``DIFFEAT_DISABLE_PLUGINS`` as the registry
    does. A plugin that fails to import or whose hook raises is skipped here;
    ``diffeat plugins`` reports why.
    """
    import importlib.util
    from importlib import metadata

    import pluggy

    from diffeat.core import hookspecs
    from diffeat.core.plugins import BUILTIN_MODULES, install_commands

    allow = _env_names("DIFFEAT_PLUGINS")
    deny = _env_names("DIFFEAT_DISABLE_PLUGINS") or set()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)

    def load(name: str, loader: Callable[[], object]) -> None:
        if name in deny or pm.get_plugin(name) is not None:
            return
        try:
            pm.register(loader(), name=name)
        except Exception as exc:  # a broken plugin must not break the others
            log.debug("plugin %s: not loaded for its commands: %s", name, exc)

    for name, module in BUILTIN_MODULES.items():
        spec = importlib.util.find_spec(module)
        if spec is None or spec.submodule_search_locations is None:
            continue  # a single-module built-in plugin brings no commands
        load(name, lambda m=module: importlib.import_module(m))
    for ep in metadata.entry_points(group=hookspecs.PROJECT):
        if allow is None or ep.name in allow:
            load(ep.name, ep.load)
    outcome = install_commands(cli, pm.hook.register_commands.get_hookimpls())
    for name, (error, _) in outcome.items():
        if error is not None:  # `diffeat plugins` shows it; here the command is just left out
            log.warning("plugin %s: %s", name, error)


class DiffeatGroup(click.Group):
    """The root group: built-in command modules and plugin commands load on first need."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._builtins_loaded: set[str] = set()
        self.plugins_loaded = False

    def _load_builtin(self, module: str) -> None:
        if module in self._builtins_loaded:
            return
        self._builtins_loaded.add(module)
        importlib.import_module(module).add_to(self)

    def load_builtins(self) -> None:
        """Import every built-in command module."""
        for module in dict.fromkeys(BUILTIN_COMMANDS.values()):
            self._load_builtin(module)

    def load_plugins(self) -> None:
        """Add the plugins' commands (once)."""
        if not self.plugins_loaded:
            self.plugins_loaded = True
            discover_plugin_commands(self)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        add_conventions(cmd)
        super().add_command(cmd, name)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            if cmd_name in BUILTIN_COMMANDS:
                self._load_builtin(BUILTIN_COMMANDS[cmd_name])
                if isinstance(self.commands.get(cmd_name), click.Group):
                    self.load_plugins()  # plugins may add to a built-in group (``plot``)
            else:
                self.load_builtins()
                self.load_plugins()
        command = self.commands.get(cmd_name)
        if command is not None:
            add_conventions(command)  # a plugin may have added to a group since
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_builtins()
        self.load_plugins()
        return sorted(self.commands)
