"""Small videos with exact ground truth, in the DAVIS-2017 layout, for offline tests.

:func:`make_davis` writes ``JPEGImages/480p/<seq>/*.jpg``, indexed
``Annotations/480p/<seq>/*.png`` and ``ImageSets/2017/val.txt``: each
sequence is a smooth textured background with solid-coloured shapes (a disc,
a square, ...) moving by a known whole number of pixels per frame; the masks
are the shapes' exact pixels (object ``k`` drawn over object ``k - 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffeat.core.videos import write_indexed_png
from diffeat.testing.extractors import smooth_texture

__all__ = ["OBJECT_COLOURS", "make_davis", "make_jhmdb", "moving_shapes"]

#: the colours of objects 1, 2, 3 (saturated, unlike the muted background)
OBJECT_COLOURS = [(230, 40, 40), (240, 220, 30), (40, 60, 235)]


def _shape(kind: str, size: tuple[int, int], centre: tuple[float, float], r: float) -> np.ndarray:
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = centre
    if kind == "disc":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)


def moving_shapes(
    size: tuple[int, int],
    frames: int,
    *,
    objects: int = 2,
    motion: Sequence[tuple[int, int]] = ((2, 1), (-1, 2)),
    radius: float | None = None,
    seed: int = 0,
) -> tuple[list[Image.Image], list[np.ndarray]]:
    """Frames (RGB) and exact id maps of ``objects`` shapes moving by ``motion[k]`` px/frame."""
    w, h = size
    bg = np.asarray(smooth_texture(size, seed=seed, cells=5), dtype=np.float32)
    bg = 90 + 0.35 * bg  # muted: far from the saturated object colours
    bg[..., 1] = 120 + 0.2 * bg[..., 1]
    r = radius if radius is not None else max(3.0, min(w, h) / 8)
    starts = []
    for k in range(objects):
        mx, my = motion[k % len(motion)]
        x0 = w * (0.3 + 0.4 * k / max(1, objects - 1))
        y0 = h * (0.35 + 0.3 * ((k + 1) % 2))
        # start so that the whole path stays inside the frame
        x0 = float(
            np.clip(x0, r + 1 - min(0, mx * (frames - 1)), w - r - 2 - max(0, mx * (frames - 1)))
        )
        y0 = float(
            np.clip(y0, r + 1 - min(0, my * (frames - 1)), h - r - 2 - max(0, my * (frames - 1)))
        )
        starts.append((round(x0), round(y0)))
    # each object carries its own smooth shading, which moves with it
    side = int(2 * r + 3)
    shading = [
        0.7
        + 0.6
        * np.asarray(
            smooth_texture((side, side), seed=seed + 17 * k + 1, cells=3), dtype=np.float32
        )[..., :1]
        / 255.0
        for k in range(objects)
    ]
    images, masks = [], []
    for t in range(frames):
        img = bg.copy()
        ids = np.zeros((h, w), dtype=np.uint8)
        for k in range(objects):
            mx, my = motion[k % len(motion)]
            cx, cy = starts[k][0] + mx * t, starts[k][1] + my * t
            shape = _shape("disc" if k % 2 == 0 else "square", size, (cx, cy), r)
            colour = np.asarray(OBJECT_COLOURS[k % len(OBJECT_COLOURS)], dtype=np.float32)
            shade = np.ones((h, w, 1), dtype=np.float32)
            x0, y0 = int(cx) - side // 2, int(cy) - side // 2
            ya, yb, xa, xb = max(0, y0), min(h, y0 + side), max(0, x0), min(w, x0 + side)
            shade[ya:yb, xa:xb] = shading[k][ya - y0 : yb - y0, xa - x0 : xb - x0]
            img = np.where(shape[..., None], np.clip(colour * shade, 0, 255), img)
            ids[shape] = k + 1
        images.append(Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8)))
        masks.append(ids)
    return images, masks


def make_davis(
    root: str | Path,
    *,
    sequences: int = 2,
    frames: int = 6,
    size: tuple[int, int] = (96, 64),
    objects: int = 2,
    split: str = "val",
    resolution: str = "480p",
    ext: str = "jpg",
    seed: int = 0,
) -> dict[str, Any]:
    """Write a DAVIS-2017-layout copy under ``root``; returns the sequence names and sizes."""
    root = Path(root)
    names = [f"shapes-{i}" for i in range(sequences)]
    for i, name in enumerate(names):
        images, masks = moving_shapes(
            size, frames, objects=objects if i == 0 else max(1, objects - 1), seed=seed + i
        )
        frame_dir = root / "JPEGImages" / resolution / name
        mask_dir = root / "Annotations" / resolution / name
        frame_dir.mkdir(parents=True, exist_ok=True)
        for t, (img, ids) in enumerate(zip(images, masks)):
            if ext == "jpg":
                img.save(frame_dir / f"{t:05d}.jpg", quality=95)
            else:
                img.save(frame_dir / f"{t:05d}.{ext}")
            write_indexed_png(mask_dir / f"{t:05d}.png", ids)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return {"root": str(root), "sequences": names, "frames": frames, "size": list(size)}


def make_jhmdb(
    root: str | Path,
    *,
    videos: int = 2,
    frames: int = 6,
    size: tuple[int, int] = (96, 64),
    seed: int = 0,
) -> dict[str, Any]:
    """Write a JHMDB-layout copy under ``root``: ``Rename_Images/<action>/<video>/*.png``,
    ``joint_positions/<action>/<video>/joint_positions.mat`` (``pos_img [2, J, T]``: each
    shape's centre and two points inside it, exact) and ``testlist_split1.txt``."""
    from scipy.io import savemat

    root = Path(root)
    lines, names = [], []
    for i in range(videos):
        images, masks = moving_shapes(size, frames, objects=2, seed=seed + i)
        action, video = "walk", f"shapes_{i}"
        frame_dir = root / "Rename_Images" / action / video
        frame_dir.mkdir(parents=True, exist_ok=True)
        pos = []
        for t, (img, ids) in enumerate(zip(images, masks)):
            img.save(frame_dir / f"{t + 1:05d}.png")
            joints = []
            for k in (1, 2):
                ys, xs = np.nonzero(ids == k)
                cx, cy = float(round(xs.mean())), float(round(ys.mean()))
                r = (xs.max() - xs.min()) / 4
                joints += [(cx, cy), (cx - round(r), cy), (cx, cy + round(r))]
            pos.append(joints)
        arr = np.asarray(pos, dtype=np.float64).transpose(2, 1, 0)  # [2, J, T]
        mat_dir = root / "joint_positions" / action / video
        mat_dir.mkdir(parents=True, exist_ok=True)
        savemat(str(mat_dir / "joint_positions.mat"), {"pos_img": arr})
        # the list files of TimeCycle / UVC / VideoWalk carry their author's absolute prefix
        lines.append(
            f"/data/JHMDB/joint_positions/{action}/{video}/joint_positions.mat "
            f"/data/JHMDB/Rename_Images/{action}/{video}"
        )
        names.append(f"{action}/{video}")
    (root / "testlist_split1.txt").write_text("\n".join(lines) + "\n")
    return {"root": str(root), "videos": names, "frames": frames, "size": list(size)}
