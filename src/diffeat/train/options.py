"""Options of ``diffeat train``: the ``[train]`` table of a pipeline file.

Validated with the same machinery as plugin options (:mod:`diffeat.core.options`):
an unknown key names the closest valid one and lists them all. Fields marked
``cache=False`` (``steps``, ``checkpoint_every``, ``workers``, ``device``)
cannot change the trained weights, so they are left out of the digest that
guards resuming: a finished run can be continued with more ``steps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from diffeat.core.errors import ConfigError
from diffeat.core.options import build_options, opt, options_dict

TRAIN_TABLE = "train"


@dataclass
class TrainOptions:
    """How to fit a trainable aggregator (Diffusion Hyperfeatures' recipe by default)."""

    steps: int = opt(5000, "optimisation steps, one pair each", cache=False)
    lr: float = opt(1e-3, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    temperature: float = opt(
        0.07, "softmax temperature of the loss: logits = cosine similarity / temperature"
    )
    val_every: int = opt(
        1000,
        "validate after every N completed steps and after the last one (0: after the last only)",
    )
    val_pairs_per_category: int = opt(
        20, "validation subset: the first N pairs of each category of the val split (0: all)"
    )
    val_alpha: float = opt(0.1, "PCK alpha of validation (image and target-box thresholds)")
    checkpoint_every: int = opt(
        250,
        "write the resume state (OUT.last.safetensors) every N steps (0: only at validations)",
        cache=False,
    )
    seed: int = opt(
        0,
        "pair order: numpy RandomState(seed).permutation(pairs), further permutations appended "
        "when there are fewer pairs than steps",
    )
    workers: int = opt(
        2, "DataLoader worker processes reading features (spawned); 0: in this process", cache=False
    )
    point_rounding: Literal["scale", "centres"] = opt(
        "scale",
        "keypoint -> grid cell: scale = x * grid / image size, clip, round half to even (the "
        "official points_to_idxs); centres = diffeat's pixel-centre transform, then round",
    )
    device: str = opt(
        "auto", "torch device of the network; auto: the aggregator's device", cache=False
    )

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        for name in ("val_every", "val_pairs_per_category", "checkpoint_every", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.val_alpha > 0:
            raise ValueError(f"val_alpha must be positive, got {self.val_alpha}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    f"device {self.device!r} is not a torch device (use auto, cpu, cuda, cuda:1)"
                ) from None


def train_options(values: dict[str, Any] | None, where: str) -> TrainOptions:
    """Validate a raw ``[train]`` table (``None``: every default) into :class:`TrainOptions`."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where}: [{TRAIN_TABLE}] must be a table")
    options = build_options(TrainTable, dict(values or {}), f"{where}: [{TRAIN_TABLE}]")
    assert isinstance(options, TrainOptions)
    return options


def digest_options(options: TrainOptions) -> dict[str, Any]:
    """The options that shape the trained weights (what resuming must find unchanged)."""
    return options_dict(options, cache_only=True)


class TrainTable:
    """The ``[train]`` table as option machinery sees a plugin: its ``Options`` are
    :class:`TrainOptions` (for ``build_options`` and the generated config reference)."""

    Options = TrainOptions
