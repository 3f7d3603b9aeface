"""The dataset contract: the one pair schema every dataset plugin yields, the
:class:`Dataset` a plugin's factory returns, and the images of a dataset's pairs.

A dataset plugin is registered with ``register_datasets(register)``; its
factory takes validated options (a dataclass ``Options`` with at least
``root`` and ``split``) and returns a :class:`Dataset`: an object with
:meth:`Dataset.pairs` and :meth:`Dataset.describe`, and the class attributes
``title``, ``url``, ``layout`` and ``default_protocol`` that ``diffeat
datasets`` lists. The built-in datasets inherit :class:`Dataset`; a plugin
need not, and :func:`card_of` / :func:`description_of` are the one place that
reads these declarations from an object that does not (with the base class's
defaults), so that nothing else probes a dataset.

Coordinates follow the library convention (``diffeat.core.geometry``): points
are ``(x, y)`` pixel indices, the centre of the top-left pixel is ``(0, 0)``.
Boxes are ``(x0, y0, x1, y1)`` in the same coordinates; a box given with
``x1 < x0`` or ``y1 < y0`` is normalised (corners sorted), never rejected,
because only its side lengths enter a PCK threshold.

An image of a dataset is identified by its path and the pair's category
(:class:`ImageRef`), since a ``{category}`` prompt makes its features (and so
its store key) depend on the category; :func:`pair_images` lists each once and
:class:`LazyImages` decodes them only when a pipeline asks.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np

from diffeat.core.errors import DiffeatError, ImageError
from diffeat.core.geometry import Size
from diffeat.core.images import ImageInput, as_input
from diffeat.core.options import options_dict

Box = tuple[float, float, float, float]

#: the task kinds a dataset can declare (:attr:`Dataset.task`): image pairs with keypoints
#: (PCK), sequences of images related by homographies, videos with labels to propagate
TASKS = ("pairs", "homography", "propagation")

__all__ = [
    "Box",
    "Dataset",
    "DatasetCard",
    "DatasetOptions",
    "ImageInfo",
    "ImageRef",
    "LazyImages",
    "Pair",
    "Size",
    "TASKS",
    "card_of",
    "description_of",
    "inside_root",
    "normalise_box",
    "pair_images",
]


def _absolute(text: str) -> bool:
    unix = text.replace("\\", "/")
    return (
        Path(text).is_absolute()
        or unix.startswith("/")
        or (len(unix) > 1 and unix[1] == ":")  # a Windows drive: C:/x, C:x
    )


def inside_root(root: Path, relative: str | os.PathLike[str] | Sequence[str], what: str) -> Path:
    """``root / relative`` for a path read from an annotation, refused when it leaves ``root``.

    Annotations are data, not trusted paths: an absolute path (``/etc/passwd``,
    ``C:\\x``, ``\\\\server\\share``) or ``..`` parts that climb out of the root would
    make diffeat read (and store features of) files outside the dataset. ``relative``
    is one path or the parts of one (``("JPEGImages", category, name)``: each part
    read from an annotation is checked, as ``Path`` would let an absolute part
    replace the ones before it). The check is on the written path (``..`` resolved
    lexically, backslashes read as separators), so a dataset whose folders are
    symlinks to another disk still works. ``what`` names where the value came from
    (the annotation file and field); the :class:`DiffeatError` names it, the value
    and the root.
    """
    parts = [os.fspath(relative)] if isinstance(relative, (str, os.PathLike)) else list(relative)
    text = "/".join(parts)
    unix = text.replace("\\", "/")
    normal = posixpath.normpath(unix) if unix else "."
    escapes = (
        any(_absolute(part) for part in parts)
        or normal == ".."
        or normal.startswith("../")
        or "\0" in text
    )
    if escapes:
        shown = next((part for part in parts if _absolute(part)), text)
        raise DiffeatError(
            f"{what}: the path {shown!r} points outside the dataset root {root}; annotation "
            "paths must be relative and stay under the root (is this annotation file damaged, "
            "or written for another layout?)"
        )
    return root / normal


def normalise_box(box: Sequence[float] | None) -> Box | None:
    """``(x0, y0, x1, y1)`` with sorted corners; ``None`` stays ``None``."""
    if box is None:
        return None
    values = [float(v) for v in box]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"a box is 4 finite numbers (x0, y0, x1, y1), got {list(box)!r}")
    x0, y0, x1, y1 = values
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _points(value: Any, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} must be [N, 2] (x, y), got shape {tuple(arr.shape)}")
    return arr


def _size(value: Sequence[int] | None) -> Size | None:
    if value is None:
        return None
    w, h = (int(v) for v in list(value)[:2])
    if w <= 0 or h <= 0:
        raise ValueError(f"an image size is (width, height) > 0, got {list(value)!r}")
    return (w, h)


@dataclass
class Pair:
    """One annotated image pair.

    ``visible[i]`` is true when keypoint ``i`` is annotated in *both* images;
    only those keypoints are matched and scored. ``source_size`` /
    ``target_size`` are ``(width, height)`` from the annotation (``None`` when
    the benchmark gives none; the evaluation then reads them from the files).
    ``flags`` holds benchmark extras, e.g. SPair's ``viewpoint_variation``,
    ``scale_variation``, ``truncation``, ``occlusion`` and ``mirror``.
    """

    id: str
    source: Path
    target: Path
    category: str
    source_points: np.ndarray
    target_points: np.ndarray
    visible: np.ndarray | None = None
    source_bbox: Box | None = None
    target_bbox: Box | None = None
    source_size: Size | None = None
    target_size: Size | None = None
    keypoint_ids: list[str] | None = None
    flags: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source = Path(self.source)
        self.target = Path(self.target)
        self.source_points = _points(self.source_points, f"pair {self.id}: source points")
        self.target_points = _points(self.target_points, f"pair {self.id}: target points")
        n = len(self.source_points)
        if len(self.target_points) != n:
            raise ValueError(
                f"pair {self.id}: {n} source points but {len(self.target_points)} target points"
            )
        if self.visible is None:
            self.visible = np.ones(n, dtype=bool)
        else:
            self.visible = np.asarray(self.visible, dtype=bool).reshape(-1)
            if len(self.visible) != n:
                raise ValueError(
                    f"pair {self.id}: visibility has {len(self.visible)} entries for {n} keypoints"
                )
        self.source_bbox = normalise_box(self.source_bbox)
        self.target_bbox = normalise_box(self.target_bbox)
        self.source_size = _size(self.source_size)
        self.target_size = _size(self.target_size)
        if self.keypoint_ids is not None:
            self.keypoint_ids = [str(k) for k in self.keypoint_ids]
            if len(self.keypoint_ids) != n:
                raise ValueError(
                    f"pair {self.id}: {len(self.keypoint_ids)} keypoint ids for {n} keypoints"
                )

    @property
    def num_points(self) -> int:
        return len(self.source_points)

    @property
    def num_visible(self) -> int:
        assert self.visible is not None
        return int(self.visible.sum())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists, not arrays)."""
        return {
            "id": self.id,
            "source": str(self.source),
            "target": str(self.target),
            "category": self.category,
            "source_points": self.source_points.tolist(),
            "target_points": self.target_points.tolist(),
            "visible": [bool(v) for v in self.visible],  # type: ignore[union-attr]
            "source_bbox": list(self.source_bbox) if self.source_bbox else None,
            "target_bbox": list(self.target_bbox) if self.target_bbox else None,
            "source_size": list(self.source_size) if self.source_size else None,
            "target_size": list(self.target_size) if self.target_size else None,
            "keypoint_ids": self.keypoint_ids,
            "flags": dict(self.flags),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pair:
        return cls(
            id=str(d["id"]),
            source=Path(d["source"]),
            target=Path(d["target"]),
            category=str(d.get("category", "")),
            source_points=d["source_points"],
            target_points=d["target_points"],
            visible=d.get("visible"),
            source_bbox=d.get("source_bbox"),
            target_bbox=d.get("target_bbox"),
            source_size=d.get("source_size"),
            target_size=d.get("target_size"),
            keypoint_ids=d.get("keypoint_ids"),
            flags=dict(d.get("flags") or {}),
        )


class DatasetOptions(Protocol):
    """What every dataset's ``Options`` dataclass has (plus its own fields)."""

    #: the benchmark's folder (``--root``)
    root: str
    #: the split to read (``--split``)
    split: str


class Dataset:
    """The dataset contract, and the base class of the built-in datasets.

    A dataset yields its :class:`Pair` s from :meth:`pairs` (iterating it does
    the same) and says what ``results.json`` records about it with
    :meth:`describe`. Class attributes document the benchmark for ``diffeat
    datasets``: ``title``, ``url`` (where to get it), ``layout`` (what the
    loader expects under ``root``) and ``default_protocol`` (the name of a PCK
    protocol, see :mod:`diffeat.eval.protocols`, that ``diffeat eval`` uses
    when neither ``--protocol`` nor the pipeline file names one).

    A plugin need not inherit this class, but must then provide :meth:`pairs`;
    :func:`card_of` and :func:`description_of` give the defaults below for
    whatever else it leaves out. :meth:`root_dir` and :meth:`missing` are
    helpers for loaders: the error messages every benchmark gives alike.
    """

    title: str = ""
    url: str = ""
    layout: str = ""
    default_protocol: str = "dift"
    #: the kind of task (see :data:`TASKS`): ``"pairs"`` datasets yield :class:`Pair` s from
    #: :meth:`pairs`; a ``"homography"`` or ``"propagation"`` dataset yields its own records
    #: (image sequences, videos) and ``diffeat eval`` runs the matching task of
    #: :mod:`diffeat.eval.tasks` on it
    task: str = "pairs"

    def __init__(self, options: DatasetOptions) -> None:
        self.options = options

    def pairs(self) -> Iterator[Pair]:
        """Every annotated pair of the split, in a stable order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Pair]:
        return self.pairs()

    def describe(self) -> dict[str, Any]:
        """What ``results.json`` records about the dataset."""
        return {"title": self.title, "url": self.url, "options": options_dict(self.options)}

    # -- helpers for loaders ------------------------------------------------------

    def root_dir(self) -> Path:
        """``options.root`` as an existing folder, or a :class:`DiffeatError` saying what to pass."""
        raw = str(self.options.root or "")
        if not raw:
            raise DiffeatError(
                f"the {self.title} dataset needs its folder: pass --root DIR "
                f"(get the benchmark from {self.url})"
            )
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise DiffeatError(
                f"{self.title}: {root} is not a folder; pass --root the folder that contains "
                f"{self.layout_summary()} (get the benchmark from {self.url})"
            )
        return root

    def layout_summary(self) -> str:
        """The first line of :attr:`layout` (``"the benchmark"`` when there is none)."""
        return self.layout.strip().splitlines()[0] if self.layout.strip() else "the benchmark"

    def missing(self, root: Path, what: list[str]) -> DiffeatError:
        """The error for missing files, naming each one and where the benchmark comes from."""
        listed = ", ".join(what)
        hint = ""
        nested = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        for sub in nested:
            if all((sub / w.rstrip("/").split("/")[0]).exists() for w in what):
                hint = f" (it looks like the benchmark is in {sub}: pass --root {sub})"
                break
        return DiffeatError(
            f"{self.title} at {root} is missing {listed}{hint}. Expected layout: "
            f"{' '.join(self.layout.split())} Get the benchmark from {self.url}"
        )


@dataclass(frozen=True)
class DatasetCard:
    """What ``diffeat datasets`` shows of a dataset: its class attributes, whitespace-folded layout."""

    title: str = Dataset.title
    url: str = Dataset.url
    layout: str = Dataset.layout
    default_protocol: str = Dataset.default_protocol
    task: str = Dataset.task


def card_of(dataset: object) -> DatasetCard:
    """The declared ``title``, ``url``, ``layout`` and ``default_protocol`` of a dataset or
    of its factory (a registered class), with :class:`Dataset`'s defaults for any it does not
    declare. The one place that reads them from an object that need not inherit :class:`Dataset`.
    """
    return DatasetCard(
        title=str(getattr(dataset, "title", Dataset.title)),
        url=str(getattr(dataset, "url", Dataset.url)),
        layout=" ".join(str(getattr(dataset, "layout", Dataset.layout)).split()),
        default_protocol=str(getattr(dataset, "default_protocol", Dataset.default_protocol)),
        task=str(getattr(dataset, "task", Dataset.task)),
    )


def description_of(dataset: object) -> dict[str, Any]:
    """:meth:`Dataset.describe` of ``dataset``; ``{}`` for one that does not describe itself."""
    describe = getattr(dataset, "describe", None)
    return dict(describe()) if describe is not None else {}


# -- the images of a dataset's pairs ------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """One image of a dataset as the extractor sees it: a file and the pair's category."""

    path: Path
    category: str = ""

    def load(self) -> ImageInput:
        """The decoded image, tagged with its category (a :class:`ImageError` if unreadable)."""
        return as_input(self.path, orientation="raw").with_category(self.category)


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


class LazyImages(Sequence[ImageInput | str]):
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
