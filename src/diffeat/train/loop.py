"""The training loop of ``diffeat train``: fit a trainable aggregator on a dataset's keypoint pairs.

The recipe of Diffusion Hyperfeatures' ``train_hyperfeatures.py``: one pair
per step in the order ``RandomState(seed).permutation(len(pairs))`` (further
permutations of the same generator appended when there are fewer pairs than
steps), the symmetric contrastive loss of :mod:`diffeat.train.loss`, AdamW
over every network parameter, validation PCK on a fixed subset, and the best
network (highest validation PCK: bbox when every validation pair has a box,
else img) written to ``out``. Features are read from the pipeline's store (as
stored, normally float16) and the network runs in float32.

Differences from the official script, on purpose: validation runs after every
``val_every`` *completed* steps and after the last step (the official
validates after steps 1001, 2001, ... , 4001 and never at the end); the best
checkpoint is kept (the official saves every validated step); pairs without a
visible keypoint are skipped.

Resuming: the state (weights, AdamW state, history) is written to
``OUT.last.safetensors`` every ``checkpoint_every`` steps and at every
validation; a rerun with the same pipeline, options and pairs continues from
it and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffeat.core.config import StageConfig, config_digest
from diffeat.core.datasets import ImageInfo, ImageRef, LazyImages, Pair, pair_images
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.options import options_dict
from diffeat.train.data import PairFeatures, TrainPair, pair_loader
from diffeat.train.images import index_images, missing_images
from diffeat.train.loss import correspondence_loss, keypoint_cells
from diffeat.train.options import TrainOptions, digest_options
from diffeat.train.state import TrainState, apply_state, last_path, read_state, save_state
from diffeat.train.validate import ValPair, has_boxes, val_subset, validate

#: ``progress(total=..., desc=..., unit=..., initial=...)`` -> a tqdm-like bar
ProgressFactory = Callable[..., Any]
DIGEST_VERSION = 1
_SHOW_MISSING = 5


class MissingFeatures(DiffeatError):
    """Some images of the pairs have no features in the store (and extraction is off)."""

    def __init__(self, message: str, missing: list[ImageRef]) -> None:
        super().__init__(message)
        self.missing = missing


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _null_progress(**_: Any) -> _NullBar:
    return _NullBar()


@dataclass
class TrainReport:
    """What a training run did and where its outputs are."""

    out: Path
    last: Path
    steps: int
    start_step: int
    device: str
    pairs: int
    pairs_used: int
    skipped_pairs: int
    val_pairs: int
    metric: str | None
    best: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    images: int = 0
    extracted: int = 0
    seconds: float = 0.0

    @property
    def resumed(self) -> bool:
        return self.start_step > 0

    def final_loss(self, window: int = 50) -> float | None:
        """The mean loss of the last ``window`` steps."""
        tail = self.losses[-window:]
        return float(np.mean(tail)) if tail else None

    def to_dict(self, *, losses: bool = False) -> dict[str, Any]:
        out = {
            "out": str(self.out),
            "last": str(self.last),
            "steps": self.steps,
            "start_step": self.start_step,
            "resumed": self.resumed,
            "device": self.device,
            "pairs": self.pairs,
            "pairs_used": self.pairs_used,
            "skipped_pairs": self.skipped_pairs,
            "val_pairs": self.val_pairs,
            "metric": self.metric,
            "best": self.best,
            "history": self.history,
            "final_loss": self.final_loss(),
            "images": self.images,
            "extracted": self.extracted,
            "seconds": round(self.seconds, 3),
        }
        if losses:
            out["losses"] = self.losses
        return out


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


def trainable_aggregator(pipeline: Any) -> Any:
    """The pipeline's aggregator, if it can be trained; else a :class:`ConfigError` saying why."""
    source = pipeline.config.source
    if len(pipeline.sources) != 1:
        raise ConfigError(
            f"{source}: only single-extractor pipelines can be trained; this one has "
            f"{len(pipeline.sources)} extractors ({', '.join(s.name for s in pipeline.sources)})"
        )
    aggregator = pipeline.aggregator
    if not (hasattr(aggregator, "forward_features") and hasattr(aggregator, "network_for")):
        plugin = pipeline.config.aggregator.plugin
        raise ConfigError(
            f'{source}: aggregator {plugin!r} has nothing to train; use plugin = "hyperfeatures" '
            "in [aggregator]"
        )
    if not getattr(pipeline.matcher, "needs_descriptors", True):
        raise ConfigError(
            f"{source}: matcher {pipeline.config.matcher.plugin!r} does not use descriptors, so "
            "validation could not see the network; use a descriptor matcher such as nearest"
        )
    if pipeline.store is None:
        raise DiffeatError("training reads features from a store: pass --store PATH")
    return aggregator


def training_stage(stage: StageConfig, out: Path) -> tuple[StageConfig, bool]:
    """The aggregator stage to train; the second value says whether it was changed.

    A pipeline usually names its trained network as ``checkpoint`` (the file it
    is evaluated with). When that is the file this run writes, training starts
    from a fresh network (``seed``) instead of loading it; any other checkpoint
    is the starting point (fine-tuning). A checkpoint that does not exist yet
    (a preset's name for the network still to be trained) also means a fresh start.
    """
    path = str(getattr(stage.options, "checkpoint", "") or "")
    target = Path(path).expanduser()
    if path and (target.resolve() == out.expanduser().resolve() or not target.exists()):
        options = dataclasses.replace(stage.options, checkpoint="")
        return dataclasses.replace(stage, options=options), True
    return stage, False


def _device(options: TrainOptions, aggregator: Any) -> torch.device:
    if options.device != "auto":
        return torch.device(options.device)
    return torch.device(getattr(aggregator, "device", "cpu"))


def _ids_digest(pairs: Sequence[Pair]) -> str:
    return hashlib.sha256("\n".join(p.id for p in pairs).encode()).hexdigest()[:20]


def run_digest(
    pipeline: Any,
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


def _ensure_features(
    pipeline: Any,
    refs: list[ImageRef],
    *,
    extract: bool,
    progress: ProgressFactory,
    log: Callable[[str], None],
    missing_hint: str,
) -> tuple[dict[ImageRef, ImageInfo], int]:
    """Store keys and sizes of every image; extract (or refuse) the ones not stored."""
    with progress(total=len(refs), desc="index images", unit="img") as bar:
        infos = index_images(pipeline, refs, progress=bar)
    missing = missing_images(pipeline, infos)
    if not missing:
        return infos, 0
    if not extract:
        shown = ", ".join(str(r.path) for r in missing[:_SHOW_MISSING])
        more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        raise MissingFeatures(
            f"{len(missing)} of {len(refs)} images of the training and validation pairs have no "
            f"features under cache key {pipeline.cache_key} in the store "
            f"{getattr(pipeline.store, 'path', pipeline.store)}: {shown}{more}. "
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


def _cells(
    pipeline: Any,
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
        transform = pipeline.extractor.transform_for(info.size)
        cells.append(keypoint_cells(points, info.size, grid, mode, transform))  # type: ignore[arg-type]
    return src, tgt, cells[0], cells[1]


def _stored_dtype(pipeline: Any, image_key: str) -> str:
    """``float16`` when every layer of a stored entry is float16 (then workers read float16)."""
    info = pipeline.store.entry_info(pipeline.cache_key, image_key)
    dtypes = {spec["dtype"] for spec in info["layers"].values()}
    return "float16" if dtypes == {"float16"} else "float32"


def _metric_value(record: dict[str, Any], metric: str | None) -> float | None:
    return None if metric is None else record.get(metric)


def train(
    pipeline: Any,
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    options: TrainOptions,
    out_path: str | Path,
    *,
    progress: ProgressFactory | None = None,
    restart: bool = False,
    extract: bool = True,
    missing_hint: str = "",
    log: Callable[[str], None] | None = None,
) -> TrainReport:
    """Train the pipeline's aggregator on ``train_pairs``; validate on a subset of ``val_pairs``.

    Writes the best network to ``out_path`` and the resume state to
    ``OUT.last.safetensors`` (see the module doc). Images whose features are
    not in the store are extracted first (``extract=False``: a
    :class:`MissingFeatures` error, whose message ends with ``missing_hint``).
    ``progress`` makes tqdm-like bars; ``log`` receives one-line notes such as
    ``"resuming from step N"``. With ``options.workers > 0`` features are read
    in spawned processes, which import the calling script again: keep a
    script's own code under ``if __name__ == "__main__":``.
    """
    started = time.perf_counter()
    progress = progress or _null_progress
    log = log or (lambda _msg: None)
    aggregator = trainable_aggregator(pipeline)
    out = Path(out_path)
    last = last_path(out)
    stage, fresh = training_stage(pipeline.config.aggregator, out)
    if fresh:
        seed = getattr(stage.options, "seed", 0)
        named = getattr(pipeline.config.aggregator.options, "checkpoint", "")
        log(
            f"aggregator checkpoint {named} is this run's output or does not exist yet: "
            f"training a fresh network (seed {seed}) -> {out}"
        )
        aggregator = stage.build()

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

    state = TrainState(digest=digest, cache_key=pipeline.cache_key)
    resume_ckpt = None
    if last.exists() and not restart:
        found, resume_ckpt = read_state(last)
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
        state = found

    refs = pair_images([usable[i] for i in used_index] + vals)
    infos, extracted = _ensure_features(
        pipeline,
        refs,
        extract=extract,
        progress=progress,
        log=log,
        missing_hint=missing_hint,
    )

    # the network: built (seeded) or loaded by the aggregator from the first pair's features
    device = _device(options, aggregator)
    if hasattr(aggregator, "device"):
        aggregator.device = device
    first = infos[ImageRef(Path(usable[int(order[0])].source), usable[int(order[0])].category)]
    probe = pipeline.store.get(pipeline.cache_key, first.key)
    layers = [(name, int(t.shape[1])) for name, t in probe.layers.items()]
    network = aggregator.network_for(layers, list(probe.timesteps)).to(device)
    network.train()
    grid = tuple(int(v) for v in network.size)
    named = list(network.named_parameters())
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=options.lr, weight_decay=options.weight_decay
    )
    if resume_ckpt is not None:
        apply_state(resume_ckpt, network, optimizer, last)
        log(f"resuming from step {state.step} ({last})")
    elif last.exists():  # --restart
        log(f"starting over: replacing {last}")
        last.unlink()

    mode = options.point_rounding
    items: list[TrainPair] = []
    position = {index: k for k, index in enumerate(used_index)}
    for index in used_index:
        pair = usable[index]
        src, tgt, sc, tc = _cells(pipeline, pair, infos, grid, mode)  # type: ignore[arg-type]
        items.append(TrainPair(pair.id, src.key, tgt.key, sc, tc))
    val_items: list[ValPair] = []
    for pair in vals:
        src, tgt, sc, tc = _cells(pipeline, pair, infos, grid, mode)  # type: ignore[arg-type]
        size = pair.target_size if pair.target_size is not None else tgt.size
        val_items.append(ValPair(pair, src.key, tgt.key, sc, tc, size))
    metric = None
    if val_items:
        metric = "pck_bbox" if has_boxes(val_items) else "pck_img"

    info = {
        "pipeline": pipeline.config.resolved(),
        "options": options_dict(options),
        "metric": metric,
        "val_pairs": len(val_items),
    }
    report = TrainReport(
        out=out,
        last=last,
        steps=options.steps,
        start_step=state.step,
        device=str(device),
        pairs=len(usable),
        pairs_used=len(used_index),
        skipped_pairs=len(train_pairs) - len(usable),
        val_pairs=len(val_items),
        metric=metric,
        best=state.best,
        images=len(refs),
        extracted=extracted,
    )

    def run_validation(step: int) -> dict[str, Any]:
        with progress(total=len(val_items), desc=f"validate@{step}", unit="pair") as vbar:
            result = validate(
                pipeline,
                aggregator,
                val_items,
                device=device,
                alpha=options.val_alpha,
                temperature=options.temperature,
                progress=vbar,
            )
        record = {"step": step, **result}
        state.history.append(record)
        value = _metric_value(record, metric)
        best = _metric_value(state.best, metric) if state.best else None
        if value is not None and (best is None or value > best):
            state.best = {"step": step, "metric": metric, "value": value, **result}
            _save_best(out, network, state, info)
        return record

    if state.step < options.steps:
        dataset = PairFeatures(
            pipeline.store.path, pipeline.cache_key, items, _stored_dtype(pipeline, first.key)
        )
        remaining = [position[int(i)] for i in order[state.step :]]
        loader = pair_loader(dataset, remaining, options.workers)
        last_val = state.history[-1] if state.history else None
        with progress(total=options.steps, desc="train", unit="step", initial=state.step) as bar:
            for sample in _guarded(loader, options.workers):
                step = state.step + 1
                # move as read (float16) and cast on the device: half the bytes to copy
                pair = [fs.to(device) for fs in (sample.source, sample.target)]
                desc = aggregator.forward_features(pair)
                if tuple(desc.shape[-2:]) != (grid[1], grid[0]):
                    raise DiffeatError(
                        f"the aggregator returned a {desc.shape[-1]}x{desc.shape[-2]} grid, but "
                        f"its network's size is {grid[0]}x{grid[1]}"
                    )
                loss = correspondence_loss(
                    desc[0],
                    desc[1],
                    sample.source_cells,
                    sample.target_cells,
                    options.temperature,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise DiffeatError(
                        f"the loss became {value} at step {step} (pair "
                        f"{items[sample.index].pair_id}); lower [train] lr or check the features"
                    )
                state.losses.append(value)
                state.step = step
                validating = bool(val_items) and (
                    step == options.steps or (options.val_every and step % options.val_every == 0)
                )
                if validating:
                    last_val = run_validation(step)
                if step == options.steps and not val_items:
                    state.best = {"step": step, "metric": None, "value": None}
                    _save_best(out, network, state, info)
                if (
                    validating
                    or step == options.steps
                    or (options.checkpoint_every and step % options.checkpoint_every == 0)
                ):
                    save_state(last, network, optimizer, state, info)
                postfix = {"loss": f"{np.mean(state.losses[-50:]):.4f}"}
                shown = _metric_value(last_val, metric) if last_val is not None else None
                if shown is not None:
                    postfix["val"] = f"{shown:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    else:
        log(f"{last} is already at step {state.step}: nothing to train")

    report.best = state.best
    report.history = list(state.history)
    report.losses = list(state.losses)
    report.seconds = time.perf_counter() - started
    return report


def _guarded(loader: Any, workers: int) -> Any:
    """Iterate ``loader``; a dead worker gets a message with the likely cause and way out."""
    try:
        yield from loader
    except RuntimeError as exc:
        if workers and "DataLoader worker" in str(exc):
            raise DiffeatError(
                f"a feature-reading worker process died ({exc}). Workers are spawned: a script "
                'calling train() must keep its own code under `if __name__ == "__main__":` '
                "(each worker imports it again); or set [train] workers = 0 (--set "
                "train.workers=0) to read features in this process"
            ) from exc
        raise


def _save_best(out: Path, network: Any, state: TrainState, info: dict[str, Any]) -> None:
    from diffeat.plugins.hyperfeatures.checkpoint import save_checkpoint

    meta = {
        "kind": "best",
        **info,
        "step": state.step,
        "best": state.best,
        "history": state.history,
        "digest": state.digest,
        "cache_key": state.cache_key,
    }
    json.dumps(meta)  # fail here, not half-way through writing, on non-JSON data
    save_checkpoint(out, network, extra={"train": meta})
