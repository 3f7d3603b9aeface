"""The hyperfeatures plugin's commands: ``diffeat checkpoint ...`` and ``diffeat plot mixing-weights``.

Registered by the plugin's ``register_commands`` hook. Only click and
:mod:`diffeat.cli.api` are imported here; the network, checkpoint and plotting
modules (torch, matplotlib) are imported when a command runs.
"""

from __future__ import annotations

import click

from diffeat.cli.api import command_group, emit_json

PLOT_HELP = "Plot what a trained component learned."


@click.group("checkpoint")
def checkpoint_group() -> None:
    """Trained aggregator checkpoints (safetensors)."""


@checkpoint_group.command("info")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_cmd(path: str, as_json: bool) -> None:
    """Layers, timesteps, architecture and training record of a checkpoint."""
    from diffeat.plugins.hyperfeatures.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    record = dict(ckpt.extra.get("train") or {})
    record.pop("losses", None)  # the per-step losses: long, not for reading
    data = {"path": str(ckpt.path), "network": ckpt.network, **ckpt.extra}
    if record:
        data["train"] = record
    if as_json:
        emit_json(data)
        return
    net = ckpt.network
    click.echo(f"{ckpt.path}: {net['format']}")
    click.echo(f"  timesteps: {net['timesteps']}")
    click.echo(
        f"  output: {net['projection_dim']} x {net['size'][1]} x {net['size'][0]}, "
        f"GroupNorm groups {net['norm_groups']}"
    )
    click.echo("  layers:")
    for layer in net["layers"]:
        click.echo(f"    {layer['name']:<32} {layer['channels']:>5} ch")
    for key in ("source", "imported_from"):
        if key in ckpt.extra:
            click.echo(f"  {key}: {ckpt.extra[key]}")
    for key in ("step", "best"):
        if key in record:
            click.echo(f"  {key}: {record[key]}")


@checkpoint_group.command("import-official")
@click.argument("state", type=click.Path(dir_okay=False))
@click.option(
    "--config",
    "config",
    required=True,
    type=click.Path(dir_okay=False),
    help="The pipeline the weights are for (its extractor's layers and timesteps).",
)
@click.option(
    "--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write."
)
@click.option("--set", "overrides", multiple=True, metavar="STAGE.OPTION=VALUE")
def import_cmd(state: str, config: str, out_path: str, overrides: tuple[str, ...]) -> None:
    """Turn the official Diffusion Hyperfeatures weights (their state dict, exported to
    safetensors once: see docs/hyperfeatures.md) into a checkpoint for CONFIG."""
    from diffeat.core.config import load_config
    from diffeat.plugins.hyperfeatures.official import config_layers, import_official

    cfg = load_config(config, list(overrides))
    ext, agg = cfg.extractor.options, cfg.aggregator.options
    size = getattr(agg, "size", [64, 64])
    written = import_official(
        state,
        out_path,
        layers=config_layers(list(getattr(ext, "layers", []))),
        timesteps=list(getattr(ext, "timesteps", [])),
        size=(int(size[0]), int(size[1])),
        norm_groups=int(getattr(agg, "norm_groups", 32)),
    )
    click.echo(f"wrote {written}")


@click.command("mixing-weights")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(), help="PNG file to write.")
@click.option("--title", default=None, help="Plot title.")
@click.option("--json", "as_json", is_flag=True, help="Print the layers x timesteps grid as JSON.")
def mixing_weights_cmd(checkpoint: str, out_path: str, title: str | None, as_json: bool) -> None:
    """Heat map of a hyperfeatures checkpoint's mixing weights (layers x timesteps)."""
    from diffeat.plugins.hyperfeatures.plot import as_network, mixing_weights_table
    from diffeat.plugins.hyperfeatures.plot import plot_mixing_weights as plot

    network = as_network(checkpoint)
    written = plot(network, out_path, title=title)
    table = mixing_weights_table(network)
    if as_json:
        emit_json({**table, "png": str(written)})
        return
    click.echo(f"wrote {written}")
    click.echo("mixing weights (rows: layers, columns: timesteps " + f"{table['timesteps']}):")
    width = max(len(name) for name in table["layers"])
    for name, row in zip(table["layers"], table["weights"]):
        click.echo(f"  {name:<{width}}  " + "  ".join(f"{v:.3f}" for v in row))


def add_commands(cli: click.Group) -> None:
    """Add ``checkpoint`` and ``plot mixing-weights`` to the ``diffeat`` group ``cli``."""
    cli.add_command(checkpoint_group)
    command_group(cli, "plot", PLOT_HELP).add_command(mixing_weights_cmd)
