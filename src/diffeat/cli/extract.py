"""``diffeat extract``: features of many images into a store."""

from __future__ import annotations

import click

from diffeat.cli.common import collect_overrides, config_options, emit_json, progress_bar
from diffeat.core.config import load_config
from diffeat.core.images import list_images


@click.command("extract")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--store",
    "store_path",
    required=True,
    type=click.Path(),
    help="Feature store folder (created if missing).",
)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def extract_cmd(
    ctx: click.Context,
    config: str,
    inputs: tuple[str, ...],
    store_path: str,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Extract features of INPUTS (images or folders) into the store; finished images are skipped."""
    from diffeat.core.pipeline import Pipeline
    from diffeat.store import FeatureStore

    cfg = load_config(config, collect_overrides(overrides, model, device))
    images = list_images(list(inputs))
    pipe = Pipeline(cfg, store=FeatureStore(store_path))
    with progress_bar(len(images), "extract", ctx.obj["quiet"]) as bar:
        report = pipe.extract(images, progress=bar)
    summary = {
        "store": store_path,
        "cache_key": pipe.cache_key,
        "cache_keys": {src.name: src.cache_key for src in pipe.sources},
        "images": report.total,
        "computed": report.computed,
        "cached": report.cached,
        "failed": [{"image": i, "error": e} for i, e in report.failed],
    }
    if as_json:
        emit_json(summary)
    else:
        click.echo(
            f"{report.total} images: {report.computed} extracted, {report.cached} already stored, "
            f"{len(report.failed)} failed -> {store_path} ({pipe.cache_key})"
        )
    for _image, error in report.failed:
        click.echo(f"error: {error}", err=True)
    if report.failed:
        ctx.exit(2)


def add_to(cli: click.Group) -> None:
    cli.add_command(extract_cmd)
