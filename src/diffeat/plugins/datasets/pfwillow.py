"""PF-Willow (Ham et al., Proposal Flow, 2016): the ``pfwillow`` dataset.

The images and per-image MATLAB keypoint files come in ``PF-dataset.zip``::

    PF-dataset/<subset>/<image>.png      subsets car(G), car(M), car(S), duck(S),
    PF-dataset/<subset>/<image>.mat      motorbike(G), motorbike(M), motorbike(S),
                                          winebottle(M), winebottle(wC), winebottle(woC)

The 900 test pairs come from the CSV that CNNGeometric published and every
later evaluation reads (NCNet, DHPF, CATs, SD-DINO, GeoAware-SC, DIFT-style
code): ``test_pairs_pf.csv`` with a header row and 42 columns per row::

    imageA, imageB, XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10

(image paths such as ``PF-dataset/car(G)/car_003.png``). The keypoints are
read from the CSV, as those evaluations do; the ``.mat`` files are not parsed
(nor needed). The coordinates are used unchanged, as everyone does.

PF-Willow has no object boxes: each image's box is the extent of its
keypoints, so the ``bbox-*`` and ``kps-*`` PCK thresholds coincide (the usual
``alpha_bbox`` of PF-Willow is the target keypoints' extent).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from diffeat.core.datasets import Dataset, Pair, inside_root
from diffeat.core.errors import DiffeatError
from diffeat.core.options import opt

PFWILLOW_URL = (
    "https://www.di.ens.fr/willow/research/proposalflow/ (images: dataset/PF-dataset.zip; "
    "pair list: https://www.di.ens.fr/willow/research/cnngeometric/other_resources/"
    "test_pairs_pf.csv)"
)
CSV_NAMES = ("test_pairs_pf.csv", "test_pairs.csv")
_SUFFIX = re.compile(r"\s*\([^)]*\)\s*$")


@dataclass
class PFWillowOptions:
    root: str = opt("", "folder containing PF-dataset/ (or the subset folders) and the CSV")
    split: str = opt("test", "only 'test' exists")
    csv: str = opt("", "pair list CSV (empty: test_pairs_pf.csv or test_pairs.csv under root)")
    category_from: Literal["class", "subset"] = opt(
        "class",
        "category of a pair: the object class (car, duck, motorbike, winebottle) or the "
        "subset folder (car(G), ...)",
    )

    def validate(self) -> None:
        if self.split != "test":
            raise ValueError(f"PF-Willow has only a 'test' split, got {self.split!r}")


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header (the pixels are not decoded)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DiffeatError(f"image not found: {path}") from None
    except OSError as exc:
        raise DiffeatError(f"cannot read image {path}: {exc}") from None


def keypoint_box(points: np.ndarray) -> tuple[float, float, float, float]:
    return (
        float(points[:, 0].min()),
        float(points[:, 1].min()),
        float(points[:, 0].max()),
        float(points[:, 1].max()),
    )


class PFWillow(Dataset):
    Options = PFWillowOptions
    title = "PF-Willow"
    url = PFWILLOW_URL
    layout = """
        PF-dataset/ and test_pairs_pf.csv
        PF-dataset/<subset>/*.png images (subsets car(G), duck(S), motorbike(M),
        winebottle(wC), ...) and test_pairs_pf.csv (or test_pairs.csv; under root or
        under root/PF-dataset/): a header row, then imageA, imageB, XA1..XA10, YA1..YA10,
        XB1..XB10, YB1..YB10 per pair; image paths are relative to root.
    """
    default_protocol = "pf-willow"

    def __init__(self, options: PFWillowOptions | None = None) -> None:
        super().__init__(options or PFWillowOptions())

    def find_csv(self, root: Path) -> Path:
        if self.options.csv:
            path = Path(self.options.csv).expanduser()
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise DiffeatError(f"PF-Willow pair list not found: {path}")
            return path
        for folder in (root, root / "PF-dataset"):
            for name in CSV_NAMES:
                if (folder / name).is_file():
                    return folder / name
        raise self.missing(root, ["test_pairs_pf.csv (or test_pairs.csv)"])

    def resolve(self, name: str, root: Path, csv_dir: Path, row: int, csv_path: Path) -> Path:
        rel = inside_root(root, name.strip(), f"{csv_path} row {row}").relative_to(root)
        parts = rel.parts
        stripped = Path(*parts[1:]) if len(parts) > 1 and parts[0] == "PF-dataset" else rel
        candidates = [root / rel, root / stripped, csv_dir / rel, csv_dir / stripped]
        candidates.append(root / "PF-dataset" / stripped)
        for c in candidates:
            if c.is_file():
                return c
        raise DiffeatError(
            f"{csv_path} row {row}: image {name!r} not found under {root} (looked for "
            f"{root / rel}); PF-Willow images come in PF-dataset.zip from {PFWILLOW_URL}"
        )

    def pairs(self) -> Iterator[Pair]:
        root = self.root_dir()
        csv_path = self.find_csv(root)
        if not (root / "PF-dataset").is_dir() and not any(root.glob("*(*)")):
            raise self.missing(root, ["PF-dataset/ (the images)"])
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError) as exc:
            raise DiffeatError(f"cannot read {csv_path}: {exc}") from None
        if not rows:
            raise DiffeatError(f"{csv_path} is empty")
        header, body = rows[0], rows[1:]
        sizes: dict[Path, tuple[int, int]] = {}
        for index, row in enumerate(body):
            line = index + 2
            if not row or not any(cell.strip() for cell in row):
                continue
            values = row[2:]
            if len(values) % 4 or not values:
                raise DiffeatError(
                    f"{csv_path} row {line}: expected imageA, imageB and 4 x N coordinates "
                    f"(header {header[:3]}...), got {len(row)} columns"
                )
            try:
                coords = np.asarray([float(v) for v in values], dtype=np.float64)
            except ValueError:
                raise DiffeatError(f"{csv_path} row {line}: a coordinate is not a number") from None
            n = len(coords) // 4
            src = np.stack([coords[0:n], coords[n : 2 * n]], axis=1)
            tgt = np.stack([coords[2 * n : 3 * n], coords[3 * n :]], axis=1)
            src_path = self.resolve(row[0], root, csv_path.parent, line, csv_path)
            tgt_path = self.resolve(row[1], root, csv_path.parent, line, csv_path)
            for p in (src_path, tgt_path):
                if p not in sizes:
                    sizes[p] = image_size(p)
            subset = src_path.parent.name
            category = _SUFFIX.sub("", subset) if self.options.category_from == "class" else subset
            yield Pair(
                id=f"{index:04d}:{src_path.stem}-{tgt_path.stem}",
                source=src_path,
                target=tgt_path,
                category=category,
                source_points=src,
                target_points=tgt,
                source_bbox=keypoint_box(src),
                target_bbox=keypoint_box(tgt),
                source_size=sizes[src_path],
                target_size=sizes[tgt_path],
                flags={"subset": subset, "row": line},
            )
