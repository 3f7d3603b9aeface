"""The ``diffeat extract`` options that spread one extraction over many workers.

``--shard K/N`` (and ``--shard-by``) keeps the inputs one worker owns;
``--ray [ADDRESS]`` (with ``--ray-workers``, ``--ray-batch-size``,
``--ray-gpus-per-worker``) runs the extraction as a Ray Data job. The library
side is :mod:`diffeat.distributed`; see ``docs/scaling.md``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from diffeat.cli.common import is_quiet, progress_bar, store_dtype
from diffeat.core.errors import DiffeatError

if TYPE_CHECKING:
    from diffeat.core.config import PipelineConfig
    from diffeat.core.sources import ExtractReport
    from diffeat.distributed.shard import Shard

log = logging.getLogger(__name__)

#: what --ray takes: auto, local, ray://host:port, host:port (an empty value: RAY_ADDRESS or local)
_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.\-\[\]:]+:\d+)$")


@dataclass(frozen=True)
class ScaleOptions:
    """The values of the sharding and Ray options of ``diffeat extract``."""

    shard: str | None = None
    shard_by: str = "key"
    ray: str | None = None
    ray_workers: int | None = None
    ray_batch_size: int = 8
    ray_gpus_per_worker: float | None = None

    @property
    def uses_ray(self) -> bool:
        return self.ray is not None


def scale_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options to a command; it receives them as one ``scale: ScaleOptions``."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        shard: str | None,
        shard_by: str,
        ray_address: str | None,
        ray_workers: int | None,
        ray_batch_size: int,
        ray_gpus_per_worker: float | None,
        **kwargs: Any,
    ) -> Any:
        scale = ScaleOptions(
            shard, shard_by, ray_address, ray_workers, ray_batch_size, ray_gpus_per_worker
        )
        return fn(*args, scale=scale, **kwargs)

    options = [
        click.option(
            "--shard",
            default=None,
            metavar="K/N",
            help="Extract only shard K of N (from 0) of the inputs, partitioned by content key, "
            "so N workers fill one store; `auto` (or `auto/N`) reads RANK/WORLD_SIZE, "
            "SLURM_ARRAY_TASK_ID/COUNT or JOB_COMPLETION_INDEX. Without it, RANK/WORLD_SIZE "
            "(torchrun) are used when set.",
        ),
        click.option(
            "--shard-by",
            type=click.Choice(["key", "path"]),
            default="key",
            show_default=True,
            help="Partition by content key (reads every image once per worker) or by the path "
            "as given (reads nothing; the same pixels under two paths may go to two workers).",
        ),
        click.option(
            "--ray",
            "ray_address",
            is_flag=False,
            flag_value="",
            default=None,
            metavar="[ADDRESS]",
            help="Run as a Ray Data job on the cluster at ADDRESS (auto, ray://HEAD:10001, "
            "HOST:PORT; without one: RAY_ADDRESS or a new local cluster). Write --ray=ADDRESS, "
            "or put --ray after INPUTS.",
        ),
        click.option(
            "--ray-workers",
            type=click.IntRange(min=1),
            default=None,
            help="Extractor actors (default: one per GPU of the cluster, 1 without GPUs).",
        ),
        click.option(
            "--ray-batch-size",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Images per actor call: the work a lost worker costs.",
        ),
        click.option(
            "--ray-gpus-per-worker",
            type=click.FloatRange(min=0),
            default=None,
            help="GPUs per actor (default 1 where the cluster has GPUs, else 0; 0.5 puts two "
            "actors on a GPU).",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def check(scale: ScaleOptions) -> None:
    """Reject combinations that make no sense, before any work."""
    if scale.uses_ray:
        if scale.shard is not None:
            raise DiffeatError(
                "--shard and --ray both split the work: use --ray alone (the cluster shares "
                "the images out), or --shard K/N without --ray on each of N workers"
            )
        address = scale.ray
        if address and not _ADDRESS.match(address):
            hint = " (it is a path: write --ray=ADDRESS, or put --ray after INPUTS)"
            raise DiffeatError(
                f"--ray {address!r} is not a Ray address (auto, ray://HEAD:10001, HOST:PORT)"
                + (hint if Path(address).exists() else "")
            )
    elif scale.ray_workers is not None or scale.ray_gpus_per_worker is not None:
        raise DiffeatError("--ray-workers and --ray-gpus-per-worker need --ray")


def this_shard(ctx: click.Context, scale: ScaleOptions) -> Shard | None:
    """The shard this worker runs (``--shard``, or torchrun's RANK/WORLD_SIZE), or ``None``."""
    if scale.uses_ray:
        return None
    from diffeat.distributed.shard import resolve_shard

    shard = resolve_shard(scale.shard)
    if shard is not None:
        log.info("shard %s (from %s), by %s", shard, shard.origin, scale.shard_by)
        if shard.origin == "RANK/WORLD_SIZE":
            from diffeat.distributed.shard import bind_local_gpu

            gpu = bind_local_gpu()
            if gpu is not None:
                log.info("LOCAL_RANK: this process extracts on cuda:%d", gpu)
    return shard


def shard_inputs(
    ctx: click.Context, scale: ScaleOptions, shard: Shard, images: Sequence[Any]
) -> Sequence[Any]:
    """The inputs ``shard`` owns (a progress bar while every image is keyed)."""
    from diffeat.distributed.shard import select_shard

    if shard.count == 1:
        return images
    quiet = is_quiet(ctx) or scale.shard_by == "path"
    with progress_bar(len(images), f"shard {shard}: keys", quiet) as bar:
        return select_shard(images, shard, by=scale.shard_by, progress=bar.update)


def ray_report(
    ctx: click.Context,
    scale: ScaleOptions,
    cfg: PipelineConfig,
    images: Sequence[Any],
    store_path: str,
) -> ExtractReport:
    """Run the extraction as a Ray Data job (progress for the whole job)."""
    from diffeat.distributed.ray_job import ray_extract

    with progress_bar(len(images), "extract (ray)", is_quiet(ctx)) as bar:
        return ray_extract(
            cfg,
            images,
            store_path,
            address=scale.ray or None,
            workers=scale.ray_workers,
            batch_size=scale.ray_batch_size,
            gpus_per_worker=scale.ray_gpus_per_worker,
            progress=bar,
            store_dtype=store_dtype(),
        )
