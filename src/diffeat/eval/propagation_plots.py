"""Pictures of label propagation: masks over frames, and the overlay GIF of ``diffeat propagate``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffeat.core.videos import DAVIS_PALETTE

__all__ = ["draw_samples", "overlay", "write_gif"]


def overlay(frame: Image.Image, ids: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The frame with each object's pixels blended with its DAVIS colour (background kept)."""
    rgb = np.asarray(frame.convert("RGB"), dtype=np.float32)
    palette = np.asarray(DAVIS_PALETTE, dtype=np.float32).reshape(256, 3)
    ids = np.asarray(ids)
    colours = palette[ids]
    objects = (ids > 0)[..., None]
    out = np.where(objects, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def write_gif(path: Path, frames: Sequence[Image.Image], fps: float = 8.0) -> Path:
    """An animated GIF of ``frames``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(path, save_all=True, append_images=rest, duration=max(1, round(1000 / fps)), loop=0)
    return path


def draw_samples(
    samples: Sequence[tuple[str, int, Image.Image, np.ndarray, np.ndarray | None]], out: Path
) -> list[Path]:
    """One picture per video: prediction (left) and ground truth (right) of the kept frames."""
    out.mkdir(parents=True, exist_ok=True)
    by_video: dict[str, list[tuple[int, Image.Image, np.ndarray, np.ndarray | None]]] = {}
    for vid, index, frame, pred, truth in samples:
        by_video.setdefault(vid, []).append((index, frame, pred, truth))
    written = []
    for vid, rows in by_video.items():
        w, h = rows[0][1].size
        label = 14
        sheet = Image.new("RGB", (2 * w, len(rows) * (h + label)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for r, (index, frame, pred, truth) in enumerate(rows):
            y = r * (h + label)
            draw.text((2, y), f"frame {index}: predicted | ground truth", fill=(0, 0, 0))
            sheet.paste(overlay(frame, pred).resize((w, h)), (0, y + label))
            if truth is not None:
                sheet.paste(overlay(frame, truth).resize((w, h)), (w, y + label))
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in vid)
        path = out / f"propagation_{safe}.png"
        sheet.save(path)
        written.append(path)
    return written
