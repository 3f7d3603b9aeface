"""Which images of a dataset's pairs ``diffeat train`` has in the pipeline's store.

The images themselves (:class:`~diffeat.core.datasets.ImageRef`, each once with
its category, loaded only when needed) are part of the dataset contract in
:mod:`diffeat.core.datasets`; this module adds what training needs of them:
their store keys and sizes, and which are not stored yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from diffeat.core.datasets import ImageInfo, ImageRef

if TYPE_CHECKING:
    from diffeat.core.sources import FeatureSource, Progress


def index_images(
    source: FeatureSource, refs: Sequence[ImageRef], *, progress: Progress | None = None
) -> dict[ImageRef, ImageInfo]:
    """Store key (``source``'s) and size of every image (each decoded once, its pixels dropped)."""
    out: dict[ImageRef, ImageInfo] = {}
    for ref in refs:
        inp = ref.load()
        out[ref] = ImageInfo(source.image_key(inp), inp.size)
        if progress is not None:
            progress.update(1)
    return out


def missing_images(source: FeatureSource, infos: dict[ImageRef, ImageInfo]) -> list[ImageRef]:
    """The images whose features are not (completely) stored for ``source``'s extractor."""
    return [ref for ref, info in infos.items() if not source.has_key(info.key)]
