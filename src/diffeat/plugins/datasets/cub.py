"""CUB-200-2011 (Wah et al. 2011): the ``cub`` dataset.

Layout (as distributed in ``CUB_200_2011.tgz``)::

    CUB_200_2011/
      images/<NNN.Class_Name>/<image>.jpg
      images.txt                 <image_id> <relative path under images/>
      classes.txt                <class_id> <NNN.Class_Name>
      image_class_labels.txt     <image_id> <class_id>
      train_test_split.txt       <image_id> <is_training_image>
      bounding_boxes.txt         <image_id> <x> <y> <width> <height>
      parts/part_locs.txt        <image_id> <part_id> <x> <y> <visible>   (15 parts)

CUB has no pair list, so pairs are drawn by a documented, seeded rule:

1. Take the images of the split (``test``: ``is_training_image == 0``), per
   class in class-id order, each class's images in image-id order; with
   ``max_classes = K`` only classes ``1..K``.
2. Candidates are all unordered pairs ``(a, b)`` with ``id(a) < id(b)``
   (``a`` is the source) sharing at least ``min_common_parts`` visible parts.
3. With ``pairs_per_class = k > 0`` and more than ``k`` candidates, keep
   ``k`` of them drawn without replacement by
   ``numpy.random.default_rng([seed, class_id]).choice(len(candidates), k,
   replace=False)``, in candidate order; ``pairs_per_class = 0`` keeps all.

A keypoint is scored only where the part is visible in both images.
Coordinates: the README says "pixel location of the center of the part"
without naming an origin. The evaluations we reproduce (Hedlin et al., SD-DINO
/ GeoAware loaders, Diffusion Hyperfeatures) use the numbers unchanged as
pixel indices, so that is the default; ``one_based = true`` subtracts 1 from
part locations and box corners if you treat them as MATLAB-style 1-based.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffeat.core.datasets import Dataset, Pair, inside_root
from diffeat.core.errors import DiffeatError
from diffeat.core.options import opt
from diffeat.plugins.datasets.pfwillow import image_size

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)"
NUM_PARTS = 15
REQUIRED = (
    "images/",
    "images.txt",
    "classes.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "parts/part_locs.txt",
)


@dataclass
class CUBOptions:
    root: str = opt("", "the CUB_200_2011 folder (with images/, images.txt, parts/, ...)")
    split: str = opt("test", "test, train or all")
    pairs_per_class: int = opt(10, "pairs drawn per class (0: every candidate pair)")
    seed: int = opt(0, "seed of the per-class draw")
    min_common_parts: int = opt(3, "a pair needs at least this many parts visible in both")
    max_classes: int = opt(0, "only classes 1..K (0: all 200)")
    one_based: bool = opt(
        False, "treat part locations and boxes as 1-based and subtract 1 (default: unchanged)"
    )

    def validate(self) -> None:
        if self.split not in ("test", "train", "all"):
            raise ValueError(f"split must be test, train or all, got {self.split!r}")
        if self.pairs_per_class < 0 or self.min_common_parts < 0 or self.max_classes < 0:
            raise ValueError("pairs_per_class, min_common_parts and max_classes must be >= 0")


def _read_table(path: Path, columns: int, numeric: int = 1) -> list[list[str]]:
    """Whitespace-separated rows of ``columns`` columns, the first ``numeric`` of them numbers."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffeatError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise DiffeatError(
                f"{path} line {number}: expected {columns} columns, got {line.strip()!r}"
            )
        if numeric:
            try:
                [float(v) for v in parts[:numeric]]
            except ValueError:
                raise DiffeatError(
                    f"{path} line {number}: expected numbers, got {line.strip()!r}"
                ) from None
        rows.append(parts)
    return rows


def category_name(class_name: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black footed Albatross"`` (for prompts)."""
    name = class_name.split(".", 1)[1] if "." in class_name else class_name
    return name.replace("_", " ")


class CUB(Dataset):
    Options = CUBOptions
    title = "CUB-200-2011"
    url = CUB_URL
    layout = """
        images/, images.txt and parts/part_locs.txt
        images/<NNN.Class>/*.jpg, images.txt, classes.txt, image_class_labels.txt,
        train_test_split.txt, bounding_boxes.txt (x y w h), parts/part_locs.txt
        (image_id part_id x y visible, 15 parts). Pairs: per class, seeded draw of
        pairs_per_class test pairs sharing >= min_common_parts visible parts.
    """
    default_protocol = "hyperfeatures"

    def __init__(self, options: CUBOptions | None = None) -> None:
        super().__init__(options or CUBOptions())

    def check(self) -> Path:
        root = self.root_dir()
        missing = [name for name in REQUIRED if not (root / name.rstrip("/")).exists()]
        if missing:
            raise self.missing(root, missing)
        return root

    def pairs(self) -> Iterator[Pair]:
        opts = self.options
        root = self.check()
        listing = root / "images.txt"
        images = {
            int(float(i)): inside_root(root, ("images", name), f"{listing}, image {i.strip()}")
            for i, name in _read_table(listing, 2)
        }
        classes = {int(float(c)): name for c, name in _read_table(root / "classes.txt", 2)}
        labels = {int(i): int(c) for i, c in _read_table(root / "image_class_labels.txt", 2, 2)}
        training = {
            int(i): t.strip() == "1" for i, t in _read_table(root / "train_test_split.txt", 2, 2)
        }
        boxes = {
            int(row[0]): [float(v) for v in row[1:]]
            for row in _read_table(root / "bounding_boxes.txt", 5, 5)
        }
        offset = 1.0 if opts.one_based else 0.0
        parts: dict[int, np.ndarray] = {}
        visible: dict[int, np.ndarray] = {}
        for row in _read_table(root / "parts" / "part_locs.txt", 5, 5):
            image_id, part_id = int(row[0]), int(row[1])
            if not 1 <= part_id <= NUM_PARTS:
                raise DiffeatError(
                    f"{root / 'parts' / 'part_locs.txt'}: part id {part_id} is not in 1..15"
                )
            if image_id not in parts:
                parts[image_id] = np.zeros((NUM_PARTS, 2), dtype=np.float64)
                visible[image_id] = np.zeros(NUM_PARTS, dtype=bool)
            parts[image_id][part_id - 1] = (float(row[2]) - offset, float(row[3]) - offset)
            visible[image_id][part_id - 1] = row[4].strip() == "1"

        def in_split(image_id: int) -> bool:
            if opts.split == "all":
                return True
            return training.get(image_id, False) == (opts.split == "train")

        by_class: dict[int, list[int]] = {}
        for image_id in sorted(images):
            if image_id not in labels:
                raise DiffeatError(f"image {image_id} has no class in image_class_labels.txt")
            if in_split(image_id) and image_id in parts:
                by_class.setdefault(labels[image_id], []).append(image_id)

        sizes: dict[int, tuple[int, int]] = {}
        for class_id in sorted(by_class):
            if opts.max_classes and class_id > opts.max_classes:
                continue
            candidates = [
                (a, b)
                for a, b in itertools.combinations(by_class[class_id], 2)
                if int((visible[a] & visible[b]).sum()) >= opts.min_common_parts
            ]
            if opts.pairs_per_class and len(candidates) > opts.pairs_per_class:
                rng = np.random.default_rng([opts.seed, class_id])
                keep = rng.choice(len(candidates), opts.pairs_per_class, replace=False)
                candidates = [candidates[i] for i in sorted(int(k) for k in keep)]
            class_name = classes.get(class_id, str(class_id))
            for a, b in candidates:
                for image_id in (a, b):
                    if image_id not in sizes:
                        sizes[image_id] = image_size(images[image_id])
                yield Pair(
                    id=f"{a}-{b}",
                    source=images[a],
                    target=images[b],
                    category=category_name(class_name),
                    source_points=parts[a],
                    target_points=parts[b],
                    visible=visible[a] & visible[b],
                    source_bbox=self._box(boxes, a, offset),
                    target_bbox=self._box(boxes, b, offset),
                    source_size=sizes[a],
                    target_size=sizes[b],
                    keypoint_ids=[str(i) for i in range(1, NUM_PARTS + 1)],
                    flags={"class_id": class_id, "class_name": class_name},
                )

    @staticmethod
    def _box(
        boxes: dict[int, list[float]], image_id: int, offset: float
    ) -> tuple[float, float, float, float] | None:
        if image_id not in boxes:
            return None
        x, y, w, h = boxes[image_id]
        return (x - offset, y - offset, x - offset + w, y - offset + h)
