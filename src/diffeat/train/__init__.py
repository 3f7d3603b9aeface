"""Training a trainable aggregator (Diffusion Hyperfeatures) from stored features.

- :mod:`diffeat.train.options`: :class:`TrainOptions`, the ``[train]`` table;
- :mod:`diffeat.train.loss`: the symmetric contrastive loss and keypoint -> cell rounding;
- :mod:`diffeat.train.images`: the images of a dataset's pairs, their keys, lazy loading;
- :mod:`diffeat.train.data`: the pairs as a torch ``Dataset`` (spawned DataLoader workers);
- :mod:`diffeat.train.validate`: :class:`~diffeat.train.validate.Validator`, validation PCK
  through the pipeline's matcher, scored as the evaluation scores;
- :mod:`diffeat.train.state`: the resume state next to the best checkpoint, both written and
  read through the trainable-aggregator capability;
- :mod:`diffeat.train.progress`: what training needs of a progress bar;
- :mod:`diffeat.train.prepare`: :func:`~diffeat.train.prepare.prepare_training`, everything
  before the first step;
- :mod:`diffeat.train.loop`: :func:`train` (prepare, then :func:`~diffeat.train.loop.run_steps`).

Importing this package imports nothing heavy; the names below load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MissingFeatures",
    "TrainOptions",
    "TrainReport",
    "correspondence_loss",
    "keypoint_cells",
    "train",
    "train_options",
]

_WHERE = {
    "MissingFeatures": "diffeat.train.prepare",
    "TrainReport": "diffeat.train.loop",
    "train": "diffeat.train.loop",
    "TrainOptions": "diffeat.train.options",
    "train_options": "diffeat.train.options",
    "correspondence_loss": "diffeat.train.loss",
    "keypoint_cells": "diffeat.train.loss",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'diffeat.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
