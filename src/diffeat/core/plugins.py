"""The plugin manager: built-ins plus entry-point plugins, with broken plugins isolated.

Built-in plugins register through the same hooks as third-party ones. A plugin
that fails to import, implements a hook that does not exist (a misspelling),
or raises or registers something invalid while registering, is recorded with
its error and skipped; every other plugin keeps working.

Environment variables:

- ``DIFFEAT_PLUGINS``: comma-separated names of the only third-party plugins
  to load (``none`` loads none).
- ``DIFFEAT_DISABLE_PLUGINS``: comma-separated names of plugins (built-in or
  third-party) not to load.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from diffeat.core import hookspecs
from diffeat.core.errors import ConfigError, PluginError
from diffeat.core.version import __version__

if TYPE_CHECKING:
    import click

KINDS = ("extractor", "aggregator", "matcher", "dataset")
_HOOK_OF_KIND = {kind: f"register_{kind}s" for kind in KINDS}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

BUILTIN_MODULES = {
    "stable-diffusion": "diffeat.plugins.stable_diffusion",
    "diffusion-transformer": "diffeat.plugins.dit",
    "vit": "diffeat.plugins.vit",
    "adm": "diffeat.plugins.adm",
    "aggregators": "diffeat.plugins.aggregators",
    "fuse": "diffeat.plugins.fuse",
    "hyperfeatures": "diffeat.plugins.hyperfeatures",
    "matchers": "diffeat.plugins.matchers",
    "cross-attention": "diffeat.plugins.cross_attention",
    "datasets": "diffeat.plugins.datasets",
}


@dataclass(frozen=True)
class Registration:
    """One registered component: what kind, under which name, from which plugin."""

    kind: str
    name: str
    factory: Any
    plugin: str


@dataclass
class PluginRecord:
    """What ``diffeat plugins`` shows for one plugin."""

    name: str
    version: str
    origin: str  # "builtin" or "entry point (distribution)"
    error: str | None = None
    provides: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def _split_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip() and part.strip() != "none"}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _command_paths(group: click.Group, prefix: str = "") -> set[str]:
    """Every command under ``group`` that is not a group, as its path (``plot mixing-weights``)."""
    import click

    paths = set()
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            paths |= _command_paths(command, f"{path} ")
        else:
            paths.add(path)
    return paths


def _command_tree(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    """Every command and group under ``group`` by path (``plot``, ``plot mixing-weights``)."""
    import click

    tree: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        tree[path] = command
        if isinstance(command, click.Group):
            tree.update(_command_tree(command, f"{path} "))
    return tree


def _restore_commands(cli: click.Group, before: Mapping[str, click.Command]) -> None:
    """Put ``cli`` back as ``before`` recorded it: replaced or removed commands return, added
    ones go (parents first, so a replaced group brings its own subcommands back)."""
    import click

    def parent_of(path: str) -> click.Group | None:
        head, _, _ = path.rpartition(" ")
        parent = before.get(head) if head else cli
        return parent if isinstance(parent, click.Group) else None

    for path in sorted(before, key=lambda p: p.count(" ")):
        parent = parent_of(path)
        name = path.rpartition(" ")[2]
        if parent is not None and parent.commands.get(name) is not before[path]:
            parent.commands[name] = before[path]
    for path in sorted(set(_command_tree(cli)) - set(before), key=lambda p: -p.count(" ")):
        parent = parent_of(path)
        if parent is not None:
            parent.commands.pop(path.rpartition(" ")[2], None)


def call_hookimpl(impl: pluggy.HookImpl, provided: Mapping[str, object]) -> object:
    """Call one hook implementation with the arguments it declares, by name.

    ``provided`` holds every argument the hook's specification offers. An
    implementation may declare any subset of them (pluggy checks that when the
    plugin is registered), so a hook can gain an argument without breaking
    plugins written before it: they keep declaring, and receiving, the old ones.
    """
    return impl.function(**{name: provided[name] for name in impl.argnames})


class PluginManager:
    """Loads plugins and keeps the registry of extractors, aggregators, matchers, datasets."""

    def __init__(self, *, entry_points: bool = True, builtins: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.registry: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self._allow = _split_env("DIFFEAT_PLUGINS")
        self._deny = _split_env("DIFFEAT_DISABLE_PLUGINS") or set()
        if builtins:
            for name, module in BUILTIN_MODULES.items():
                self._load(
                    name, __version__, "builtin", lambda m=module: importlib.import_module(m)
                )
        if entry_points:
            for ep in metadata.entry_points(group=hookspecs.PROJECT):
                dist = ep.dist
                version = dist.version if dist is not None else "?"
                origin = f"entry point ({dist.name if dist is not None else ep.value})"
                if self._allow is not None and ep.name not in self._allow:
                    continue
                self._load(ep.name, version, origin, ep.load)

    # -- loading ---------------------------------------------------------------

    def _load(self, name: str, version: str, origin: str, load: Callable[[], Any]) -> None:
        if name in self._deny:
            return
        record = PluginRecord(name, version, origin)
        if name in self.records:
            record.error = (
                f"a plugin named {name!r} is already loaded ({self.records[name].origin})"
            )
            self.records[f"{name} ({origin})"] = record
            return
        self.records[name] = record
        try:
            plugin = load()
        except Exception as exc:  # a broken plugin must not break the others
            record.error = f"failed to import: {_describe(exc)}"
            return
        self.add_plugin(plugin, name, record=record)

    def add_plugin(
        self, plugin: Any, name: str, *, record: PluginRecord | None = None
    ) -> PluginRecord:
        """Register a plugin object (module or instance with hookimpls) under ``name``."""
        if record is None:
            record = PluginRecord(name, getattr(plugin, "__version__", __version__), "programmatic")
            self.records[name] = record
        unknown = self._unknown_hooks(plugin)
        if unknown:
            record.error = "; ".join(unknown)
            return record
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            record.error = f"invalid hook implementation: {_describe(exc)}"
            return record
        for kind in KINDS:
            self._run_register_hook(plugin, name, kind, record)
        if record.error is not None:
            self._drop(name)
        return record

    def _unknown_hooks(self, plugin: Any) -> list[str]:
        """Hook implementations that match no specification (what pluggy's check_pending finds)."""
        problems = []
        known = [n for n in dir(self._pm.hook) if n.startswith("register_")]
        for attr in dir(plugin):
            try:
                opts = self._pm.parse_hookimpl_opts(plugin, attr)
            except Exception:
                opts = None
            if opts is None:
                continue
            hook_name = opts.get("specname") or attr
            if hook_name not in known:
                close = difflib.get_close_matches(hook_name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown hook {hook_name!r}{hint}")
        return problems

    def _run_register_hook(self, plugin: Any, name: str, kind: str, record: PluginRecord) -> None:
        hook = getattr(self._pm.hook, _HOOK_OF_KIND[kind])
        staged: list[Registration] = []

        def register(comp_name: str, factory: Any) -> None:
            if not isinstance(comp_name, str) or not _NAME.match(comp_name):
                raise PluginError(
                    f"invalid {kind} name {comp_name!r}: use lowercase letters, digits, '-', '_', '.'"
                )
            if not callable(factory):
                raise PluginError(f"{kind} {comp_name!r}: factory {factory!r} is not callable")
            staged.append(Registration(kind, comp_name, factory, name))

        for impl in hook.get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                call_hookimpl(impl, {"register": register})
            except Exception as exc:
                record.error = f"{_HOOK_OF_KIND[kind]} raised {_describe(exc)}"
                return
        for reg in staged:
            existing = self.registry[kind].get(reg.name)
            if existing is not None:
                record.error = (
                    f"plugin {name!r} registers {kind} {reg.name!r}, which is already provided "
                    f"by plugin {existing.plugin!r}; the existing one is kept and {name!r} is "
                    f"not loaded. Rename its {kind}, or disable one of the two plugins with "
                    "DIFFEAT_DISABLE_PLUGINS"
                )
                continue
            self.registry[kind][reg.name] = reg
            record.provides.append(f"{kind}:{reg.name}")

    def _drop(self, name: str) -> None:
        for kind in KINDS:
            for comp, reg in list(self.registry[kind].items()):
                if reg.plugin == name:
                    del self.registry[kind][comp]
        plugin = self._pm.get_plugin(name)
        if plugin is not None:
            self._pm.unregister(plugin)
        self.records[name].provides.clear()

    # -- queries ---------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry[kind])

    def get(self, kind: str, name: str) -> Registration:
        """The registration of ``name``, or a :class:`ConfigError` listing what is installed."""
        try:
            return self.registry[kind][name]
        except KeyError:
            pass
        available = self.names(kind)
        close = difflib.get_close_matches(name, available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        broken = [r.name for r in self.records.values() if not r.ok]
        more = (
            f" Plugins that failed to load: {', '.join(broken)} (see `diffeat plugins`)."
            if broken
            else ""
        )
        raise ConfigError(
            f"unknown {kind} plugin {name!r}.{hint} Installed {kind}s: "
            f"{', '.join(available) or '(none)'}.{more}"
        )

    def add_commands(self, cli: click.Group) -> None:
        """Let every loaded plugin add click commands; a failing plugin is recorded, not fatal.

        A plugin may add commands and add to groups others made (``plot``), never replace or
        remove a command that is already there: one that does (a built-in's name, or an
        earlier plugin's) is recorded as broken with a message naming both, and the commands
        it touched are put back as they were (its own additions go too).
        """
        outcome = install_commands(cli, self._pm.hook.register_commands.get_hookimpls())
        for name, (error, added) in outcome.items():
            record = self.records.get(name)
            if record is None:
                continue
            if error is not None:
                record.error = error
            record.provides.extend(f"command:{path}" for path in added)

    def plugins(self) -> Iterable[PluginRecord]:
        return self.records.values()


def install_commands(
    cli: click.Group, impls: Iterable[pluggy.HookImpl]
) -> dict[str, tuple[str | None, list[str]]]:
    """Run each ``register_commands`` implementation on ``cli``, refusing any that replaces
    or removes a command already there (a built-in's, or an earlier plugin's): its changes
    are undone. Per plugin: the error (``None`` when fine) and the command paths it added.
    """
    owners = dict.fromkeys(_command_tree(cli), "")  # "": diffeat's own commands
    outcome: dict[str, tuple[str | None, list[str]]] = {}
    for impl in impls:
        name = impl.plugin_name
        before = _command_tree(cli)
        try:
            call_hookimpl(impl, {"cli": cli})
        except Exception as exc:
            _restore_commands(cli, before)
            outcome[name] = (f"register_commands raised {_describe(exc)}", [])
            continue
        after = _command_tree(cli)
        taken = [path for path, command in before.items() if after.get(path) is not command]
        if taken:
            _restore_commands(cli, before)
            path = taken[0]
            owner = owners.get(path, "")
            whose = f"plugin {owner!r}" if owner else "diffeat (a built-in command)"
            outcome[name] = (
                f"register_commands: plugin {name!r} replaces the command `diffeat {path}`, "
                f"which {whose} provides; the existing command is kept and none of "
                f"{name!r}'s commands are added. Rename its command, or disable one of the "
                "two plugins with DIFFEAT_DISABLE_PLUGINS",
                [],
            )
            continue
        for path in after.keys() - before.keys():
            owners[path] = name
        outcome[name] = (None, sorted(_command_paths(cli) - set(before)))
    return outcome


_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def reset_plugin_manager(manager: PluginManager | None = None) -> None:
    """Replace (or forget) the process-wide manager; for tests and embedding."""
    global _MANAGER
    _MANAGER = manager
