"""SPair-71k (Min et al. 2019): the ``spair`` dataset.

Layout (as distributed)::

    SPair-71k/
      JPEGImages/<category>/<image>.jpg
      PairAnnotation/{trn,val,test}/<pair_id>-<src>-<trg>:<category>.json
      ImageAnnotation/<category>/<image>.json     (per-image keypoints; not needed here)
      Layout/{large,small}/{trn,val,test}.txt      (pair lists; optional)

A pair file is self-contained: ``src_imname``, ``trg_imname``,
``src_imsize`` / ``trg_imsize`` (``[w, h, c]``), ``src_bndbox`` /
``trg_bndbox`` (``[x0, y0, x1, y1]``), ``src_kps`` / ``trg_kps`` (``[N, 2]``,
the keypoints visible in both images), ``kps_ids``, ``category``, ``mirror``,
``viewpoint_variation``, ``scale_variation``, ``truncation``, ``occlusion``.
Keypoints are used as given: they are integer pixel indices, which is how the
official evaluations (DIFT, SD-DINO) index feature maps with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffeat.core.datasets import Dataset, Pair, inside_root
from diffeat.core.errors import DiffeatError
from diffeat.core.options import opt

SPAIR_URL = "https://cvlab.postech.ac.kr/research/SPair-71k/"
SPLITS = {"trn": "trn", "train": "trn", "val": "val", "test": "test"}
FLAG_FIELDS = ("mirror", "viewpoint_variation", "scale_variation", "truncation", "occlusion")


@dataclass
class SPairOptions:
    root: str = opt("", "folder containing JPEGImages/ and PairAnnotation/")
    split: str = opt("test", "trn (or train), val or test")
    categories: list[str] = opt([], "only these categories (empty: all)")
    pair_list: str = opt(
        "",
        "text file with one pair name (the JSON file's stem) per line, e.g. "
        "Layout/small/test.txt; relative paths are under root (empty: every pair of the split)",
    )
    sample_per_category: int = opt(
        0,
        "draw this many pairs per category as SD-DINO does: sorted file list, "
        "numpy RandomState(sample_seed).choice(n, k), with replacement (0: all pairs)",
    )
    sample_seed: int = opt(42, "seed of sample_per_category (SD-DINO's default is 42)")

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of trn, train, val, test; got {self.split!r}")
        if self.sample_per_category < 0:
            raise ValueError("sample_per_category must be >= 0")


def _field(data: dict[str, Any], key: str, path: Path) -> Any:
    try:
        return data[key]
    except KeyError:
        raise DiffeatError(
            f"{path}: field {key!r} is missing; is this an SPair-71k pair annotation?"
        ) from None


def read_pair_file(path: Path, root: Path, split: str) -> Pair:
    """One SPair pair annotation as a :class:`Pair` (errors name the file and field)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffeatError(f"cannot read SPair pair annotation {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DiffeatError(f"{path}: expected a JSON object (an SPair pair annotation)")
    category = str(_field(data, "category", path))

    def image(key: str) -> Path:
        name = str(_field(data, key, path))
        where = f"SPair pair annotation {path}, fields category and {key}"
        return inside_root(root, ("JPEGImages", category, name), where)

    flags = {k: data[k] for k in FLAG_FIELDS if k in data}
    if "diffeat_transform" in data:
        flags["transform"] = data["diffeat_transform"]
    flags["split"] = split
    try:
        return Pair(
            id=path.stem,
            source=image("src_imname"),
            target=image("trg_imname"),
            category=category,
            source_points=_field(data, "src_kps", path),
            target_points=_field(data, "trg_kps", path),
            source_bbox=_field(data, "src_bndbox", path),
            target_bbox=_field(data, "trg_bndbox", path),
            source_size=data.get("src_imsize"),
            target_size=data.get("trg_imsize"),
            keypoint_ids=data.get("kps_ids"),
            flags=flags,
        )
    except (ValueError, TypeError) as exc:
        raise DiffeatError(f"{path}: {exc}") from None


class SPairLayoutDataset(Dataset):
    """Reads the SPair-71k folder layout (shared by ``spair`` and ``synthetic``)."""

    Options = SPairOptions

    def __init__(self, options: SPairOptions | None = None) -> None:
        super().__init__(options or SPairOptions())

    @property
    def split_dir(self) -> str:
        return SPLITS[self.options.split]

    def check(self) -> Path:
        root = self.root_dir()
        missing = []
        if not (root / "JPEGImages").is_dir():
            missing.append("JPEGImages/")
        ann = root / "PairAnnotation" / self.split_dir
        if not ann.is_dir():
            missing.append(f"PairAnnotation/{self.split_dir}/")
        elif not any(ann.glob("*.json")):
            missing.append(f"PairAnnotation/{self.split_dir}/*.json (the folder is empty)")
        if missing:
            raise self.missing(root, missing)
        return root

    def files(self, root: Path) -> list[Path]:
        ann = root / "PairAnnotation" / self.split_dir
        files = sorted(ann.glob("*.json"))
        if self.options.pair_list:
            listed = Path(self.options.pair_list).expanduser()
            if not listed.is_absolute():
                listed = root / listed
            try:
                names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
            except OSError as exc:
                raise DiffeatError(f"cannot read pair list {listed}: {exc}") from None
            by_stem = {f.stem: f for f in files}
            unknown = [n for n in names if n.removesuffix(".json") not in by_stem]
            if unknown:
                raise DiffeatError(
                    f"pair list {listed}: {len(unknown)} pair(s) not in "
                    f"PairAnnotation/{self.split_dir}/, e.g. {unknown[0]!r}"
                )
            files = [by_stem[n.removesuffix(".json")] for n in names]
        return files

    def pairs(self) -> Iterator[Pair]:
        root = self.check()
        files = self.files(root)
        wanted = set(self.options.categories)
        if self.options.sample_per_category:
            yield from self._sampled(root, files, wanted)
            return
        for path in files:
            pair = read_pair_file(path, root, self.split_dir)
            if wanted and pair.category not in wanted:
                continue
            yield pair

    def _sampled(self, root: Path, files: list[Path], wanted: set[str]) -> Iterator[Pair]:
        """SD-DINO's subsample: per category (sorted), ``RandomState(seed).choice(n, k)``."""
        by_category: dict[str, list[Path]] = {}
        for path in files:
            category = path.stem.rsplit(":", 1)[-1] if ":" in path.stem else None
            if category is None:
                category = read_pair_file(path, root, self.split_dir).category
            by_category.setdefault(category, []).append(path)
        for category in sorted(by_category):
            if wanted and category not in wanted:
                continue
            paths = sorted(by_category[category], key=str)
            rng = np.random.RandomState(self.options.sample_seed)
            for index in rng.choice(len(paths), self.options.sample_per_category):
                yield read_pair_file(paths[int(index)], root, self.split_dir)


class SPair(SPairLayoutDataset):
    title = "SPair-71k"
    url = SPAIR_URL
    layout = """
        JPEGImages/ and PairAnnotation/
        JPEGImages/<category>/<image>.jpg;
        PairAnnotation/{trn,val,test}/<pair_id>-<src>-<trg>:<category>.json
        (src_imname, trg_imname, src_kps, trg_kps, src_bndbox, trg_bndbox, src_imsize,
        trg_imsize, category, kps_ids, viewpoint_variation, scale_variation, truncation,
        occlusion); ImageAnnotation/ and Layout/ are optional.
    """
    default_protocol = "dift"
