"""``diffeat extract``: features of many images (or of a dataset's pairs) into a store."""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from diffeat.cli.common import (
    collect_overrides,
    config_options,
    emit_json,
    is_quiet,
    open_store,
    progress_bar,
    required_store,
    store_dtype_option,
)
from diffeat.cli.datasets_common import dataset_option
from diffeat.cli.distributed import ScaleOptions, scale_options
from diffeat.core.errors import DiffeatError

if TYPE_CHECKING:
    from diffeat.core.config import PipelineConfig
    from diffeat.core.datasets import LazyImages
    from diffeat.core.images import ImageInput

log = logging.getLogger(__name__)


def dataset_images(name: str, root: str, split: str | None, options: tuple[str, ...]) -> LazyImages:
    """Every image of a dataset split's pairs, each once with its category (loaded lazily)."""
    from diffeat.cli.datasets_common import dataset_from_cli
    from diffeat.core.datasets import ImageRef, LazyImages, card_of, pair_images

    dataset = dataset_from_cli(name, root, split, options)
    if card_of(dataset).task == "propagation":  # videos: every frame file once
        frames = (f for video in dataset.videos() for f in video.frames if isinstance(f, Path))
        refs = [ImageRef(Path(f)) for f in dict.fromkeys(frames)]
    else:
        refs = pair_images(dataset.pairs())
    if not refs:
        raise DiffeatError(f"the {name} dataset yielded no pairs (check --split and -o options)")
    return LazyImages(refs)


def input_images(inputs: tuple[str, ...]) -> list[Path]:
    """The image files of INPUTS (files, folders searched recursively, or glob patterns the
    shell left unexpanded); a :class:`DiffeatError` when they hold no image at all."""
    from diffeat.core.images import IMAGE_SUFFIXES, list_images

    paths: list[str] = []
    for raw in inputs:
        if glob.has_magic(raw) and not Path(raw).exists():
            matched = sorted(glob.glob(raw, recursive=True))
            if not matched:
                raise DiffeatError(f"{raw!r} matches no file: check the pattern and folder")
            paths.extend(matched)
        else:
            paths.append(raw)
    images = list_images(paths)
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DiffeatError(
            f"no images in {', '.join(inputs)}: nothing to extract (folders are searched "
            f"recursively for {suffixes})"
        )
    return images


def expand_videos(paths: list[Path]) -> list[Path | ImageInput]:
    """Video files (``.mp4``, ...) among ``paths`` replaced by their decoded frames, each
    keyed by its pixels in the store like any image."""
    from diffeat.core.images import IMAGE_SUFFIXES
    from diffeat.core.videos import VIDEO_SUFFIXES, frame_input, read_video

    out: list[Path | ImageInput] = []
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES and suffix not in IMAGE_SUFFIXES:
            frames = read_video(path)
            out.extend(frame_input(f, f"{path}#{i}") for i, f in enumerate(frames))
        else:
            out.append(path)
    return out


#: the background writer's default bound in MiB (diffeat.core.prefetch.DEFAULT_WRITE_QUEUE_MB;
#: repeated here so that `diffeat --help` does not import torch)
WRITE_QUEUE_MB = 1024


def throughput_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--batch-size``, ``--workers``, ``--write-queue-mb``, ``--compile``, ``--channels-last``."""
    fn = click.option(
        "--channels-last",
        is_flag=True,
        help="Channels-last memory format for the extractor's convolutions (its channels_last "
        "option).",
    )(fn)
    fn = click.option(
        "--compile",
        "compile_model",
        is_flag=True,
        help="torch.compile the extractor's model around the captured layers (its compile "
        "option); pays off on long GPU runs.",
    )(fn)
    fn = click.option(
        "--write-queue-mb",
        type=click.FloatRange(min=0),
        default=WRITE_QUEUE_MB,
        show_default=True,
        help="Most MiB of computed features waiting for the background writer (0: write each "
        "entry before the next batch).",
    )(fn)
    fn = click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Worker processes that decode and preprocess images ahead of the model.",
    )(fn)
    fn = click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=None,
        help="Images per extractor call (default: the extractor's batch_size option).",
    )(fn)
    return fn


def switch_on(cfg: PipelineConfig, option: str, flag: str) -> None:
    """Set the boolean ``option`` of every extractor of ``cfg`` (a flag like ``--compile``)."""
    import dataclasses

    for stage in cfg.extractors:
        opts = stage.options
        fields = {f.name for f in dataclasses.fields(opts)} if opts is not None else set()
        if option not in fields:
            raise DiffeatError(
                f"{flag}: the extractor {stage.name or stage.plugin!r} (plugin {stage.plugin}) "
                f"has no {option} option; leave {flag} out"
            )
        setattr(opts, option, True)


@click.command("extract")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option(
    "--store",
    "store_path",
    default=None,
    type=click.Path(),
    help=(
        "Feature store folder, or object-store URL (s3://, gs://, az://); created if missing. "
        "Default: $DIFFEAT_STORE."
    ),
)
@click.option(
    "--dataset",
    "dataset_name",
    default=None,
    help="Extract every image of this dataset's pairs instead of INPUTS (see `diffeat datasets`).",
)
@click.option("--root", default=None, type=click.Path(), help="The dataset's folder.")
@click.option("--split", default=None, help="Dataset split (default: the dataset's).")
@dataset_option("A dataset option (repeatable; see `diffeat datasets`).")
@store_dtype_option
@config_options
@throughput_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@scale_options
@click.pass_context
def extract_cmd(
    ctx: click.Context,
    config: str,
    inputs: tuple[str, ...],
    store_path: str | None,
    dataset_name: str | None,
    root: str | None,
    split: str | None,
    dataset_options: tuple[str, ...],
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    batch_size: int | None,
    workers: int,
    write_queue_mb: float,
    compile_model: bool,
    channels_last: bool,
    as_json: bool,
    scale: ScaleOptions,
) -> None:
    """Extract features of INPUTS (images, folders or video files), or of every image of a
    dataset's pairs or videos (--dataset NAME --root DIR), into the store; finished images
    are skipped.

    Many workers fill one store with --shard K/N each (or torchrun's RANK/WORLD_SIZE), or
    with --ray on a Ray cluster (docs/scaling.md)."""
    from diffeat.cli import distributed
    from diffeat.core.config import load_config
    from diffeat.core.pipeline import Pipeline
    from diffeat.core.prefetch import ExtractSettings

    if bool(inputs) == bool(dataset_name):
        raise DiffeatError(
            "give either INPUTS (images or folders) or --dataset NAME --root DIR, not "
            + ("both" if inputs else "neither")
        )
    if dataset_name is None and (root or split or dataset_options):
        raise DiffeatError("--root, --split and -o describe a dataset: add --dataset NAME")
    if dataset_name is not None and not root:
        raise DiffeatError(f"--dataset {dataset_name} needs --root DIR, the dataset's folder")
    store_path = required_store(store_path, "extract")
    distributed.check(scale)
    cfg = load_config(config, collect_overrides(overrides, model, device))
    if compile_model:
        switch_on(cfg, "compile", "--compile")
    if channels_last:
        switch_on(cfg, "channels_last", "--channels-last")
    settings = ExtractSettings(batch_size, workers, write_queue_mb)
    if dataset_name is not None:
        assert root is not None
        images = dataset_images(dataset_name, root, split, dataset_options)
    else:
        images = expand_videos(input_images(inputs))
    inputs_total = len(images)
    shard = distributed.this_shard(ctx, scale)
    if shard is not None:
        images = distributed.shard_inputs(ctx, scale, shard, images)
    pipe = Pipeline(cfg, store=open_store(store_path))
    log.info("%d images -> store %s under cache key %s", len(images), store_path, pipe.cache_key)
    if scale.uses_ray:
        report = distributed.ray_report(ctx, scale, cfg, images, store_path)
    else:
        with progress_bar(len(images), "extract", is_quiet(ctx)) as bar:
            report = pipe.extract(images, progress=bar, settings=settings)
    summary = {
        "store": store_path,
        "cache_key": pipe.cache_key,
        "cache_keys": {src.name: src.cache_key for src in pipe.sources},
        "images": report.total,
        "computed": report.computed,
        "cached": report.cached,
        "found": report.found,
        "failed": [{"image": i, "error": e} for i, e in report.failed],
    }
    if shard is not None:
        summary["shard"] = {"index": shard.index, "count": shard.count, "by": scale.shard_by}
        summary["inputs"] = inputs_total
    if as_json:
        emit_json(summary)
    else:
        where = f"shard {shard} of {inputs_total} inputs: " if shard is not None else ""
        click.echo(
            f"{where}{report.total} images: {report.computed} extracted, {report.cached} already stored, "
            f"{report.found} stored meanwhile by another process, "
            f"{len(report.failed)} failed -> {store_path} ({pipe.cache_key})"
        )
    for _image, error in report.failed:
        click.echo(f"error: {error}", err=True)
    if report.failed:
        ctx.exit(2)


def add_to(cli: click.Group) -> None:
    cli.add_command(extract_cmd)
