"""``diffeat generate``: sample images with a generation-mode extractor, keeping their features."""

from __future__ import annotations

import re
from pathlib import Path

import click

from diffeat.cli.common import collect_overrides, config_options, emit_json, store_option
from diffeat.core.config import load_config
from diffeat.core.errors import DiffeatError


def image_name(prompt: str, seed: int) -> str:
    """A file name from the prompt's first words and the seed (``a-photo-of-a-cat-7.png``)."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-")
    return f"{words or 'unconditional'}-{seed}.png"


@click.command("generate")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--prompt", default=None, help="The prompt (replaces extractor.prompt).")
@click.option("--count", type=click.IntRange(min=1), default=1, help="Images to sample.")
@click.option("--seed", type=int, default=0, help="Noise seed of the first image (then +1 each).")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Image folder."
)
@store_option
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def generate_cmd(
    ctx: click.Context,
    config: str,
    prompt: str | None,
    count: int,
    seed: int,
    out_dir: str,
    store_path: str | None,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Sample COUNT images from a generation-mode pipeline, save them as PNG in --out and
    keep the maps captured while denoising in --store (keyed by the saved image), so
    `diffeat match` / `eval` with the same config read them instead of extracting."""
    import json

    from diffeat.core.pipeline import Pipeline
    from diffeat.store import FeatureStore

    extra = collect_overrides(overrides, model, device)
    if prompt is not None:
        extra.append(f"extractor.prompt={json.dumps(prompt)}")
    cfg = load_config(config, extra)
    pipe = Pipeline(cfg, store=FeatureStore(store_path) if store_path else None)
    extractor = pipe.extractor
    if not hasattr(extractor, "generate"):
        raise DiffeatError(
            f"{config}: the extractor {cfg.extractor.plugin!r} cannot generate images; use the "
            f'stable-diffusion extractor with mode = "generation"'
        )
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        image, features = extractor.generate(seed + i)
        path = folder / image_name(extractor.options.prompt, seed + i)
        image.save(path)
        if pipe.store is not None:
            pipe.source.put(path, features)
        made.append({"image": str(path), "seed": seed + i})
        if not as_json and not ctx.obj["quiet"]:
            click.echo(f"{path}")
    if as_json:
        emit_json({"images": made, "store": store_path, "cache_key": pipe.cache_key})


def add_to(cli: click.Group) -> None:
    cli.add_command(generate_cmd)
