"""``diffeat plugins``, ``diffeat layers`` and ``diffeat config show``."""

from __future__ import annotations

import logging
import weakref

import click

from diffeat.cli.common import collect_overrides, config_options, emit_json
from diffeat.core.config import load_config, to_toml
from diffeat.core.plugins import KINDS, PluginManager, get_plugin_manager

log = logging.getLogger(__name__)

# Registries whose records already list the commands their plugins bring.
_RECORDED: weakref.WeakSet[PluginManager] = weakref.WeakSet()


def record_plugin_commands(pm: PluginManager) -> None:
    """Have ``pm``'s records list each plugin's commands (``command:generate``, ...), once.

    ``diffeat`` finds plugin commands without the registry (start-up stays fast),
    so the registry learns them here, by running the hooks on a scratch group.
    """
    if pm in _RECORDED:
        return
    _RECORDED.add(pm)
    pm.add_commands(click.Group("diffeat"))


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_cmd(as_json: bool) -> None:
    """Built-in and installed plugins, with versions, what they provide, and errors."""
    pm = get_plugin_manager()
    record_plugin_commands(pm)
    records = list(pm.plugins())
    if as_json:
        emit_json(
            {
                "plugins": [
                    {
                        "name": r.name,
                        "version": r.version,
                        "origin": r.origin,
                        "ok": r.ok,
                        "error": r.error,
                        "provides": r.provides,
                    }
                    for r in records
                ],
                **{f"{k}s": pm.names(k) for k in KINDS},
            }
        )
        return
    for r in records:
        status = "ok" if r.ok else "BROKEN"
        click.echo(f"{r.name} {r.version} [{r.origin}] {status}")
        if r.provides:
            click.echo(f"    provides: {', '.join(r.provides)}")
        if r.error:
            click.echo(f"    error: {r.error}")


@click.command("layers")
@click.argument("config", type=click.Path(dir_okay=False))
@config_options
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Every layer the extractor's model can capture, not only the configured ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def layers_cmd(
    config: str,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    every: bool,
    as_json: bool,
) -> None:
    """The layers, channels and strides the pipeline's extractor returns (known before
    any image runs); with --all every layer its model can capture."""
    from diffeat.core.components import available_layers_of
    from diffeat.core.errors import DiffeatError
    from diffeat.core.pipeline import Pipeline

    pipe = Pipeline(load_config(config, collect_overrides(overrides, model, device)))
    if every:
        catalog = available_layers_of(pipe.extractor)
        if catalog is None:
            raise DiffeatError(
                f"the extractor {type(pipe.extractor).__name__} does not list its capturable "
                f"layers; without --all: the configured ones"
            )
        infos = catalog
    else:
        infos = pipe.layers()
    timesteps = list(pipe.extractor.timesteps())
    if as_json:
        emit_json({"layers": [i.to_dict() for i in infos], "timesteps": timesteps})
        return
    click.echo(f"timesteps: {', '.join(map(str, timesteps))}")
    width = max(len(i.name) for i in infos)
    click.echo(f"{'layer'.ljust(width)}  channels  stride")
    for i in infos:
        click.echo(f"{i.name.ljust(width)}  {i.channels:8d}  {i.stride:g}")


@click.group("config")
def config_group() -> None:
    """Inspect pipeline files."""


@config_group.command("show")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--set", "overrides", multiple=True, metavar="STAGE.OPTION=VALUE", help="Override an option."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def config_show(config: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the resolved pipeline: every option with its default filled in."""
    cfg = load_config(config, list(overrides))
    log.info("read %s with %d override(s): digest %s", config, len(overrides), cfg.digest())
    resolved = cfg.resolved()
    if as_json:
        emit_json({"config": resolved, "digest": cfg.digest()})
    else:
        click.echo(f"# resolved from {config}; digest {cfg.digest()[:16]}")
        click.echo(to_toml(resolved), nl=False)


def add_to(cli: click.Group) -> None:
    cli.add_command(plugins_cmd)
    cli.add_command(layers_cmd)
    cli.add_command(config_group)
