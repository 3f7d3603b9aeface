"""Loading and preprocessing images: the one place pixels come from.

Every image becomes 8-bit RGB: grayscale, palette, RGBA (alpha dropped),
16-bit and CMYK images are converted, not rejected. EXIF orientation is not
applied, so pixel coordinates match the stored raster (as benchmark
annotations do).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffeat.core.errors import ImageError
from diffeat.core.geometry import ImageTransform, Size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}

ImageLike = Union[str, os.PathLike, Image.Image, "ImageInput"]


@dataclass(frozen=True)
class ImageInput:
    """A decoded RGB image, its content key, where it came from and (optionally) its category.

    The category feeds category-aware extractors (e.g. a prompt template
    ``"a photo of a {category}"``); it is part of the store key only for
    extractors whose :meth:`~diffeat.core.components.Extractor.conditioning`
    depends on it.
    """

    image: Image.Image
    key: str
    source: str
    category: str = ""

    def with_category(self, category: str) -> ImageInput:
        return ImageInput(self.image, self.key, self.source, category)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB, with a clear :class:`ImageError` on failure."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image not found: {p}")
    if p.is_dir():
        raise ImageError(f"{p} is a folder, not an image file")
    try:
        with Image.open(p) as img:
            img.load()
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(
            f"{p} is not an image file PIL can read (expected JPEG, PNG, ...)"
        ) from None
    except PermissionError:
        raise ImageError(f"cannot read {p}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            f"{p} is truncated or corrupt ({exc}); re-download or re-export the file"
        ) from None


def content_key(image: Image.Image) -> str:
    """A hash of the decoded RGB pixels and the size: the same image under any path."""
    h = hashlib.sha256()
    h.update(f"{image.width}x{image.height}:{image.mode}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]


def as_input(item: ImageLike) -> ImageInput:
    """Normalise a path, a PIL image or an :class:`ImageInput` into an :class:`ImageInput`."""
    if isinstance(item, ImageInput):
        return item
    if isinstance(item, Image.Image):
        rgb = _to_rgb(item)
        return ImageInput(rgb, content_key(rgb), "<memory>")
    rgb = load_image(item)
    return ImageInput(rgb, content_key(rgb), str(item))


def list_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image files."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found.extend(
                sorted(
                    q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        elif p.exists():
            found.append(p)
        else:
            raise ImageError(f"image or folder not found: {p}")
    return found


def resize(image: Image.Image, size: tuple[int, int], resample: str = "bicubic") -> Image.Image:
    """Squash-resize to ``size = (width, height)`` with a PIL filter."""
    filters = {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "lanczos": Image.Resampling.LANCZOS,
        "nearest": Image.Resampling.NEAREST,
    }
    if image.size == tuple(size):
        return image
    return image.resize(tuple(size), filters[resample])


def fit_geometry(image_size: Size, model_size: Size, rule: str) -> tuple[Size, tuple[int, int]]:
    """Resized image size and its top-left offset inside the model input.

    ``resize`` squashes the image to ``model_size``; ``pad`` scales it to fit
    inside keeping its aspect ratio (sides rounded) and centres it, as
    SD-DINO's ``resize(..., edge=False)``.
    """
    if rule == "resize":
        return model_size, (0, 0)
    (w, h), (mw, mh) = image_size, model_size
    s = min(mw / w, mh / h)
    nw = min(mw, max(1, round(w * s)))
    nh = min(mh, max(1, round(h * s)))
    return (nw, nh), ((mw - nw) // 2, (mh - nh) // 2)


def fit_transform(image_size: Size, model_size: Size, rule: str) -> ImageTransform:
    """The image -> model-input transform of :func:`fit_geometry`."""
    if rule == "resize":
        return ImageTransform.resize(image_size, model_size)
    (nw, nh), (ox, oy) = fit_geometry(image_size, model_size, rule)
    w, h = image_size
    return ImageTransform(
        (int(w), int(h)),
        (int(model_size[0]), int(model_size[1])),
        (nw / w, nh / h),
        (float(ox), float(oy)),
    )


def fit_image(image: Image.Image, model_size: Size, rule: str, resample: str) -> Image.Image:
    """The model-input image: squash-resized, or fitted and padded with black."""
    size, offset = fit_geometry(image.size, model_size, rule)
    img = resize(image, size, resample)
    if rule == "pad":
        canvas = Image.new("RGB", tuple(model_size), (0, 0, 0))
        canvas.paste(img, offset)
        img = canvas
    return img


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in ``[-1, 1]`` from an RGB image, as diffusion VAEs expect."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (arr / 255.0 - 0.5) * 2.0
