"""Which images of a dataset's pairs ``diffeat train`` has in the pipeline's store.

The images themselves (:class:`~diffeat.core.datasets.ImageRef`, each once with
its category, loaded only when needed) are part of the dataset contract in
:mod:`diffeat.core.datasets`; this module adds what training needs of them:
their store keys and sizes, and which are not stored yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffeat.core.datasets import ImageInfo, ImageRef


def index_images(
    pipeline: Any, refs: Sequence[ImageRef], *, progress: Any = None
) -> dict[ImageRef, ImageInfo]:
    """Store key and size of every image (each decoded once, its pixels dropped after)."""
    out: dict[ImageRef, ImageInfo] = {}
    for ref in refs:
        inp = ref.load()
        out[ref] = ImageInfo(pipeline.image_key(inp), inp.size)
        if progress is not None:
            progress.update(1)
    return out


def missing_images(
    pipeline: Any, infos: dict[ImageRef, ImageInfo], *, cache_key: str | None = None
) -> list[ImageRef]:
    """The images whose features are not (completely) in the pipeline's store."""
    store = pipeline.store
    key = cache_key or pipeline.cache_key
    return [ref for ref, info in infos.items() if not store.has(key, info.key)]
