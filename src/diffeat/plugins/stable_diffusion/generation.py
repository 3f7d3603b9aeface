"""Sampling images with a generation-mode pipeline, keeping the features captured meanwhile.

:func:`generate_images` is what ``diffeat generate`` runs: each sampled image is
saved as PNG and its features go into the pipeline's store under that image's
key, so matching or evaluating the saved images with the same config reads
them instead of extracting.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffeat.core.components import is_generating
from diffeat.core.errors import DiffeatError
from diffeat.core.options import options_dict

if TYPE_CHECKING:
    from diffeat.core.pipeline import Pipeline


@dataclass(frozen=True)
class GeneratedImage:
    """One sampled image: where it was saved and the noise seed it came from."""

    path: Path
    seed: int


def image_name(prompt: str, seed: int) -> str:
    """A file name from the prompt's first words and the seed (``a-photo-of-a-cat-7.png``)."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-")
    return f"{words or 'unconditional'}-{seed}.png"


def generate_images(
    pipeline: Pipeline,
    count: int,
    seed: int,
    out_dir: str | Path,
    *,
    on_image: Callable[[GeneratedImage], None] | None = None,
) -> list[GeneratedImage]:
    """Sample ``count`` images with seeds ``seed``, ``seed + 1``, ... and save them in ``out_dir``.

    Files are named by :func:`image_name` from the extractor's ``prompt`` option.
    With a store, each image's features are stored under the saved file's key.
    ``on_image`` is called after each image is saved (progress output).
    A :class:`~diffeat.core.errors.DiffeatError` if the pipeline's extractor
    cannot generate (see :class:`~diffeat.core.components.GeneratingExtractor`).
    """
    extractor = pipeline.extractor
    if not is_generating(extractor):
        raise DiffeatError(
            f"{pipeline.config.source}: the extractor {pipeline.config.extractor.plugin!r} "
            f"cannot generate images; use the "
            f'stable-diffusion extractor with mode = "generation"'
        )
    prompt = str(options_dict(pipeline.config.extractor.options).get("prompt", ""))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        image, features = extractor.generate(seed + i)
        item = GeneratedImage(folder / image_name(prompt, seed + i), seed + i)
        image.save(item.path)
        if pipeline.store is not None:
            pipeline.source.put(item.path, features)
        made.append(item)
        if on_image is not None:
            on_image(item)
    return made
