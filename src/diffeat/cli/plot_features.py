"""``diffeat plot features``: a PCA-to-RGB picture of one layer of an image's features.

Only click and :mod:`diffeat.cli.api` are imported here; the pipeline, torch and
matplotlib are imported when the command runs.
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
    store_option,
)


@click.command("features")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("image", type=click.Path())
@click.option("--layer", default=None, help="Layer to draw (default: the extractor's first).")
@click.option(
    "--extractor",
    "extractor_name",
    default=None,
    help="With several [[extractor]] tables: the one to draw, by name (default: the first).",
)
@click.option(
    "--timestep", type=int, default=None, help="Timestep to draw (default: the first stored)."
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="PNG file to write.",
)
@store_option
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print what was drawn as JSON.")
def features_cmd(
    config: str,
    image: str,
    layer: str | None,
    extractor_name: str | None,
    timestep: int | None,
    out_path: str,
    store_path: str | None,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Draw IMAGE beside a PCA-to-RGB picture of one layer of its features (the first three
    principal components of the layer's channels as red, green and blue). The features are
    read from --store when there, else extracted (and kept in --store if given)."""
    from pathlib import Path

    from diffeat.core.images import as_input
    from diffeat.viz_features import plot_features

    pipe = open_pipeline(config, collect_overrides(overrides, model, device), store_path)
    inp = as_input(image)
    sources = {src.name: src for src in pipe.sources}
    if extractor_name is None:
        source = pipe.source
    elif extractor_name in sources:
        source = sources[extractor_name]
    else:
        raise DiffeatError(
            f"{config} has no extractor named {extractor_name!r}; it has: {', '.join(sources)}"
        )
    stored = store_path is not None and source.is_stored(inp)
    (fs,) = source.features([inp])
    out = Path(out_path)
    if out.parent and not out.parent.is_dir():
        raise DiffeatError(f"cannot write {out_path}: the folder {out.parent} does not exist")
    try:
        drawn = plot_features(inp.image, fs, out, layer=layer, timestep=timestep)
    except (OSError, ValueError) as exc:
        raise DiffeatError(f"cannot write plot {out_path}: {exc}") from None
    report = {
        "png": str(out),
        "image": image,
        "extractor": source.name,
        "layer": drawn.layer,
        "timestep": drawn.timestep,
        "channels": drawn.channels,
        "grid": list(drawn.grid),
        "explained_variance": [round(v, 4) for v in drawn.explained],
        "from_store": stored,
        "layers": list(fs.layers),
        "timesteps": list(fs.timesteps),
    }
    if as_json:
        emit_json(report)
        return
    h, w = drawn.grid
    share = 100 * sum(drawn.explained)
    click.echo(
        f"{out}: {drawn.layer} @ t={drawn.timestep}, {drawn.channels} channels on {h}x{w} cells "
        f"-> RGB ({share:.0f}% of the variance)"
    )


def add_to(cli: click.Group) -> None:
    """Add ``features`` to the ``plot`` group (created if no plugin made it)."""
    command_group(
        cli, "plot", "Pictures: feature maps, and what a trained component learned."
    ).add_command(features_cmd)
