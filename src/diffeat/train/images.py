"""The images of a dataset's pairs: each once, with its category, loaded only when needed.

Used by ``diffeat train`` (which images must be in the store) and
``diffeat extract --dataset`` (extract them). An image is identified by its
path and the pair's category, since a ``{category}`` prompt makes its features
(and so its store key) depend on the category.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from diffeat.core.errors import ImageError
from diffeat.core.geometry import Size
from diffeat.core.images import ImageInput, as_input
from diffeat.plugins.datasets.schema import Pair

if TYPE_CHECKING:
    from diffeat.core.sources import FeatureSource, Progress


@dataclass(frozen=True)
class ImageRef:
    """One image of a dataset as the extractor sees it: a file and the pair's category."""

    path: Path
    category: str = ""

    def load(self) -> ImageInput:
        return as_input(self.path).with_category(self.category)


@dataclass(frozen=True)
class ImageInfo:
    """What training needs of an image without keeping its pixels: store key and size."""

    key: str
    size: Size


def pair_images(pairs: Iterable[Pair]) -> list[ImageRef]:
    """Every image of ``pairs`` once (sources and targets, first-seen order), with its category."""
    seen: dict[ImageRef, None] = {}
    for pair in pairs:
        for path in (pair.source, pair.target):
            seen.setdefault(ImageRef(Path(path), pair.category), None)
    return list(seen)


class LazyImages(Sequence[Any]):
    """A sequence of images decoded on access (a pipeline's ``extract`` takes it as a list),
    so that extracting thousands of images never holds all their pixels at once.

    An unreadable image comes back as its path, so the pipeline reports it (and
    extracts the others) instead of stopping.
    """

    def __init__(self, refs: Sequence[ImageRef]) -> None:
        self.refs = list(refs)

    def __len__(self) -> int:
        return len(self.refs)

    @overload
    def __getitem__(self, index: int) -> ImageInput | str: ...

    @overload
    def __getitem__(self, index: slice) -> LazyImages: ...

    def __getitem__(self, index: int | slice) -> ImageInput | LazyImages | str:
        if isinstance(index, slice):
            return LazyImages(self.refs[index])
        ref = self.refs[index]
        try:
            return ref.load()
        except ImageError:
            # the path itself: the pipeline loads it again and reports the error per image
            # (an unreadable file has no features, so its lost category does not matter)
            return str(ref.path)


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
