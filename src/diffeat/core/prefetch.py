"""How ``extract`` feeds one device: settings, and images decoded and preprocessed ahead.

:class:`ExtractSettings` holds the knobs of an extraction run that change speed, never
results beyond float rounding: images per extractor call, DataLoader worker processes
for decoding and preprocessing, the background writer's memory bound, pinned memory.

:func:`prepared_inputs` yields every input in order as a :class:`Prepared`: the decoded
image (or the reason it could not be read) and, for a
:class:`~diffeat.core.components.PreprocessingExtractor`, its model input. With
``workers > 0`` both happen in worker processes (started with ``spawn``: forking after
zarr started its event loop can deadlock), ahead of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.data

from diffeat.core.errors import ConfigError, ImageError
from diffeat.core.images import ImageInput, ImageLike, as_input

__all__ = ["DEFAULT_WRITE_QUEUE_MB", "ExtractSettings", "Prepared", "prepared_inputs"]

#: the background writer's default bound: features computed but not yet stored
DEFAULT_WRITE_QUEUE_MB = 1024


@dataclass
class ExtractSettings:
    """Throughput settings of an extraction run (none of them is part of the store key).

    - ``batch_size``: images per extractor call; ``None``: the extractor's own
      ``batch_size`` (its config's). The Stable Diffusion extractor runs
      ``batch_size x ensemble_size`` UNet inputs per pass.
    - ``workers``: DataLoader worker processes that decode, hash and preprocess images
      ahead of the model; 0: all in the main process, just before each batch.
    - ``write_queue_mb``: the most MiB of computed features waiting for (or being
      written by) the background writer; 0: write each entry before computing the next
      batch.
    - ``pin_memory``: stage each batch's pixels in pinned memory and copy them to the GPU
      without blocking; ``None``: when the extractor is on CUDA.
    """

    batch_size: int | None = None
    workers: int = 0
    write_queue_mb: float = DEFAULT_WRITE_QUEUE_MB
    pin_memory: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(
                f"workers must be >= 0 (0: decode in this process), got {self.workers}"
            )
        if self.write_queue_mb < 0:
            raise ConfigError(
                f"the write queue must be >= 0 MiB (0: write before the next batch), got "
                f"{self.write_queue_mb}"
            )

    @property
    def write_queue_bytes(self) -> int:
        return int(self.write_queue_mb * 2**20)


@dataclass
class Prepared:
    """One input, decoded (``image``) or not (``error``), with its model input when the
    extractor preprocesses apart (``pixels``, ``[3, H, W]`` float32 on the CPU)."""

    index: int
    item: str
    image: ImageInput | None = None
    pixels: torch.Tensor | None = None
    error: str = ""


def _describe(item: Any) -> str:
    return str(item) if not isinstance(item, ImageInput) else item.source


def prepare(
    index: int, item: ImageLike, preprocess: Callable[[ImageInput], torch.Tensor] | None
) -> Prepared:
    """Decode (and preprocess) one input; an unreadable image becomes ``error``."""
    try:
        inp = as_input(item)
    except ImageError as exc:
        return Prepared(index, _describe(item), error=str(exc))
    pixels = preprocess(inp) if preprocess is not None else None
    return Prepared(index, inp.source, inp, pixels)


class _Inputs(torch.utils.data.Dataset):
    """The inputs as a map-style dataset whose items are :class:`Prepared` (picklable)."""

    def __init__(
        self,
        items: Sequence[ImageLike],
        preprocess: Callable[[ImageInput], torch.Tensor] | None,
    ) -> None:
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Prepared:
        return prepare(index, self.items[index], self.preprocess)


def _as_is(sample: Prepared) -> Prepared:
    return sample


def prepared_inputs(
    items: Sequence[ImageLike],
    preprocess: Callable[[ImageInput], torch.Tensor] | None,
    *,
    workers: int = 0,
    ahead: int = 2,
) -> Iterator[Prepared]:
    """Every input in order, decoded and (with ``preprocess``) preprocessed; with
    ``workers`` spawned worker processes keeping about ``ahead`` inputs ready."""
    if workers == 0:
        for index in range(len(items)):
            yield prepare(index, items[index], preprocess)
        return
    loader = torch.utils.data.DataLoader(
        _Inputs(items, preprocess),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
        multiprocessing_context="spawn",
        prefetch_factor=max(2, math.ceil(ahead / workers)),
    )
    yield from loader
