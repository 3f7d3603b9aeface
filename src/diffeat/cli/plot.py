"""``diffeat plot mixing-weights``: plots of trained components."""

from __future__ import annotations

import click

from diffeat.cli.common import emit_json


@click.group("plot")
def plot_group() -> None:
    """Plot what a trained component learned."""


@plot_group.command("mixing-weights")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(), help="PNG file to write.")
@click.option("--title", default=None, help="Plot title.")
@click.option("--json", "as_json", is_flag=True, help="Print the layers x timesteps grid as JSON.")
def mixing_weights(checkpoint: str, out_path: str, title: str | None, as_json: bool) -> None:
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


def add_to(cli: click.Group) -> None:
    cli.add_command(plot_group)
