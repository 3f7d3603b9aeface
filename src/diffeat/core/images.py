"""Loading and preprocessing images: the one place pixels come from.

Every image becomes 8-bit RGB: grayscale, palette, RGBA (alpha dropped),
16-bit and CMYK images are converted, not rejected. A photo's EXIF orientation
is applied, as photo viewers do, so points are given on the upright image;
``orientation="raw"`` (or ``DIFFEAT_IMAGE_ORIENTATION=raw``, or ``diffeat
--raw-orientation``) keeps the stored raster. Benchmark annotations are in raster
coordinates, so dataset images are always read raw (as the official loaders
do). The choice is part of the store key: the key hashes the decoded pixels, and
a rotated photo decodes to other pixels.

An image file larger than :func:`max_image_pixels` (Pillow's guard against
decompression bombs, about 179 megapixels by default) is refused with an
:class:`ImageError` that says how to raise the limit: the environment variable
``DIFFEAT_MAX_IMAGE_PIXELS`` (a number of pixels, ``0`` for no limit). In
memory, :func:`as_input` takes paths, PIL images, numpy arrays (``HxWx3`` /
``HxWx4`` / ``HxW``, ``uint8`` or float in ``[0, 1]``) and torch tensors
(``3xHxW`` / ``1xHxW`` / ``HxW``, ``uint8`` or float in ``[0, 1]``); the same
pixels give the same content key however they are passed.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffeat.core.errors import ConfigError, ImageError
from diffeat.core.geometry import ImageTransform, Size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor, "ImageInput"]

MAX_PIXELS_ENV = "DIFFEAT_MAX_IMAGE_PIXELS"
ORIENTATION_ENV = "DIFFEAT_IMAGE_ORIENTATION"
ORIENTATIONS = ("exif", "raw")
_PILLOW_LIMIT_LOCK = threading.Lock()


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


def max_image_pixels() -> int | None:
    """The most pixels :func:`load_image` decodes (``None``: no limit).

    ``DIFFEAT_MAX_IMAGE_PIXELS`` when set (``0``: no limit), else Pillow's own
    refusal threshold, ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels,
    e.g. 13,377 x 13,377, unless the process changed it).
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        pillow = Image.MAX_IMAGE_PIXELS
        return None if pillow is None else 2 * int(pillow)
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(
            f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels; set it to a whole number "
            "(e.g. 1000000000) or 0 for no limit, or unset it for the default"
        )
    return None if value == 0 else value


@contextmanager
def _pillow_limit() -> Iterator[int | None]:
    """The pixel limit for one load; with ``DIFFEAT_MAX_IMAGE_PIXELS`` set, Pillow's own check
    is off while this load runs (under a lock), since ours replaces it."""
    limit = max_image_pixels()
    if not os.environ.get(MAX_PIXELS_ENV, "").strip():
        yield limit
        return
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield limit
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _too_large(path: Path, size: str) -> ImageError:
    return ImageError(
        f"{path} is too large to decode: {size} (a guard against decompression bombs); if "
        f"the file is trusted, raise the limit with the environment variable "
        f"{MAX_PIXELS_ENV} (a number of pixels, 0 for no limit)"
    )


def image_orientation(orientation: str | None = None) -> str:
    """``orientation``, else ``DIFFEAT_IMAGE_ORIENTATION``, else ``"exif"``: checked."""
    value = orientation or os.environ.get(ORIENTATION_ENV, "").strip().lower() or "exif"
    if value not in ORIENTATIONS:
        where = "orientation" if orientation else ORIENTATION_ENV
        raise ConfigError(
            f"{where}={value!r} is not an image orientation; use exif (apply the photo's "
            "EXIF orientation, the default) or raw (keep the stored raster)"
        )
    return value


def load_image(path: str | os.PathLike, *, orientation: str | None = None) -> Image.Image:
    """Open an image file as 8-bit RGB, with a clear :class:`ImageError` on failure
    (including an image over :func:`max_image_pixels`). ``orientation`` (see
    :func:`image_orientation`): ``"exif"`` turns a photo upright by its EXIF orientation,
    ``"raw"`` keeps the stored raster."""
    upright = image_orientation(orientation) == "exif"
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image not found: {p}")
    if p.is_dir():
        raise ImageError(f"{p} is a folder, not an image file")
    with _pillow_limit() as limit:
        try:
            with Image.open(p) as img:
                w, h = img.size
                if limit is not None and max(1, w) * max(1, h) > limit:
                    raise _too_large(
                        p, f"{w} x {h} = {w * h:,} pixels, more than the limit of {limit:,}"
                    )
                img.load()
                if upright:
                    return _to_rgb(ImageOps.exif_transpose(img))
                return _to_rgb(img)
        except Image.DecompressionBombError as exc:
            raise _too_large(
                p, str(exc).removesuffix(", could be decompression bomb DOS attack.")
            ) from None
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


def _describe(shape: tuple[int, ...], dtype: object) -> str:
    return f"shape {tuple(shape)}, dtype {dtype}"


_ARRAY_HELP = (
    "pass an image as HxWx3 (RGB), HxWx4 (RGBA, alpha dropped) or HxW (grey), "
    "uint8 or float in [0, 1]; a torch tensor as 3xHxW, 1xHxW or HxW; one image at a time"
)


def _array_to_pil(arr: np.ndarray, what: str) -> Image.Image:
    """An ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` uint8 / float-in-[0, 1] array as RGB."""
    shape = tuple(arr.shape)
    if arr.ndim == 3 and shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(
            f"{what} with {_describe(shape, arr.dtype)} is not an image: {_ARRAY_HELP}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{what} with {_describe(shape, arr.dtype)} is empty")
    if arr.dtype == np.uint8:
        arr8 = arr
    elif np.issubdtype(arr.dtype, np.floating):
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageError(f"{what} ({_describe(shape, arr.dtype)}) has NaN or infinite values")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(
                f"{what} ({_describe(shape, arr.dtype)}) has values in [{lo:g}, {hi:g}]; a float "
                "image must be in [0, 1] (divide 0..255 values by 255; map [-1, 1] with "
                "(x + 1) / 2)"
            )
        arr8 = np.round(values * 255.0).astype(np.uint8)
    else:
        raise ImageError(
            f"{what} has dtype {arr.dtype}, which is not an image dtype: {_ARRAY_HELP} "
            "(convert other integer types to uint8 first)"
        )
    arr8 = np.ascontiguousarray(arr8)
    if arr8.ndim == 2:
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if arr8.shape[2] == 4:
        return Image.fromarray(arr8, mode="RGBA").convert("RGB")
    return Image.fromarray(arr8, mode="RGB")


def _tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """A ``3xHxW`` / ``1xHxW`` / ``HxW`` uint8 or float-in-[0, 1] tensor as RGB."""
    shape = tuple(tensor.shape)
    what = "a torch tensor"
    if tensor.ndim == 4:
        raise ImageError(
            f"{what} with {_describe(shape, tensor.dtype)} is a batch; pass its images one by "
            "one (e.g. list(batch))"
        )
    t = tensor.detach().cpu()
    if t.ndim == 3:
        if shape[0] not in (1, 3, 4):
            raise ImageError(
                f"{what} with {_describe(shape, tensor.dtype)} is not an image: {_ARRAY_HELP}"
            )
        t = t.permute(1, 2, 0)
    elif t.ndim != 2:
        raise ImageError(
            f"{what} with {_describe(shape, tensor.dtype)} is not an image: {_ARRAY_HELP}"
        )
    if t.dtype == torch.uint8:
        arr = t.numpy()
    elif t.is_floating_point():
        arr = t.to(torch.float64).numpy()
    else:
        raise ImageError(
            f"{what} has dtype {tensor.dtype}, which is not an image dtype: {_ARRAY_HELP}"
        )
    return _array_to_pil(arr, f"{what} (as HxWxC)")


def as_input(item: ImageLike, *, orientation: str | None = None) -> ImageInput:
    """Normalise an image into an :class:`ImageInput`: a path, a PIL image, a numpy array
    (``HxWx3`` / ``HxWx4`` / ``HxW``, uint8 or float in ``[0, 1]``), a torch tensor
    (``3xHxW`` / ``1xHxW`` / ``HxW``, uint8 or float in ``[0, 1]``) or an :class:`ImageInput`.

    The key hashes the decoded 8-bit RGB pixels, so the same pixels give the same key however
    they are passed; anything else is an :class:`ImageError` saying what is accepted. A file
    is read with ``orientation`` (:func:`load_image`).
    """
    if isinstance(item, ImageInput):
        return item
    if isinstance(item, Image.Image):
        rgb = _to_rgb(item)
        return ImageInput(rgb, content_key(rgb), "<memory>")
    if isinstance(item, np.ndarray):
        rgb = _array_to_pil(item, "a numpy array")
        return ImageInput(rgb, content_key(rgb), "<numpy array>")
    if isinstance(item, torch.Tensor):
        rgb = _tensor_to_pil(item)
        return ImageInput(rgb, content_key(rgb), "<torch tensor>")
    if not isinstance(item, (str, os.PathLike)):
        raise ImageError(
            f"cannot use a {type(item).__name__} as an image: pass a file path, a PIL image, a "
            "numpy array or a torch tensor"
        )
    rgb = load_image(item, orientation=orientation)
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


#: the long side of a ``short-side`` model input is floored to a multiple of this
SHORT_SIDE_MULTIPLE = 32


def short_side_size(image_size: Size, short: int, multiple: int = SHORT_SIDE_MULTIPLE) -> Size:
    """The aspect-preserving model size of DIFT's DAVIS protocol: the short side becomes
    ``short``, the long side ``short * long / short_of_image`` floored to a multiple of
    ``multiple`` (854x480 -> 832x480 with ``short = 480``)."""
    w, h = int(image_size[0]), int(image_size[1])
    if w > h:
        long = int((short * w / h) // multiple * multiple)
        return (max(multiple, long), int(short))
    long = int((short * h / w) // multiple * multiple)
    return (int(short), max(multiple, long))


def model_size_for(image_size: Size, model_size: Size, rule: str) -> Size:
    """The model-input size of an image: ``model_size`` for ``resize`` and ``pad``; for
    ``short-side`` the :func:`short_side_size` with the short side ``min(model_size)``."""
    if rule == "short-side":
        return short_side_size(image_size, min(int(model_size[0]), int(model_size[1])))
    return (int(model_size[0]), int(model_size[1]))


def fit_geometry(image_size: Size, model_size: Size, rule: str) -> tuple[Size, tuple[int, int]]:
    """Resized image size and its top-left offset inside the model input.

    ``resize`` squashes the image to ``model_size``; ``pad`` scales it to fit
    inside keeping its aspect ratio (sides rounded) and centres it, as
    SD-DINO's ``resize(..., edge=False)``; ``short-side`` resizes it to
    ``model_size``, which the caller computed with :func:`model_size_for`.
    """
    if rule in ("resize", "short-side"):
        return model_size, (0, 0)
    (w, h), (mw, mh) = image_size, model_size
    s = min(mw / w, mh / h)
    nw = min(mw, max(1, round(w * s)))
    nh = min(mh, max(1, round(h * s)))
    return (nw, nh), ((mw - nw) // 2, (mh - nh) // 2)


def fit_transform(image_size: Size, model_size: Size, rule: str) -> ImageTransform:
    """The image -> model-input transform of :func:`fit_geometry`."""
    if rule in ("resize", "short-side"):
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
