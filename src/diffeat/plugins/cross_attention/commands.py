"""``diffeat plot attention``: the cross-attention matcher's per-layer maps on the target.

Registered by the plugin's ``register_commands`` hook. Only click and
:mod:`diffeat.cli.api` are imported here; torch, the pipeline and matplotlib when
the command runs.
"""

from __future__ import annotations

import click

from diffeat.cli.api import (
    DiffeatError,
    collect_overrides,
    command_group,
    config_options,
    emit_json,
    open_pipeline,
    parse_point,
    store_option,
)

PLOT_HELP = "Pictures: feature maps, attention, and what a trained component learned."


@click.command("attention")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("source", type=click.Path())
@click.argument("target", type=click.Path())
@click.option("--point", "-p", "points", multiple=True, required=True, metavar="X,Y")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="PNG file.")
@store_option
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the matches and layer peaks.")
def attention_cmd(
    config: str,
    source: str,
    target: str,
    points: tuple[str, ...],
    out_path: str,
    store_path: str | None,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Match --point X,Y of SOURCE to TARGET with a cross-attention pipeline (Hedlin et
    al.) and draw, per point, the target under each layer's attention map and their mean,
    with the argmax (+) and the match (x). Optimised contexts are reused from --store."""
    from pathlib import Path

    from diffeat.core.images import as_input
    from diffeat.plugins.cross_attention.plot import plot_attention

    pts = [parse_point(p) for p in points]
    from diffeat.core.config import load_config

    base = collect_overrides(overrides, model, device)
    plugin = load_config(config, base).matcher.plugin
    if plugin != "cross-attention":
        raise DiffeatError(
            f"{config}: plot attention draws the cross-attention matcher's maps; this "
            f"pipeline's matcher is {plugin!r} (try examples/hedlin-sd14.toml)"
        )
    pipe = open_pipeline(config, [*base, "matcher.return_maps=true"], store_path)
    out = Path(out_path)
    if out.parent and not out.parent.is_dir():
        raise DiffeatError(f"cannot write {out_path}: the folder {out.parent} does not exist")
    src, tgt = as_input(source), as_input(target)
    result = pipe.match(src, tgt, pts)
    layers = list(pipe.config.matcher.options.layers)
    try:
        plot_attention(
            src.image,
            tgt.image,
            pts,
            result.points.tolist(),
            result.extras["attention"],
            layers,
            out,
        )
    except (OSError, ValueError) as exc:
        raise DiffeatError(f"cannot write plot {out_path}: {exc}") from None
    rows = [{"source": list(p), **m} for p, m in zip(pts, result.to_json())]
    if as_json:
        emit_json({"png": str(out), "layers": layers, "matches": rows})
        return
    click.echo(f"wrote {out}")
    for i, row in enumerate(rows, 1):
        peaks = ", ".join(f"{name} {v:.2e}" for name, v in row["layer_peaks"].items())
        click.echo(f"{i}: {tuple(row['source'])} -> {tuple(row['target'])}; peaks: {peaks}")


def add_commands(cli: click.Group) -> None:
    """Add ``plot attention`` to the ``diffeat`` group ``cli``."""
    command_group(cli, "plot", PLOT_HELP).add_command(attention_cmd)
