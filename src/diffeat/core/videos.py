"""Videos as the evaluation and ``diffeat propagate`` see them: frames, first-frame labels,
per-frame ground truth, and the readers of indexed PNG masks and video files.

A video's frames are images like any other: each is decoded into an
:class:`~diffeat.core.images.ImageInput` whose store key hashes its pixels
(:func:`~diffeat.core.images.content_key`), so the features of a frame are
computed once and reused by every later run and task, whether the frame came
from a folder of JPEGs or was decoded from a video file.

A :class:`Video` record of a ``"propagation"`` dataset (DAVIS-2017, JHMDB)
holds the frames (paths, or decoded images for a video file), the labels to
propagate from the first frame (an indexed mask, or joints) and the ground
truth of the other frames (mask files, or joints), with ``None`` for a frame
that has none.

Indexed masks follow the DAVIS convention: a palette ("P" mode) PNG whose
pixel values are object ids (0 background, 1..N objects, 255 void); a
greyscale PNG with the same values is accepted too.

Video files are decoded with PyAV (``pip install diffeat[video]``) or, failing
that, imageio; both are optional and imported only when a video file is read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffeat.core.errors import DiffeatError
from diffeat.core.images import IMAGE_SUFFIXES, ImageInput, as_input

#: the suffixes read as video files (anything else that is not a folder is refused)
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"}

#: the 256-entry colour palette of DAVIS annotations (the PASCAL VOC palette)
DAVIS_PALETTE: list[int] = []
for _i in range(256):
    _c, _r, _g, _b = _i, 0, 0, 0
    for _j in range(8):
        _r |= ((_c >> 0) & 1) << (7 - _j)
        _g |= ((_c >> 1) & 1) << (7 - _j)
        _b |= ((_c >> 2) & 1) << (7 - _j)
        _c >>= 3
    DAVIS_PALETTE += [_r, _g, _b]

Frame = Path | Image.Image
LabelKind = Literal["masks", "joints"]

__all__ = [
    "DAVIS_PALETTE",
    "VIDEO_SUFFIXES",
    "Video",
    "frame_input",
    "list_frames",
    "read_indexed_png",
    "read_video",
    "write_indexed_png",
]


@dataclass
class Video:
    """One video to propagate labels through.

    ``frames`` are image paths (or decoded images); ``first`` is the label of
    frame 0: an indexed mask file (``labels = "masks"``) or a ``[J, 2]`` array
    of ``(x, y)`` joints (``labels = "joints"``). ``truth[i]`` is the ground
    truth of frame ``i`` in the same form (``None``: not annotated); for joints
    ``visible[i]`` says which joints are annotated in frame ``i``.
    """

    id: str
    frames: list[Frame]
    labels: LabelKind = "masks"
    first: Path | np.ndarray | None = None
    truth: list[Any] = field(default_factory=list)
    visible: list[np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.frames = [f if isinstance(f, Image.Image) else Path(f) for f in self.frames]
        if not self.truth:
            self.truth = [None] * len(self.frames)
        if len(self.truth) != len(self.frames):
            raise ValueError(
                f"video {self.id}: {len(self.truth)} ground-truth entries for "
                f"{len(self.frames)} frames"
            )

    def __len__(self) -> int:
        return len(self.frames)

    def frame_name(self, index: int) -> str:
        """The file name of frame ``index`` (``00005`` for a decoded frame)."""
        frame = self.frames[index]
        return frame.stem if isinstance(frame, Path) else f"{index:05d}"


def frame_input(frame: Frame, what: str = "frame") -> ImageInput:
    """A frame as an :class:`ImageInput` keyed by its pixels (the store's image key)."""
    inp = as_input(frame)
    if isinstance(frame, Image.Image):
        return ImageInput(inp.image, inp.key, what)
    return inp


def read_indexed_png(path: str | os.PathLike[str]) -> np.ndarray:
    """The object ids ``[H, W]`` (uint8) of an indexed (palette) or greyscale mask PNG.

    A palette image's indices are read as they are (not its colours); an RGB
    mask is refused with a message that says to save it as an indexed PNG.
    """
    p = Path(path)
    if not p.is_file():
        raise DiffeatError(f"mask not found: {p}")
    try:
        with Image.open(p) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "L"):
                return np.array(img, dtype=np.uint8)
            if mode == "1":
                return np.array(img, dtype=np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.array(img)
                if arr.max(initial=0) > 255:
                    raise DiffeatError(f"{p}: mask ids above 255 are not supported")
                return arr.astype(np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DiffeatError(f"{p} is not a readable PNG mask ({exc})") from None
    raise DiffeatError(
        f"{p} is a {mode} image, not an indexed mask: save it as a palette (P) or greyscale (L) "
        "PNG whose pixel values are object ids (0 background, 1..N objects)"
    )


def write_indexed_png(
    path: str | os.PathLike[str], ids: np.ndarray, palette: Sequence[int] = DAVIS_PALETTE
) -> Path:
    """Write object ids ``[H, W]`` as a palette PNG (DAVIS colours by default)."""
    p = Path(path)
    arr = np.asarray(ids)
    if arr.ndim != 2 or arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise DiffeatError(f"{p}: a mask is [H, W] ids in 0..255, got shape {arr.shape}")
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette(list(palette))
    p.parent.mkdir(parents=True, exist_ok=True)
    img.save(p)
    return p


def list_frames(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (a video's frames)."""
    root = Path(folder)
    if not root.is_dir():
        raise DiffeatError(f"frame folder not found: {root}")
    frames = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise DiffeatError(
            f"{root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); pass a folder "
            "of frames or a video file"
        )
    return frames


def _decode_av(path: Path) -> list[Image.Image]:
    import av  # optional: pip install diffeat[video]

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_image().convert("RGB"))
    return frames


def _decode_imageio(path: Path) -> list[Image.Image]:
    import imageio.v3 as iio  # optional

    return [Image.fromarray(np.asarray(f)).convert("RGB") for f in iio.imiter(path)]


def read_video(path: str | os.PathLike[str]) -> list[Frame]:
    """The frames of a video: a folder of images (paths) or a video file (decoded images).

    A video file needs PyAV or imageio (``pip install diffeat[video]``); a
    missing decoder or an undecodable file is a :class:`DiffeatError` naming the file.
    """
    p = Path(path)
    if p.is_dir():
        return list(list_frames(p))
    if not p.exists():
        raise DiffeatError(f"video not found: {p} (pass a video file or a folder of frames)")
    if p.suffix.lower() == ".gif":
        try:
            with Image.open(p) as img:
                frames = []
                for i in range(getattr(img, "n_frames", 1)):
                    img.seek(i)
                    frames.append(img.convert("RGB"))
                return frames
        except (UnidentifiedImageError, OSError) as exc:
            raise DiffeatError(f"cannot decode the video {p}: {exc}") from None
    decoders = []
    try:
        import av  # noqa: F401

        decoders.append(_decode_av)
    except ImportError:
        pass
    try:
        import imageio.v3  # noqa: F401

        decoders.append(_decode_imageio)
    except ImportError:
        pass
    if not decoders:
        raise DiffeatError(
            f"reading the video file {p} needs PyAV or imageio: pip install 'diffeat[video]' "
            "(or pass a folder of frames)"
        )
    errors = []
    for decode in decoders:
        try:
            frames = decode(p)
        except Exception as exc:  # any decoder failure: try the next, then report them all
            detail = " ".join(str(exc).split())
            errors.append(f"{decode.__name__.strip('_').replace('decode_', '')}: {detail}")
            continue
        if frames:
            return list(frames)
        errors.append(f"{decode.__name__.strip('_').replace('decode_', '')}: no frames")
    raise DiffeatError(
        f"cannot decode the video {p} ({'; '.join(errors)}); is it a video file? Convert it "
        "(e.g. to MP4/H.264) or pass a folder of frames"
    )
