"""Everything a training run needs before its first step: :func:`prepare_training`.

The trainable aggregator (fresh or the configured starting point), the pairs
and their order, the resume state, the features of every image (extracted when
missing), the network and its optimiser (resumed when a state file matches),
the pairs' keypoint cells and the validator. Nothing here knows a checkpoint
format or the store's keys: checkpoints go through the
:class:`~diffeat.core.components.TrainableAggregator` capability, features
through the pipeline's :class:`~diffeat.core.sources.FeatureSource`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffeat.core.components import (
    TrainableAggregator,
    TrainingCheckpoint,
    device_of,
    is_trainable,
    needs_descriptors,
)
from diffeat.core.config import StageConfig, config_digest
from diffeat.core.datasets import ImageInfo, ImageRef, LazyImages, Pair, pair_images
from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.features import FeatureSet
from diffeat.core.options import options_dict
from diffeat.core.sources import FeatureSource, StoredFeatures
from diffeat.train.data import TrainPair
from diffeat.train.images import (
    index_images,
    missing_images,
)
from diffeat.train.loss import keypoint_cells
from diffeat.train.options import TrainOptions, digest_options
from diffeat.train.progress import ProgressFactory
from diffeat.train.state import TrainState, apply_state, last_path, read_state
from diffeat.train.validate import Validator, ValPair, val_subset

if TYPE_CHECKING:
    from diffeat.core.pipeline import Pipeline

DIGEST_VERSION = 1
_SHOW_MISSING = 5

#: receives one-line notes such as ``"resuming from step N"``
Log = Callable[[str], None]


class MissingFeatures(DiffeatError):
    """Some images of the pairs have no features in the store (and extraction is off)."""

    def __init__(self, message: str, missing: list[ImageRef]) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass
class TrainingRun:
    """A prepared run: what the step loop reads and updates.

    ``order`` holds, for every step of the run, the position in ``items`` of
    that step's pair; the steps still to do are ``order[state.step:]``.
    """

    pipeline: Pipeline
    aggregator: TrainableAggregator
    options: TrainOptions
    out: Path
    last: Path
    state: TrainState
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    #: the descriptors' grid ``(width, height)``
    grid: tuple[int, int]
    items: list[TrainPair]
    order: list[int]
    reader: StoredFeatures
    validator: Validator
    #: the metadata written with every checkpoint (resolved pipeline, options, metric)
    info: dict[str, Any]
    start_step: int
    pairs: int
    skipped_pairs: int
    images: int
    extracted: int
    started: float


def pair_order(n: int, steps: int, seed: int) -> np.ndarray:
    """Pair index of each step: ``RandomState(seed).permutation(n)``, repeated draws appended."""
    if n < 1:
        raise ValueError("no pairs to order")
    rng = np.random.RandomState(seed)
    parts: list[np.ndarray] = []
    total = 0
    while total < steps:
        parts.append(rng.permutation(n))
        total += n
    return np.concatenate(parts)[:steps]


def _nothing_to_train(stage: StageConfig, where: str) -> ConfigError:
    return ConfigError(
        f'{where}: aggregator {stage.plugin!r} has nothing to train; use plugin = "hyperfeatures" '
        "in [aggregator]"
    )


def trainable_aggregator(pipeline: Pipeline) -> TrainableAggregator:
    """The pipeline's aggregator, if it can be trained; else a :class:`ConfigError` saying why."""
    source = pipeline.config.source
    if len(pipeline.sources) != 1:
        raise ConfigError(
            f"{source}: only single-extractor pipelines can be trained; this one has "
            f"{len(pipeline.sources)} extractors ({', '.join(s.name for s in pipeline.sources)})"
        )
    aggregator = pipeline.aggregator
    if not is_trainable(aggregator):
        raise _nothing_to_train(pipeline.config.aggregator, str(source))
    if not needs_descriptors(pipeline.matcher):
        raise ConfigError(
            f"{source}: matcher {pipeline.config.matcher.plugin!r} does not use descriptors, so "
            "validation could not see the network; use a descriptor matcher such as nearest"
        )
    if pipeline.store is None:
        raise DiffeatError("training reads features from a store: pass --store PATH")
    return aggregator


def configured_checkpoint(stage: StageConfig, aggregator: TrainableAggregator) -> str:
    """The checkpoint the stage's options name (the aggregator's ``checkpoint_option``)."""
    name = aggregator.checkpoint_option
    fields = (
        {f.name for f in dataclasses.fields(stage.options)}
        if dataclasses.is_dataclass(stage.options)
        else set()
    )
    if name not in fields:
        raise ConfigError(
            f"aggregator {stage.plugin!r} names its checkpoint option {name!r} "
            f"(checkpoint_option), but its options have no such field "
            f"({', '.join(sorted(fields)) or 'none'}); the plugin is broken"
        )
    return str(getattr(stage.options, name) or "")


def training_stage(
    stage: StageConfig, out: Path, aggregator: TrainableAggregator | None = None
) -> tuple[StageConfig, bool]:
    """The aggregator stage to train; the second value says whether it was changed.

    A pipeline usually names its trained network in the aggregator's
    ``checkpoint_option`` (the file it is evaluated with). When that is the
    file this run writes, training starts from a fresh network (``seed``)
    instead of loading it; any other checkpoint is the starting point
    (fine-tuning). A checkpoint that does not exist yet (a preset's name for
    the network still to be trained) also means a fresh start. ``aggregator``
    is the stage's component (built here when not given).
    """
    if aggregator is None:
        built = stage.build()
        if not is_trainable(built):
            raise _nothing_to_train(stage, "the pipeline")
        aggregator = built
    path = configured_checkpoint(stage, aggregator)
    target = Path(path).expanduser()
    if path and (target.resolve() == out.expanduser().resolve() or not target.exists()):
        options = dataclasses.replace(stage.options, **{aggregator.checkpoint_option: ""})
        return dataclasses.replace(stage, options=options), True
    return stage, False


def _ids_digest(pairs: Sequence[Pair]) -> str:
    return hashlib.sha256("\n".join(p.id for p in pairs).encode()).hexdigest()[:20]


def run_digest(
    pipeline: Pipeline,
    options: TrainOptions,
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    aggregator: StageConfig | None = None,
) -> str:
    """A hash of everything that shapes the trained weights and the validation history."""
    cfg = pipeline.config
    aggregator = aggregator or cfg.aggregator
    data = {
        "v": DIGEST_VERSION,
        "cache_key": pipeline.cache_key,
        "aggregator": {
            "plugin": aggregator.plugin,
            **options_dict(aggregator.options, cache_only=True),
        },
        "matcher": {
            "plugin": cfg.matcher.plugin,
            **options_dict(cfg.matcher.options, cache_only=True),
        },
        "train": digest_options(options),
        "train_pairs": [len(train_pairs), _ids_digest(train_pairs)],
        "val_pairs": [len(val_pairs), _ids_digest(val_pairs)],
    }
    return config_digest(data)


def _aggregator_to_train(
    pipeline: Pipeline, out: Path, log: Log
) -> tuple[TrainableAggregator, StageConfig]:
    """The aggregator to train and its stage: the pipeline's, or a fresh one when the
    configured checkpoint is this run's output or does not exist yet."""
    aggregator = trainable_aggregator(pipeline)
    configured = pipeline.config.aggregator
    stage, fresh = training_stage(configured, out, aggregator)
    if not fresh:
        return aggregator, stage
    seed = options_dict(stage.options).get("seed")
    log(
        f"aggregator checkpoint {configured_checkpoint(configured, aggregator)} is this run's "
        "output or does not exist yet: training a fresh network"
        + (f" (seed {seed})" if seed is not None else "")
        + f" -> {out}"
    )
    built = stage.build()
    if not is_trainable(built):
        raise _nothing_to_train(stage, str(pipeline.config.source))
    return built, stage


def _resume_state(
    aggregator: TrainableAggregator,
    last: Path,
    digest: str,
    options: TrainOptions,
    restart: bool,
) -> tuple[TrainState | None, TrainingCheckpoint | None]:
    """The state found in ``last`` (and its checkpoint) when the run continues it."""
    if not last.exists() or restart:
        return None, None
    found, ckpt = read_state(aggregator, last)
    if found.digest != digest:
        raise DiffeatError(
            f"{last} holds the state of a training run with another pipeline, [train] "
            f"options or pairs (at step {found.step}); rerun with --restart to start over "
            "(the file is replaced), or choose another --out"
        )
    if found.step > options.steps:
        raise DiffeatError(
            f"{last} is already at step {found.step}, past steps = {options.steps}: pass "
            f"--steps {found.step} or more to continue it, or --restart to start over"
        )
    return found, ckpt


def _ensure_features(
    pipeline: Pipeline,
    refs: list[ImageRef],
    *,
    extract: bool,
    progress: ProgressFactory,
    log: Log,
    missing_hint: str,
) -> tuple[dict[ImageRef, ImageInfo], int]:
    """Store keys and sizes of every image; extract (or refuse) the ones not stored."""
    source = pipeline.source
    with progress(total=len(refs), desc="index images", unit="img") as bar:
        infos = index_images(source, refs, progress=bar)
    missing = missing_images(source, infos)
    if not missing:
        return infos, 0
    if not extract:
        shown = ", ".join(str(r.path) for r in missing[:_SHOW_MISSING])
        more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        store = pipeline.store
        raise MissingFeatures(
            f"{len(missing)} of {len(refs)} images of the training and validation pairs have no "
            f"features under cache key {source.cache_key} in the store "
            f"{store.path if store is not None else None}: {shown}{more}. "
            + (missing_hint or "Extract them first, or drop --no-extract."),
            missing,
        )
    log(f"extracting features of {len(missing)} of {len(refs)} images")
    with progress(total=len(missing), desc="extract", unit="img") as bar:
        report = pipeline.extract(LazyImages(missing), progress=bar)
    if report.failed:
        first, error = report.failed[0]
        raise DiffeatError(
            f"{len(report.failed)} images could not be extracted, e.g. {first}: {error}"
        )
    return infos, report.computed


def _device(options: TrainOptions, aggregator: TrainableAggregator) -> torch.device:
    if options.device != "auto":
        return pick_device(options.device)  # a device this machine lacks: a ConfigError
    return device_of(aggregator)


def _network(
    aggregator: TrainableAggregator, source: FeatureSource, key: str, device: torch.device
) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The network, built (seeded) or loaded by the aggregator for the features stored under
    ``key`` (the first pair's source), in train mode on ``device``, and its descriptor grid."""
    probe = source.read(key)
    layers = [(name, int(t.shape[1])) for name, t in probe.layers.items()]
    network = aggregator.network_for(layers, list(probe.timesteps)).to(device)
    network.train()
    return network, _descriptor_grid(aggregator, network, probe)


def _resume_or_restart(
    ckpt: TrainingCheckpoint | None,
    state: TrainState,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    last: Path,
    log: Log,
) -> None:
    """Load the resume state into ``network`` and ``optimizer``, or (``--restart``) remove it."""
    if ckpt is not None:
        apply_state(ckpt, network, optimizer, last)
        log(f"resuming from step {state.step} ({last})")
    elif last.exists():  # --restart
        log(f"starting over: replacing {last}")
        last.unlink()


def _descriptor_grid(
    aggregator: TrainableAggregator, network: torch.nn.Module, features: FeatureSet
) -> tuple[int, int]:
    """``(width, height)`` of the descriptors of one image (no gradients, eval mode)."""
    network.eval()
    try:
        with torch.no_grad():
            desc = aggregator.forward_features([features])
    finally:
        network.train()
    return int(desc.shape[-1]), int(desc.shape[-2])


def _cells(
    source: FeatureSource,
    pair: Pair,
    infos: dict[ImageRef, ImageInfo],
    grid: tuple[int, int],
    mode: str,
) -> tuple[ImageInfo, ImageInfo, np.ndarray, np.ndarray]:
    src = infos[ImageRef(Path(pair.source), pair.category)]
    tgt = infos[ImageRef(Path(pair.target), pair.category)]
    vis = np.flatnonzero(pair.visible)
    cells = []
    for info, points in ((src, pair.source_points[vis]), (tgt, pair.target_points[vis])):
        transform = source.extractor.transform_for(info.size)
        cells.append(keypoint_cells(points, info.size, grid, mode, transform))  # type: ignore[arg-type]
    return src, tgt, cells[0], cells[1]


def _train_items(
    source: FeatureSource,
    pairs: Sequence[Pair],
    infos: dict[ImageRef, ImageInfo],
    grid: tuple[int, int],
    mode: str,
) -> list[TrainPair]:
    items = []
    for pair in pairs:
        src, tgt, sc, tc = _cells(source, pair, infos, grid, mode)
        items.append(TrainPair(pair.id, src.key, tgt.key, sc, tc))
    return items


def _val_items(
    source: FeatureSource,
    pairs: Sequence[Pair],
    infos: dict[ImageRef, ImageInfo],
    grid: tuple[int, int],
    mode: str,
) -> list[ValPair]:
    items = []
    for pair in pairs:
        src, tgt, sc, tc = _cells(source, pair, infos, grid, mode)
        size = pair.target_size if pair.target_size is not None else tgt.size
        items.append(ValPair(pair, src.key, tgt.key, sc, tc, size))
    return items


def prepare_training(
    pipeline: Pipeline,
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    options: TrainOptions,
    out_path: str | Path,
    *,
    progress: ProgressFactory,
    restart: bool = False,
    extract: bool = True,
    missing_hint: str = "",
    log: Log,
) -> TrainingRun:
    """Set up a run (see the module doc); the arguments are :func:`~diffeat.train.loop.train`'s."""
    started = time.perf_counter()
    out = Path(out_path)
    last = last_path(out)
    aggregator, stage = _aggregator_to_train(pipeline, out, log)

    usable = [p for p in train_pairs if p.num_visible > 0]
    if not usable:
        raise DiffeatError(
            f"no training pairs with keypoints ({len(train_pairs)} pairs given): check the "
            "dataset, --split and -o options"
        )
    order = pair_order(len(usable), options.steps, options.seed)
    used_index = sorted(set(int(i) for i in order))
    vals = val_subset(val_pairs, options.val_pairs_per_category)
    digest = run_digest(pipeline, options, usable, vals, stage)
    found, resume_ckpt = _resume_state(aggregator, last, digest, options, restart)
    state = found or TrainState(digest=digest, cache_key=pipeline.cache_key)

    refs = pair_images([usable[i] for i in used_index] + vals)
    infos, extracted = _ensure_features(
        pipeline, refs, extract=extract, progress=progress, log=log, missing_hint=missing_hint
    )

    source = pipeline.source
    assert source.store is not None  # trainable_aggregator refused a pipeline without one
    device = _device(options, aggregator)
    aggregator.device = device
    first = infos[ImageRef(Path(usable[int(order[0])].source), usable[int(order[0])].category)]
    network, grid = _network(aggregator, source, first.key, device)
    optimizer = torch.optim.AdamW(
        [p for _, p in network.named_parameters()], lr=options.lr, weight_decay=options.weight_decay
    )
    _resume_or_restart(resume_ckpt, state, network, optimizer, last, log)

    mode = options.point_rounding
    items = _train_items(source, [usable[i] for i in used_index], infos, grid, mode)
    position = {index: k for k, index in enumerate(used_index)}
    validator = Validator(
        source,
        pipeline.matcher,
        aggregator,
        _val_items(source, vals, infos, grid, mode),
        alpha=options.val_alpha,
        temperature=options.temperature,
        device=device,
    )
    return TrainingRun(
        pipeline=pipeline,
        aggregator=aggregator,
        options=options,
        out=out,
        last=last,
        state=state,
        network=network,
        optimizer=optimizer,
        device=device,
        grid=grid,
        items=items,
        order=[position[int(i)] for i in order],
        reader=source.reader(source.stored_dtype(first.key)),
        validator=validator,
        info={
            "pipeline": pipeline.config.resolved(),
            "options": options_dict(options),
            "metric": validator.metric,
            "val_pairs": len(validator),
        },
        start_step=state.step,
        pairs=len(usable),
        skipped_pairs=len(train_pairs) - len(usable),
        images=len(refs),
        extracted=extracted,
        started=started,
    )
