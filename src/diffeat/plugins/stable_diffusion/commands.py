"""The stable-diffusion plugin's command: ``diffeat generate``.

Registered by the plugin's ``register_commands`` hook. Only click and
:mod:`diffeat.cli.api` are imported here; the pipeline and the sampler
(torch, diffusers) are imported when the command runs.
"""

from __future__ import annotations

import json

import click

from diffeat.cli.api import (
    collect_overrides,
    config_options,
    emit_json,
    is_quiet,
    open_pipeline,
    store_option,
)


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
    from diffeat.plugins.stable_diffusion.generation import GeneratedImage, generate_images

    extra = collect_overrides(overrides, model, device)
    if prompt is not None:
        extra.append(f"extractor.prompt={json.dumps(prompt)}")
    pipe = open_pipeline(config, extra, store_path)
    show = not as_json and not is_quiet(ctx)

    def echo(item: GeneratedImage) -> None:
        if show:
            click.echo(f"{item.path}")

    made = generate_images(pipe, count, seed, out_dir, on_image=echo)
    if as_json:
        images = [{"image": str(item.path), "seed": item.seed} for item in made]
        emit_json({"images": images, "store": store_path, "cache_key": pipe.cache_key})


def add_commands(cli: click.Group) -> None:
    """Add ``generate`` to the ``diffeat`` group ``cli``."""
    cli.add_command(generate_cmd)
