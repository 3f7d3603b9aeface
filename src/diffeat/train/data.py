"""Training pairs as a torch ``Dataset``: stored features of both images plus keypoint cells.

The dataset reads through a :class:`~diffeat.core.sources.StoredFeatures`
(from ``FeatureSource.reader``): the store's location and the extractor's
key, never an open handle, so every DataLoader worker opens the store
read-only on first use. Workers are started with ``spawn`` (forking a process
whose zarr event-loop thread is running is not safe), which is why everything
here is defined at module level and picklable. The keypoints' grid cells are
computed once, in the main process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffeat.core.features import FeatureSet
from diffeat.core.sources import StoredFeatures


@dataclass(frozen=True)
class TrainPair:
    """One training pair as the loop needs it: both images' store keys and the
    flat grid-cell indices ``[N]`` of its corresponding keypoints."""

    pair_id: str
    source_key: str
    target_key: str
    source_cells: np.ndarray
    target_cells: np.ndarray


@dataclass
class PairSample:
    """What the loader yields per step: the pair's position and both feature sets."""

    index: int
    source: FeatureSet
    target: FeatureSet
    source_cells: torch.Tensor
    target_cells: torch.Tensor


class PairFeatures(Dataset):
    """Stored features of training pairs, read lazily through ``reader``.

    The reader's ``dtype`` is the dtype features are read in (``"float16"``
    for a float16 store: half the bytes between processes; the network casts
    to float32 on its device). The reader opens the store read-only once per
    process, so spawned workers each get their own handle.
    """

    def __init__(
        self,
        reader: StoredFeatures,
        pairs: Sequence[TrainPair],
    ) -> None:
        self.reader = reader
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PairSample:
        pair = self.pairs[index]
        return PairSample(
            index,
            self.reader.get(pair.source_key),
            self.reader.get(pair.target_key),
            torch.from_numpy(np.asarray(pair.source_cells, dtype=np.int64)),
            torch.from_numpy(np.asarray(pair.target_cells, dtype=np.int64)),
        )


def first_item(batch: list[PairSample]) -> PairSample:
    """The collate function of ``batch_size=1``: the sample itself, not a stacked batch."""
    return batch[0]


def pair_loader(dataset: PairFeatures, order: Sequence[int], workers: int) -> DataLoader:
    """A loader yielding ``dataset[i]`` for each ``i`` of ``order``, in that order.

    ``workers > 0`` reads ahead in that many spawned processes (the order is kept).
    """
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"multiprocessing_context": "spawn", "prefetch_factor": 2}
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=[int(i) for i in order],
        num_workers=workers,
        collate_fn=first_item,
        **extra,
    )
