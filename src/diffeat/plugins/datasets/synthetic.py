"""Synthetic pairs with exact ground truth, written in the SPair-71k layout.

:func:`make_synthetic` (``diffeat datasets make-synthetic``) turns any folder
of images into a benchmark: each pair is an image and a copy of it under a
random known transform, with keypoints mapped exactly. Kinds:

- ``identity``: the image itself (PCK 1 for any deterministic pipeline);
- ``translate``: an integer shift of up to 10% of the side, same canvas
  (exposed borders grey);
- ``flip``: a horizontal mirror, ``x -> W - 1 - x`` (the ground truth is the
  geometric mirror point, not a semantic left/right swap);
- ``homography``: mild and random: rotation up to 15 degrees, scale 0.85 to
  1.15, shift up to 8% of the side and a small perspective term, about the
  image centre; bicubic resampling.

Keypoints: each source image gets ``points`` random integer keypoints inside
its box (the central 80% of the image, recorded in ImageAnnotation); a pair
keeps those whose mapped point lies inside the target at least 2 px from the
border (``kps_ids`` says which). The target box is the bounding box of the
mapped source box, clipped to the image. The homography of every pair (in
pixel-index coordinates) is stored in the pair file as ``diffeat_transform``.

The ``synthetic`` dataset reads this layout (it is the SPair loader).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffeat.core.errors import DiffeatError
from diffeat.core.images import list_images, load_image
from diffeat.plugins.datasets.spair import SPairLayoutDataset

KINDS = ("identity", "translate", "flip", "homography")
#: kinds whose transform is drawn at random: the only ones that give an image a new pair
#: once it has met every kind (identity and flip of one image are always the same pair)
RANDOM_KINDS = ("translate", "homography")
REDRAWS = 50  # draws of a random kind that repeats an earlier pair of the image, at most
MARGIN = 2.0
FILL = (127, 127, 127)


class Synthetic(SPairLayoutDataset):
    title = "Synthetic pairs (make-synthetic)"
    url = "your own images: diffeat datasets make-synthetic OUT --from IMAGES"
    layout = """
        JPEGImages/ and PairAnnotation/
        the SPair-71k layout written by `diffeat datasets make-synthetic`: JPEGImages/<category>/,
        PairAnnotation/test/*.json (exact keypoints, boxes and the homography), ImageAnnotation/,
        Layout/large/test.txt.
    """
    default_protocol = "dift"


@dataclass
class SyntheticReport:
    out: Path
    pairs: int = 0
    images: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    duplicates: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "pairs": self.pairs,
            "images": self.images,
            "kinds": self.kinds,
            "categories": self.categories,
            "duplicates": self.duplicates,
        }


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def random_homography(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A 3x3 map of pixel-index coordinates, source -> target, of the given kind."""
    w, h = size
    if kind == "identity":
        return np.eye(3)
    if kind == "translate":
        mx, my = max(1, round(0.1 * w)), max(1, round(0.1 * h))
        return _shift(float(rng.integers(-mx, mx + 1)), float(rng.integers(-my, my + 1)))
    if kind == "flip":
        return np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    if kind == "homography":
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        angle = math.radians(rng.uniform(-15.0, 15.0))
        scale = rng.uniform(0.85, 1.15)
        c, s = math.cos(angle) * scale, math.sin(angle) * scale
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        side = float(max(w, h))
        persp = np.eye(3)
        persp[2, 0], persp[2, 1] = rng.uniform(-0.3, 0.3, size=2) / side
        t = rng.uniform(-0.08, 0.08, size=2) * np.array([w, h])
        return _shift(cx + t[0], cy + t[1]) @ persp @ rot @ _shift(-cx, -cy)
    raise DiffeatError(f"unknown transform kind {kind!r}: use one of {', '.join(KINDS)}")


def kind_step(images: int, kinds: int) -> int:
    """The shift of the kind cycle per round: the smallest ``c >= images + 1`` coprime to
    ``kinds`` (``images + 1`` reproduces the original assignment wherever that one already
    met every kind)."""
    step = images + 1
    while math.gcd(step, kinds) != 1:
        step += 1
    return step


def assign_kind(k: int, images: int, kinds: Sequence[str]) -> str:
    """The kind of pair ``k``, whose image is ``k mod images`` (see :func:`make_synthetic`).

    In round ``r = k // images`` image ``i`` gets ``kinds[(i + r * c) mod m]`` with
    ``c`` coprime to ``m = len(kinds)``: over any ``m`` consecutive rounds each image meets
    every kind once, and each round spreads the kinds evenly over the images. After the
    first ``m`` rounds an identity or flip would repeat a pair byte for byte: such a pair
    takes a random kind of ``kinds`` instead (if there is one).
    """
    m = len(kinds)
    i, r = k % images, k // images
    kind = kinds[(i + r * kind_step(images, m)) % m]
    randoms = [x for x in kinds if x in RANDOM_KINDS]
    if r >= m and kind not in RANDOM_KINDS and randoms:
        kind = randoms[(i + r) % len(randoms)]
    return kind


def _pair_key(index: int, matrix: np.ndarray) -> tuple[int, bytes]:
    """What makes a pair: its source image and the transform (keypoints come with the image)."""
    return index, (np.round(matrix, 9) + 0.0).tobytes()  # + 0.0: no -0.0


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``[N, 2]`` pixel-index points through a 3x3 homography."""
    pts = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return pts[:, :2] / pts[:, 2:3]


def warp_image(image: Image.Image, matrix: np.ndarray) -> Image.Image:
    """The target image: ``target(H p) = source(p)`` in pixel-index coordinates.

    PIL samples in continuous coordinates where pixel ``i`` covers ``[i, i+1)``,
    so the index-space map is conjugated by a half-pixel shift; PIL wants the
    inverse map (target -> source).
    """
    if np.allclose(matrix, np.eye(3)):
        return image.copy()
    if np.allclose(matrix, [[-1, 0, image.width - 1], [0, 1, 0], [0, 0, 1]]):
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    corner = _shift(0.5, 0.5) @ matrix @ _shift(-0.5, -0.5)
    inverse = np.linalg.inv(corner)
    inverse = inverse / inverse[2, 2]
    coeffs = tuple(float(v) for v in inverse.reshape(-1)[:8])
    integer_shift = np.allclose(matrix[:2, :2], np.eye(2)) and np.allclose(matrix[2], [0, 0, 1])
    resample = Image.Resampling.NEAREST if integer_shift else Image.Resampling.BICUBIC
    return image.transform(
        image.size, Image.Transform.PERSPECTIVE, coeffs, resample, fillcolor=FILL
    )


def _inside(points: np.ndarray, size: tuple[int, int], margin: float = MARGIN) -> np.ndarray:
    w, h = size
    return (
        (points[:, 0] >= margin)
        & (points[:, 0] <= w - 1 - margin)
        & (points[:, 1] >= margin)
        & (points[:, 1] <= h - 1 - margin)
    )


def _category_of(path: Path, base: Path, default: str) -> str:
    try:
        rel = path.relative_to(base)
    except ValueError:
        rel = Path(path.name)
    raw = rel.parts[0] if len(rel.parts) > 1 else default
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("_.") or default
    return name


def _save(image: Image.Image, path: Path, ext: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == "jpg":
        image.save(path, quality=95)
    else:
        image.save(path)


def _round(values: np.ndarray, digits: int = 3) -> list:
    return np.round(values, digits).tolist()


def make_synthetic(
    out: str | Path,
    sources: Sequence[str | Path],
    *,
    pairs: int = 20,
    seed: int = 0,
    kinds: Sequence[str] = ("homography", "flip"),
    points: int = 10,
    ext: str = "jpg",
    category: str = "synthetic",
    max_side: int = 0,
) -> SyntheticReport:
    """Write ``pairs`` synthetic pairs made from the images in ``sources`` to ``out``.

    Pair ``k`` uses source image ``k mod n`` (images sorted by path) and the kind
    :func:`assign_kind` gives it: with ``pairs >= n * len(kinds)`` every image meets every
    kind, and no two pairs are the same unless only identity / flip are asked for more
    than once per image (counted in ``duplicates``); a random draw that repeats an
    earlier pair of its image is drawn again. All randomness comes from ``seed``. The
    category of an image is the first folder under the ``--from`` folder it sits in,
    else ``category``.
    """
    out = Path(out)
    kinds = [k.strip() for k in kinds if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            raise DiffeatError(f"unknown transform kind {kind!r}: use one of {', '.join(KINDS)}")
    if not kinds:
        raise DiffeatError(f"no transform kinds given: use some of {', '.join(KINDS)}")
    if ext not in ("jpg", "png"):
        raise DiffeatError(f"--ext must be jpg or png, got {ext!r}")
    if pairs < 1 or points < 1:
        raise DiffeatError("--pairs and --points must be at least 1")
    if (out / "PairAnnotation").exists():
        raise DiffeatError(
            f"{out} already holds a benchmark (PairAnnotation/ exists): choose a new folder"
        )
    files: list[tuple[Path, Path]] = []
    for src in sources:
        base = Path(src)
        found = list_images([base])
        files.extend((f, base if base.is_dir() else f.parent) for f in found)
    if not files:
        raise DiffeatError(f"no images found in {', '.join(map(str, sources))}")
    rng = np.random.default_rng(seed)
    report = SyntheticReport(out)
    # per source image: its category, name, pixels, box and keypoints (drawn once, like SPair)
    prepared: dict[int, dict[str, Any]] = {}
    categories: set[str] = set()

    def prepare(index: int) -> dict[str, Any]:
        if index in prepared:
            return prepared[index]
        path, base = files[index]
        image = load_image(path)
        if max_side and max(image.size) > max_side:
            scale = max_side / max(image.size)
            new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(new, Image.Resampling.LANCZOS)
        w, h = image.size
        cat = _category_of(path, base, category)
        name = f"img{index:04d}"
        box = np.array([0.1 * (w - 1), 0.1 * (h - 1), 0.9 * (w - 1), 0.9 * (h - 1)])
        x0, y0 = math.ceil(box[0]), math.ceil(box[1])
        x1, y1 = math.floor(box[2]), math.floor(box[3])
        kps = np.stack(
            [rng.integers(x0, x1 + 1, size=points), rng.integers(y0, y1 + 1, size=points)], axis=1
        ).astype(np.float64)
        _save(image, out / "JPEGImages" / cat / f"{name}.{ext}", ext)
        _write_json(
            out / "ImageAnnotation" / cat / f"{name}.json",
            {
                "filename": f"{name}.{ext}",
                "source_file": str(path),
                "category": cat,
                "image_width": w,
                "image_height": h,
                "image_depth": 3,
                "bndbox": _round(box),
                "kps": {str(i): _round(p) for i, p in enumerate(kps)},
                "truncated": 0,
                "occluded": 0,
            },
        )
        prepared[index] = {"image": image, "cat": cat, "name": name, "box": box, "kps": kps}
        report.images += 1
        categories.add(cat)
        return prepared[index]

    listing: list[str] = []
    made: set[tuple[int, bytes]] = set()
    for k in range(pairs):
        index = k % len(files)
        src = prepare(index)
        kind = assign_kind(k, len(files), kinds)
        image: Image.Image = src["image"]
        matrix = random_homography(kind, image.size, rng)
        for _ in range(REDRAWS if kind in RANDOM_KINDS else 0):
            if _pair_key(index, matrix) not in made:
                break
            matrix = random_homography(kind, image.size, rng)  # e.g. a translation seen before
        target = warp_image(image, matrix)
        mapped = apply_homography(matrix, src["kps"])
        keep = _inside(mapped, target.size) & _inside(src["kps"], image.size)
        if not keep.any():  # a wild draw: fall back to the identity so every pair has points
            kind, matrix, target = "identity", np.eye(3), image.copy()
            mapped = src["kps"].copy()
            keep = np.ones(len(mapped), dtype=bool)
        if _pair_key(index, matrix) in made:
            report.duplicates += 1
        made.add(_pair_key(index, matrix))
        b = src["box"]
        corners = apply_homography(
            matrix, np.array([[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]])
        )
        tw, th = target.size
        tbox = np.array(
            [
                np.clip(corners[:, 0].min(), 0, tw - 1),
                np.clip(corners[:, 1].min(), 0, th - 1),
                np.clip(corners[:, 0].max(), 0, tw - 1),
                np.clip(corners[:, 1].max(), 0, th - 1),
            ]
        )
        tname = f"{src['name']}_t{k:04d}"
        _save(target, out / "JPEGImages" / src["cat"] / f"{tname}.{ext}", ext)
        ids = [str(i) for i in np.flatnonzero(keep)]
        _write_json(
            out / "ImageAnnotation" / src["cat"] / f"{tname}.json",
            {
                "filename": f"{tname}.{ext}",
                "category": src["cat"],
                "image_width": tw,
                "image_height": th,
                "image_depth": 3,
                "bndbox": _round(tbox),
                "kps": {str(i): (_round(mapped[i]) if keep[i] else None) for i in range(len(keep))},
                "truncated": 0,
                "occluded": 0,
            },
        )
        scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
        pair_name = f"{k + 1:06d}-{src['name']}-{tname}:{src['cat']}"
        _write_json(
            out / "PairAnnotation" / "test" / f"{pair_name}.json",
            {
                "pair_id": k + 1,
                "filename": pair_name,
                "src_imname": f"{src['name']}.{ext}",
                "trg_imname": f"{tname}.{ext}",
                "src_imsize": [image.width, image.height, 3],
                "trg_imsize": [tw, th, 3],
                "src_bndbox": _round(b),
                "trg_bndbox": _round(tbox),
                "category": src["cat"],
                "src_pose": "Unspecified",
                "trg_pose": "Unspecified",
                "src_kps": _round(src["kps"][keep]),
                "trg_kps": _round(mapped[keep]),
                "kps_ids": ids,
                "mirror": 0,
                "viewpoint_variation": 0,
                "scale_variation": 0 if abs(scale - 1) < 0.1 else 1,
                "truncation": 0,
                "occlusion": 0,
                "diffeat_transform": {"kind": kind, "homography": _round(matrix, 8)},
            },
        )
        listing.append(pair_name)
        report.pairs += 1
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
    layout = out / "Layout" / "large" / "test.txt"
    layout.parent.mkdir(parents=True, exist_ok=True)
    layout.write_text("\n".join(listing) + "\n")
    report.categories = sorted(categories)
    return report


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
