"""``diffeat propagate``: carry a first-frame mask through a video of your own."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from diffeat.cli.common import (
    collect_overrides,
    config_options,
    emit_json,
    is_quiet,
    open_pipeline,
    progress_bar,
    store_option,
)
from diffeat.core.errors import DiffeatError

log = logging.getLogger(__name__)


@click.command("propagate")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("video", type=click.Path())
@click.option(
    "--mask",
    "mask_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Indexed PNG of the first frame (0 background, 1..N objects), the frame's size.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the masks (one indexed PNG per frame) and overlay.gif.",
)
@store_option
@click.option("--fps", default=8.0, show_default=True, help="Frame rate of overlay.gif.")
@click.option("--no-overlay", is_flag=True, help="Write the masks only.")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def propagate_cmd(
    ctx: click.Context,
    config: str,
    video: str,
    mask_path: str,
    out_dir: str,
    store_path: str | None,
    fps: float,
    no_overlay: bool,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Propagate the first frame's --mask through VIDEO (a folder of frames or a video
    file) with the pipeline in CONFIG; options from its [propagation] table."""
    from diffeat.core.videos import read_indexed_png, read_video, write_indexed_png
    from diffeat.eval.propagation import parse_options, propagate_masks

    pipe = open_pipeline(config, collect_overrides(overrides, model, device), store_path)
    options = parse_options(pipe.config.tasks.get("propagation", {}), f"{config}: [propagation]")
    frames = read_video(video)
    if len(frames) < 2:
        raise DiffeatError(f"{video} has {len(frames)} frame(s); propagation needs at least two")
    first = read_indexed_png(mask_path)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffeatError(f"cannot create the output folder {out}: {exc}") from None

    def name(i: int) -> str:
        frame = frames[i]
        return str(frame) if isinstance(frame, Path) else f"{video} frame {i}"

    def stem(i: int) -> str:
        frame = frames[i]
        return frame.stem if isinstance(frame, Path) else f"{i:05d}"

    masks: list[Path] = []
    overlays = []
    from diffeat.core.videos import frame_input

    if not no_overlay:
        from diffeat.eval.propagation_plots import overlay, write_gif
    with progress_bar(len(frames), "propagate", is_quiet(ctx)) as bar:
        for i, ids in enumerate(
            propagate_masks(pipe, frames, first, options.settings(), names=name)
        ):
            masks.append(write_indexed_png(out / f"{stem(i)}.png", ids))
            if not no_overlay:
                overlays.append(overlay(frame_input(frames[i]).image, ids))
            bar.update(1)
    gif = None
    if overlays:
        gif = write_gif(out / "overlay.gif", overlays, fps=fps)
    objects = int(first.max(initial=0))
    if as_json:
        emit_json(
            {
                "video": video,
                "frames": len(frames),
                "objects": objects,
                "masks": [str(p) for p in masks],
                "overlay": str(gif) if gif else None,
                "propagation": {
                    "temperature": options.temperature,
                    "topk": options.topk,
                    "context": options.context,
                    "radius": options.radius,
                },
            }
        )
        return
    click.echo(f"{len(masks)} masks in {out}" + (f", overlay {gif}" if gif else ""))


def add_to(cli: click.Group) -> None:
    cli.add_command(propagate_cmd)
