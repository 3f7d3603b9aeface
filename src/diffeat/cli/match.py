"""``diffeat match``: where do these source points land in the target?"""

from __future__ import annotations

import logging

import click

from diffeat.cli.common import (
    collect_overrides,
    config_options,
    emit_json,
    open_pipeline,
    parse_point,
    store_option,
)
from diffeat.core.errors import DiffeatError

log = logging.getLogger(__name__)


@click.command("match")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("source", type=click.Path())
@click.argument("target", type=click.Path())
@click.option(
    "--point",
    "-p",
    "points",
    multiple=True,
    required=True,
    metavar="X,Y",
    help="Source point in pixels (repeatable).",
)
@store_option
@click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Draw the matches to this image file.",
)
@click.option(
    "--category", default="", help="Category of both images, for prompts with {category}."
)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def match_cmd(
    config: str,
    source: str,
    target: str,
    points: tuple[str, ...],
    store_path: str | None,
    plot_path: str | None,
    category: str,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Match --point X,Y of SOURCE to TARGET with the pipeline in CONFIG."""
    from diffeat.core.images import as_input

    pts = [parse_point(p) for p in points]
    pipe = open_pipeline(config, collect_overrides(overrides, model, device), store_path)
    log.info(
        "pipeline %s (digest %s); store %s", config, pipe.config.digest(), store_path or "none"
    )
    src = as_input(source).with_category(category)
    tgt = as_input(target).with_category(category)
    result = pipe.match(src, tgt, pts)
    from diffeat.viz import rejection_reasons

    reasons = rejection_reasons(result.valid.tolist(), result.extras)
    if plot_path:
        from diffeat.viz import plot_matches

        try:
            plot_matches(
                src.image,
                tgt.image,
                pts,
                result.points.tolist(),
                plot_path,
                valid=result.valid.tolist(),
                scores=result.scores.tolist(),
                reasons=reasons,
            )
        except (OSError, ValueError) as exc:
            raise DiffeatError(f"cannot write plot {plot_path}: {exc}") from None
    rows = [{"source": list(p), **m} for p, m in zip(pts, result.to_json())]
    for row, reason in zip(rows, reasons):
        if reason is not None:
            row["reason"] = reason
    if as_json:
        emit_json({"source": source, "target": target, "matches": rows})
        return
    for i, row in enumerate(rows, 1):
        sx, sy = row["source"]
        tx, ty = row["target"]
        flag = f"  ({row['reason']})" if "reason" in row else ""
        click.echo(f"{i}: ({sx:g}, {sy:g}) -> ({tx:g}, {ty:g})  score {row['score']:.4f}{flag}")


def add_to(cli: click.Group) -> None:
    cli.add_command(match_cmd)
