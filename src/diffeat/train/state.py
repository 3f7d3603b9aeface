"""The resume state of a training run: ``OUT.last.safetensors`` next to the best checkpoint.

One file, written by the trainable aggregator's ``save`` (atomically, for the
hyperfeatures aggregator: one safetensors file), holds the network's weights, the AdamW state of every parameter as
``train.adamw.<param>.{exp_avg,exp_avg_sq,step}`` tensors, and JSON metadata
``{"train": {...}}``: the step reached, the validation history, the best
result so far, the per-step losses, a digest of everything that shapes the
weights, and the extractor's cache key. A run resumes only when the digest
matches, so a resumed run ends with the weights of an uninterrupted one.

The best network goes to ``OUT`` through the same ``save``, with metadata
``{"train": {"kind": "best", ...}}``. Nothing here knows a checkpoint format:
every file is written and read through the
:class:`~diffeat.core.components.TrainableAggregator` capability.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffeat.core.components import TrainableAggregator, TrainingCheckpoint
from diffeat.core.errors import DiffeatError

SUFFIX = ".safetensors"
LAST_SUFFIX = ".last.safetensors"
ADAMW = "adamw."
_SLOTS = ("exp_avg", "exp_avg_sq", "step")


def last_path(out: str | os.PathLike[str]) -> Path:
    """``aggnet.safetensors`` -> ``aggnet.last.safetensors`` (any other name gets the suffix)."""
    out = Path(out)
    stem = out.name[: -len(SUFFIX)] if out.name.endswith(SUFFIX) else out.name
    return out.with_name(stem + LAST_SUFFIX)


@dataclass
class TrainState:
    """Where a run stands after ``step`` completed steps."""

    step: int = 0
    digest: str = ""
    cache_key: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "digest": self.digest,
            "cache_key": self.cache_key,
            "history": self.history,
            "best": self.best,
            "losses": self.losses,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            step=int(d["step"]),
            digest=str(d["digest"]),
            cache_key=str(d.get("cache_key", "")),
            history=list(d.get("history") or []),
            best=d.get("best"),
            losses=[float(v) for v in d.get("losses") or []],
        )


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]]
) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state by parameter name (empty before the first step)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in named:
        state = optimizer.state.get(param, {})
        for slot in _SLOTS:
            if slot in state:
                value = state[slot]
                out[f"{ADAMW}{name}.{slot}"] = torch.as_tensor(value).detach().cpu()
    return out


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, torch.nn.Parameter]],
    tensors: dict[str, torch.Tensor],
    where: Path,
) -> None:
    """Load what :func:`optimizer_tensors` saved into a freshly built ``optimizer``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, (name, _) in enumerate(named):
        slots = {s: tensors.get(f"{ADAMW}{name}.{s}") for s in _SLOTS}
        present = [s for s, v in slots.items() if v is not None]
        if not present:
            continue
        if len(present) != len(_SLOTS):
            raise DiffeatError(
                f"{where}: the optimizer state of {name!r} is incomplete; the file is damaged, "
                "rerun with --restart"
            )
        state[index] = {s: v.clone() for s, v in slots.items() if v is not None}
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_state(
    path: Path,
    aggregator: TrainableAggregator,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    info: dict[str, Any],
) -> None:
    """Write the resume state (``network``, its AdamW state, metadata) through ``aggregator``."""
    named = list(network.named_parameters())
    aggregator.save(
        path,
        extra={"train": {"kind": "resume-state", **info, **state.to_dict()}},
        tensors=optimizer_tensors(optimizer, named),
    )


def save_best(
    out: Path, aggregator: TrainableAggregator, state: TrainState, info: dict[str, Any]
) -> None:
    """Write the aggregator's network as the run's best, with the history so far."""
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
    aggregator.save(out, extra={"train": meta})


def read_state(
    aggregator: TrainableAggregator, path: Path
) -> tuple[TrainState, TrainingCheckpoint]:
    """The state recorded in ``path`` and the checkpoint read (weights not applied yet)."""
    ckpt = aggregator.read_checkpoint(path)
    meta = ckpt.extra.get("train")
    if not isinstance(meta, dict) or meta.get("kind") != "resume-state":
        raise DiffeatError(
            f"{path} is not the resume state of `diffeat train` (no train metadata); move it "
            "away, choose another --out, or rerun with --restart to overwrite it"
        )
    try:
        return TrainState.from_dict(meta), ckpt
    except (KeyError, TypeError, ValueError) as exc:
        raise DiffeatError(
            f"{path}: damaged train metadata ({exc!r}); rerun with --restart to start over"
        ) from None


def apply_state(
    ckpt: TrainingCheckpoint,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    where: Path,
) -> None:
    """Load the checkpoint's weights into ``network`` and its AdamW state into ``optimizer``."""
    try:
        network.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise DiffeatError(
            f"{where} does not fit this network ({str(exc).splitlines()[0]}); rerun with "
            "--restart to start over"
        ) from None
    restore_optimizer(optimizer, list(network.named_parameters()), ckpt.tensors, where)
