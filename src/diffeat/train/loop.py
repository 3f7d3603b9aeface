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

The run is three parts: :func:`~diffeat.train.prepare.prepare_training`
(aggregator, pairs, features, network, resume), :func:`run_steps` (the step
loop, validation and checkpoints) and a
:class:`~diffeat.train.validate.Validator` (scored as the evaluation scores).
Any :class:`~diffeat.core.components.TrainableAggregator` trains the same way:
every checkpoint is written and read through it.

Resuming: the state (weights, AdamW state, history) is written to
``OUT.last.safetensors`` every ``checkpoint_every`` steps and at every
validation; a rerun with the same pipeline, options and pairs continues from
it and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import DataLoader

from diffeat.core.datasets import Pair
from diffeat.core.errors import DiffeatError
from diffeat.train.data import PairFeatures, PairSample, pair_loader
from diffeat.train.loss import correspondence_loss
from diffeat.train.options import TrainOptions
from diffeat.train.prepare import (  # re-exported: the CLI and scripts import them from here
    MissingFeatures,
    TrainingRun,
    pair_order,
    prepare_training,
    run_digest,
    trainable_aggregator,
    training_stage,
)
from diffeat.train.progress import Bar, ProgressFactory, null_progress
from diffeat.train.state import save_best, save_state

if TYPE_CHECKING:
    from diffeat.core.pipeline import Pipeline

__all__ = [
    "MissingFeatures",
    "TrainReport",
    "pair_order",
    "prepare_training",
    "run_digest",
    "run_steps",
    "train",
    "trainable_aggregator",
    "training_stage",
]


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

    @classmethod
    def of(cls, run: TrainingRun) -> TrainReport:
        """What ``run`` did so far."""
        state = run.state
        return cls(
            out=run.out,
            last=run.last,
            steps=run.options.steps,
            start_step=run.start_step,
            device=str(run.device),
            pairs=run.pairs,
            pairs_used=len(run.items),
            skipped_pairs=run.skipped_pairs,
            val_pairs=len(run.validator),
            metric=run.validator.metric,
            best=state.best,
            history=list(state.history),
            losses=list(state.losses),
            images=run.images,
            extracted=run.extracted,
            seconds=time.perf_counter() - run.started,
        )


def train(
    pipeline: Pipeline,
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
    progress = progress or null_progress
    log = log or (lambda _msg: None)
    run = prepare_training(
        pipeline,
        train_pairs,
        val_pairs,
        options,
        out_path,
        progress=progress,
        restart=restart,
        extract=extract,
        missing_hint=missing_hint,
        log=log,
    )
    if run.state.step < options.steps:
        run_steps(run, progress)
    else:
        log(f"{run.last} is already at step {run.state.step}: nothing to train")
    return TrainReport.of(run)


def run_steps(run: TrainingRun, progress: ProgressFactory) -> None:
    """Train from ``run.state.step`` to the last step, validating and saving as the options say."""
    options, state = run.options, run.state
    dataset = PairFeatures(run.reader, run.items)
    loader = pair_loader(dataset, run.order[state.step :], options.workers)
    last_val = state.history[-1] if state.history else None
    with progress(total=options.steps, desc="train", unit="step", initial=state.step) as bar:
        for sample in _guarded(loader, options.workers):
            _step(run, sample)
            step = state.step
            validating = len(run.validator) > 0 and (
                step == options.steps or (options.val_every and step % options.val_every == 0)
            )
            if validating:
                last_val = _validate(run, progress)
            if step == options.steps and not len(run.validator):
                state.best = {"step": step, "metric": None, "value": None}
                save_best(run.out, run.aggregator, state, run.info)
            if (
                validating
                or step == options.steps
                or (options.checkpoint_every and step % options.checkpoint_every == 0)
            ):
                save_state(run.last, run.aggregator, run.network, run.optimizer, state, run.info)
            _show(bar, state.losses, last_val, run.validator.metric)


def _step(run: TrainingRun, sample: PairSample) -> None:
    """One optimiser step on one pair; its loss is appended to the state."""
    state, grid = run.state, run.grid
    step = state.step + 1
    # move as read (float16) and cast on the device: half the bytes to copy
    pair = [fs.to(run.device) for fs in (sample.source, sample.target)]
    desc = run.aggregator.forward_features(pair)
    if tuple(desc.shape[-2:]) != (grid[1], grid[0]):
        raise DiffeatError(
            f"the aggregator returned a {desc.shape[-1]}x{desc.shape[-2]} grid, but "
            f"a {grid[0]}x{grid[1]} one for the first image; every image's descriptors "
            "must have the same grid"
        )
    loss = correspondence_loss(
        desc[0], desc[1], sample.source_cells, sample.target_cells, run.options.temperature
    )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise DiffeatError(
            f"the loss became {value} at step {step} (pair "
            f"{run.items[sample.index].pair_id}); lower [train] lr or check the features"
        )
    state.losses.append(value)
    state.step = step


def _metric_value(record: dict[str, Any] | None, metric: str | None) -> float | None:
    return None if metric is None or record is None else record.get(metric)


def _validate(run: TrainingRun, progress: ProgressFactory) -> dict[str, Any]:
    """Validate at the current step; a new best is written to ``run.out``."""
    state, metric = run.state, run.validator.metric
    step = state.step
    with progress(total=len(run.validator), desc=f"validate@{step}", unit="pair") as vbar:
        result = run.validator(vbar)
    record = {"step": step, **result}
    state.history.append(record)
    value = _metric_value(record, metric)
    best = _metric_value(state.best, metric)
    if value is not None and (best is None or value > best):
        state.best = {"step": step, "metric": metric, "value": value, **result}
        save_best(run.out, run.aggregator, state, run.info)
    return record


def _show(
    bar: Bar, losses: list[float], last_val: dict[str, Any] | None, metric: str | None
) -> None:
    postfix = {"loss": f"{np.mean(losses[-50:]):.4f}"}
    shown = _metric_value(last_val, metric)
    if shown is not None:
        postfix["val"] = f"{shown:.3f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def _guarded(loader: DataLoader, workers: int) -> Iterator[PairSample]:
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
