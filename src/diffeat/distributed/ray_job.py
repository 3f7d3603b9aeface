"""Extraction as a Ray Data pipeline: CPU tasks decode, a pool of actors extracts and stores.

::

    from diffeat.distributed import ray_extract
    report = ray_extract("dift.toml", paths, "/shared/feats.zarr", address="auto")

The job is three stages, streamed (Ray Data runs them at once, with back-pressure):

1. ``from_items``: one row per input file (its path, category and input position);
2. ``map(decode_row)``, Ray tasks on the CPUs: read and decode each file to 8-bit
   RGB and compute its content key (an unreadable file becomes a row with its error).
   Where the actors ask for the same resources as these tasks (a cluster without
   GPUs), Ray Data fuses this stage into the actors: they decode as well;
3. ``map_batches(ExtractWorker)``, a fixed pool of actors (one GPU each where the
   cluster has GPUs): each actor builds the :class:`~diffeat.core.pipeline.Pipeline`
   from the resolved config once (the model loads once per actor), and for every
   batch of decoded images runs the same ``Pipeline.extract`` as one process does:
   images already stored are skipped, the others are extracted in the extractor's
   batch size and written to the store *by the actor*. An actor returns only each
   image's key and status and the batch's counts; feature maps never pass through
   Ray's object store (decoded pixels do, once, from stage 2 to 3).

The driver turns the returned rows into the usual
:class:`~diffeat.core.sources.ExtractReport` (failed images in input order, as one
process reports them) and counts progress for the whole job. Ray Data restarts a
dead actor and reruns its in-flight batch (its defaults for actor pools,
``max_restarts=-1`` and ``max_task_retries=-1``): a lost worker costs that batch
only, and whatever of it was already stored is found stored on the rerun. An
exception in extraction (not an unreadable image) stops the job, as it stops a
single process; a :class:`DiffeatError` (a user error) is raised again on the
driver with its class and message.

Every worker must reach the store path and the input files (a shared filesystem
or an object store) and have diffeat, its plugins and the model files the config
names (give absolute paths in the config); input paths are made absolute on the
driver.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from diffeat.core.config import PipelineConfig, load_config, parse_config
from diffeat.core.datasets import ImageRef, LazyImages
from diffeat.core.errors import DiffeatError, ImageError
from diffeat.core.images import ImageInput, as_input
from diffeat.core.pipeline import Pipeline
from diffeat.core.sources import ExtractReport, Progress, open_store
from diffeat.distributed.shard import Subset

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)

RAY_MISSING = (
    "`--ray` needs Ray Data, which is not installed: pip install 'diffeat[ray]' (ray[data] >= 2.40)"
)

#: counts each batch returns on its first row (0 on the others), summed by the driver
COUNTS = ("total", "computed", "cached", "found")


def import_ray() -> ModuleType:
    """``ray`` with ``ray.data`` loaded, or a :class:`DiffeatError` saying how to install it."""
    try:
        import ray
        import ray.data  # pyarrow and the rest of the `data` extra
    except ImportError as exc:
        raise DiffeatError(f"{RAY_MISSING} ({exc})") from None
    return ray


def image_items(images: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per input file: ``index`` (input position), ``path`` (absolute, for the
    workers), ``source`` (as given, stored with the entry) and ``category``."""
    if isinstance(images, LazyImages):
        items: Sequence[Any] = images.refs
    elif isinstance(images, Subset) and isinstance(images.base, LazyImages):
        items = [images.base.refs[i] for i in images.indices]
    else:
        items = images
    rows = []
    for index, item in enumerate(items):
        if isinstance(item, ImageRef):
            path, category = item.path, item.category
        elif isinstance(item, (str, os.PathLike)):
            path, category = item, ""
        else:
            raise DiffeatError(
                f"Ray workers read images from files: input {index} is a "
                f"{type(item).__name__}; save it and pass its path (on storage every worker "
                "can reach)"
            )
        absolute = str(Path(path).resolve())
        rows.append({"index": index, "path": absolute, "source": str(path), "category": category})
    return rows


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Stage 2 (a CPU task): decode the file to RGB bytes and compute its content key."""
    out = {**row, "key": "", "width": 0, "height": 0, "pixels": b"", "error": ""}
    try:
        inp = as_input(row["path"])
    except ImageError as exc:
        out["error"] = str(exc).replace(row["path"], row["source"])
        return out
    out.update(key=inp.key, width=inp.image.width, height=inp.image.height)
    out["pixels"] = inp.image.tobytes()
    return out


class ExtractWorker:
    """Stage 3 (a Ray actor): the pipeline built once; batches extracted into the store.

    Subclass it to run code around each batch (:meth:`extract_batch`); the tests
    use a subclass that kills its process once.
    """

    def __init__(
        self, config: dict[str, Any], config_source: str, store: str, store_dtype: str = "float16"
    ) -> None:
        #: a user error building the pipeline here (a plugin or store this node lacks) is
        #: reported by the first batch, so that the driver raises it with its message
        self.error: DiffeatError | None = None
        try:
            cfg = parse_config(config, source=config_source)
            self.pipe = Pipeline(cfg, store=open_store(store, dtype=store_dtype))
            self.sources = len(cfg.extractors)
        except DiffeatError as exc:
            self.error = exc

    def extract_batch(self, inputs: list[ImageInput]) -> ExtractReport:
        """Extract and store ``inputs`` (the single-process ``Pipeline.extract``)."""
        return self.pipe.extract(inputs) if inputs else ExtractReport()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        try:
            if self.error is not None:
                raise self.error
            return self.run_batch(batch)
        except DiffeatError as exc:
            # a user error stops the job, as in one process; Ray would keep only its text
            n = len(batch["index"])
            return {
                "index": [int(v) for v in batch["index"]],
                "source": [str(v) for v in batch["source"]],
                "key": [""] * n,
                "status": [f"error:{type(exc).__name__}"] * n,
                "error": [str(exc)] * n,
                **{name: [0] * n for name in COUNTS},
            }

    def run_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Extract one batch of decoded rows; a row per image with its key and status."""
        n = len(batch["index"])
        inputs = []
        keys = [""] * n
        for i in range(n):
            if batch["error"][i]:
                continue
            size = (int(batch["width"][i]), int(batch["height"][i]))
            image = Image.frombytes("RGB", size, bytes(batch["pixels"][i]))
            # the absolute path is stored as the entry's source: a worker's working folder
            # is not the driver's
            inp = ImageInput(image, str(batch["key"][i]), str(batch["path"][i]))
            inp = inp.with_category(str(batch["category"][i]))
            keys[i] = self.pipe.image_key(inp)
            inputs.append(inp)
        report = self.extract_batch(inputs)
        broken = [i for i in range(n) if batch["error"][i]]
        # an unreadable image counts once per extractor, as in Pipeline.extract
        report.total += len(broken) * self.sources
        counts = {name: [getattr(report, name)] + [0] * (n - 1) for name in COUNTS}
        return {
            "index": [int(v) for v in batch["index"]],
            "source": [str(v) for v in batch["source"]],
            "key": keys,
            "status": ["failed" if batch["error"][i] else "stored" for i in range(n)],
            "error": [str(v) for v in batch["error"]],
            **counts,
        }


def _error_class(name: str) -> type[DiffeatError]:
    """The :mod:`diffeat.core.errors` class named ``name`` (else :class:`DiffeatError`)."""
    from diffeat.core import errors

    found = getattr(errors, name, None)
    if isinstance(found, type) and issubclass(found, DiffeatError):
        return found
    return DiffeatError


def _cluster_shape(
    ray: ModuleType, workers: int | None, gpus_per_worker: float | None
) -> tuple[int, float]:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus > 0 else 0.0
    if gpus_per_worker > gpus:
        raise DiffeatError(
            f"each Ray worker asks for {gpus_per_worker:g} GPU but the cluster has {gpus:g}: "
            "lower --ray-gpus-per-worker (0 runs on CPUs)"
        )
    if workers is None:
        workers = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else 1
    if workers < 1:
        raise DiffeatError(f"--ray-workers {workers}: at least one worker is needed")
    return workers, gpus_per_worker


def _quiet_ray_data(ray: ModuleType) -> None:
    """The driver counts progress for the whole job: Ray Data's own bars and INFO lines off."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # the one warning that says the bars are off (its logger's name is Ray Data's own)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def ray_extract(
    config: PipelineConfig | str | os.PathLike[str],
    images: Sequence[Any],
    store: str | os.PathLike[str],
    *,
    address: str | None = None,
    workers: int | None = None,
    batch_size: int = 8,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    progress: Progress | None = None,
    worker_class: type[ExtractWorker] = ExtractWorker,
    store_dtype: str = "float16",
) -> ExtractReport:
    """Extract ``images`` (file paths, :class:`~diffeat.core.datasets.ImageRef` s or a
    :class:`~diffeat.core.datasets.LazyImages`) into the store at ``store`` on a Ray cluster.

    ``config``: a pipeline file or a loaded :class:`PipelineConfig` (its resolved options
    travel to the actors, which rebuild it with their own plugin manager). ``address``:
    as for ``ray.init`` (``"auto"``, ``"ray://head:10001"``; ``None`` connects to
    ``RAY_ADDRESS`` or starts a local cluster); when Ray is already initialised in this
    process that cluster is used. ``workers``: actors in the pool (default: one per GPU
    of the cluster, or 1 without GPUs), each with ``gpus_per_worker`` GPUs (default 1
    where the cluster has GPUs, else 0) and ``cpus_per_worker`` CPUs. ``batch_size``:
    images per actor call, the unit a lost worker costs. ``progress.update(n)`` counts
    finished images. ``store_dtype``: the storage dtype the actors open the store with
    (``--store-dtype``; part of the cache key). Returns the counts of one
    ``Pipeline.extract`` over all images.
    """
    ray = import_ray()
    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    if batch_size < 1:
        raise DiffeatError(f"--ray-batch-size {batch_size}: give at least 1")
    items = image_items(images)
    report = ExtractReport()
    if not items:
        return report
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        pool, gpus = _cluster_shape(ray, workers, gpus_per_worker)
        _quiet_ray_data(ray)
        log.info("Ray: %d images, %d workers with %g GPU each", len(items), pool, gpus)
        ds = ray.data.from_items(items).map(decode_row, num_cpus=1)
        ds = ds.map_batches(
            worker_class,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "config": cfg.resolved(),
                "config_source": cfg.source,
                "store": os.fspath(store),
                "store_dtype": store_dtype,
            },
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_gpus=gpus,
            num_cpus=cpus_per_worker,
        )
        failed: list[tuple[int, str, str]] = []
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for name in COUNTS:
                setattr(report, name, getattr(report, name) + int(out[name].sum()))
            for index, source, status, error in zip(
                out["index"], out["source"], out["status"], out["error"]
            ):
                if status == "failed":
                    failed.append((int(index), str(source), str(error)))
                elif str(status).startswith("error:"):
                    raise _error_class(str(status)[len("error:") :])(str(error))
            if progress is not None:
                progress.update(len(out["index"]))
    finally:
        if started:
            ray.shutdown()
    report.failed = [(source, error) for _, source, error in sorted(failed)]
    return report
