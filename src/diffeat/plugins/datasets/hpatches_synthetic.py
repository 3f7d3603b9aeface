"""Synthetic HPatches sequences from your own images (``make-synthetic --layout hpatches``).

Writes the ``hpatches-sequences-release`` layout that the ``hpatches`` dataset
reads: sequence ``j`` uses source image ``j mod n`` (sorted by path) and is a
viewpoint sequence (``v_*``) when ``j + j // n`` is even, an illumination one
(``i_*``) when it is odd (so with ``2n`` sequences every image gets one of each). Each has ``1.ppm`` (the image) and ``2.ppm`` ... ``6.ppm``:

- viewpoint: image 1 warped by a random homography ``H_1_k`` whose strength
  grows with ``k`` (rotation up to 4 degrees * s, scale 1 +- 0.08 * s,
  perspective, translation up to 3 % * s of the size, ``s = (k - 1) / 5``),
  resampled bicubically in pixel-index coordinates (``target(H p) = image1(p)``,
  outside filled grey);
- illumination: ``H_1_k`` is the identity and the image changes photometrically
  (gain in ``[1 - 0.4 s, 1 + 0.15 s]``, darker more often than brighter so that
  little clips; gamma in ``1 +- 0.2 * s``; a colour cast of at most 5 % * s per
  channel).

``H_1_k`` is written with 17 significant digits: it reads back exactly the
matrix the image was warped with. All randomness comes from ``seed``.
"""

from __future__ import annotations

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
from diffeat.plugins.datasets.synthetic import warp_image

TARGETS = (2, 3, 4, 5, 6)


@dataclass
class SequenceReport:
    out: Path
    sequences: int = 0
    pairs: int = 0
    images: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "layout": "hpatches",
            "sequences": self.sequences,
            "pairs": self.pairs,
            "images": self.images,
            "kinds": self.kinds,
            "names": self.names,
        }


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def viewpoint_homography(
    size: tuple[int, int], strength: float, rng: np.random.Generator
) -> np.ndarray:
    """A random homography about the image centre; ``strength`` in [0, 1] scales every part."""
    w, h = size
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    angle = math.radians(rng.uniform(-4.0, 4.0) * strength)
    scale = 1.0 + rng.uniform(-0.08, 0.08) * strength
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    persp = np.eye(3)
    persp[2, :2] = rng.uniform(-0.1, 0.1, size=2) * strength / float(max(w, h))
    t = rng.uniform(-0.03, 0.03, size=2) * strength * np.array([w, h])
    return _shift(cx + t[0], cy + t[1]) @ persp @ rot @ _shift(-cx, -cy)


def relight(image: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """A photometric change: a gain and a gamma drawn with ``strength`` in [0, 1], and a
    slight colour cast (per-channel gain 1 +- 0.05 * strength)."""
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    gain = (1.0 + rng.uniform(-0.4, 0.15) * strength) * (
        1.0 + rng.uniform(-0.05, 0.05, size=3) * strength
    )
    gamma = 1.0 + rng.uniform(-0.2, 0.2) * strength
    y = np.clip(gain * x**gamma, 0.0, 1.0)
    return Image.fromarray(np.round(y * 255).astype(np.uint8), "RGB")


def write_homography(path: Path, matrix: np.ndarray) -> None:
    """A ``H_1_k`` file: three rows of three numbers, 17 significant digits (exact)."""
    np.savetxt(path, np.asarray(matrix, dtype=np.float64), fmt="%.17g")


def _stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", path.stem)[:20] or "image"


def make_hpatches_synthetic(
    out: str | Path,
    sources: Sequence[str | Path],
    *,
    sequences: int = 4,
    seed: int = 0,
    max_side: int = 0,
) -> SequenceReport:
    """Write ``sequences`` synthetic sequences made from the images in ``sources`` to ``out``."""
    out = Path(out)
    if sequences < 1:
        raise DiffeatError("--pairs (the number of sequences) must be at least 1")
    if out.is_dir() and any(p.name[:2] in ("i_", "v_") for p in out.iterdir()):
        raise DiffeatError(f"{out} already holds sequences (i_*/ or v_*/): choose a new folder")
    files = list_images([Path(s) for s in sources])
    if not files:
        raise DiffeatError(f"no images found in {', '.join(map(str, sources))}")
    rng = np.random.default_rng(seed)
    report = SequenceReport(out)
    for j in range(sequences):
        path = files[j % len(files)]
        image = load_image(path).convert("RGB")
        if max_side and max(image.size) > max_side:
            scale = max_side / max(image.size)
            new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(new, Image.Resampling.LANCZOS)
        kind = "viewpoint" if (j + j // len(files)) % 2 == 0 else "illumination"
        name = f"{kind[0]}_{j:03d}{_stem(path)}"
        folder = out / name
        folder.mkdir(parents=True)
        image.save(folder / "1.ppm")
        for k in TARGETS:
            strength = (k - 1) / 5.0
            if kind == "viewpoint":
                matrix = viewpoint_homography(image.size, strength, rng)
                target = warp_image(image, matrix)
            else:
                matrix = np.eye(3)
                target = relight(image, strength, rng)
            target.save(folder / f"{k}.ppm")
            write_homography(folder / f"H_1_{k}", matrix)
        report.sequences += 1
        report.pairs += len(TARGETS)
        report.images += 1 + len(TARGETS)
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        report.names.append(name)
    return report
