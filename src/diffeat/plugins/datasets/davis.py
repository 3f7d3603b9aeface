"""DAVIS-2017 (Pont-Tuset et al.): the ``davis2017`` dataset, semi-supervised video
object segmentation, evaluated by label propagation (task ``"propagation"``).

Layout of ``DAVIS-2017-trainval-480p.zip``::

    DAVIS/JPEGImages/480p/<sequence>/00000.jpg ...   the frames
    DAVIS/Annotations/480p/<sequence>/00000.png ...  indexed masks (0 background,
                                                     1..N objects, 255 void)
    DAVIS/ImageSets/2017/val.txt                     one sequence name per line

Each sequence is a :class:`~diffeat.core.videos.Video` whose first label is
the first frame's mask and whose ground truth is the mask of the same name as
each frame. Missing masks are not an error here: the evaluation skips that
sequence and names the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffeat.core.datasets import Dataset, inside_root
from diffeat.core.errors import DiffeatError
from diffeat.core.images import IMAGE_SUFFIXES
from diffeat.core.options import opt
from diffeat.core.videos import Video

DAVIS_URL = "https://davischallenge.org/davis2017/code.html (DAVIS-2017-trainval-480p.zip)"


@dataclass
class DavisOptions:
    root: str = opt("", "folder containing JPEGImages/, Annotations/ and ImageSets/")
    split: str = opt("val", "ImageSets/2017/<split>.txt: val (DIFT) or train")
    resolution: str = opt("480p", "the JPEGImages / Annotations subfolder (480p, Full-Resolution)")
    sequences: list[str] = opt([], "only these sequences (empty: every one of the split)")

    def validate(self) -> None:
        if not self.split or "/" in self.split or "\\" in self.split:
            raise ValueError(f"split must be a name such as 'val', got {self.split!r}")


class Davis2017(Dataset):
    Options = DavisOptions
    title = "DAVIS-2017"
    url = DAVIS_URL
    layout = """
        JPEGImages/480p/<sequence>/*.jpg, Annotations/480p/<sequence>/*.png and
        ImageSets/2017/val.txt: frames, indexed masks (0 background, 1..N objects, 255 void)
        and one sequence name per line.
    """
    default_protocol = "davis2017-semi-supervised"
    task = "propagation"

    def __init__(self, options: DavisOptions | None = None) -> None:
        super().__init__(options or DavisOptions())

    def sequence_names(self, root: Path) -> list[str]:
        listing = root / "ImageSets" / "2017" / f"{self.options.split}.txt"
        if not listing.is_file():
            raise self.missing(root, [f"ImageSets/2017/{self.options.split}.txt"])
        try:
            names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DiffeatError(f"cannot read {listing}: {exc}") from None
        if self.options.sequences:
            unknown = [s for s in self.options.sequences if s not in names]
            if unknown:
                raise DiffeatError(
                    f"{listing}: no sequence {', '.join(map(repr, unknown))} in the "
                    f"{self.options.split} split (it has {len(names)}, e.g. {names[:3]})"
                )
            names = [n for n in names if n in self.options.sequences]
        return names

    def videos(self) -> Iterator[Video]:
        """Every sequence of the split, in the order of its list."""
        root = self.root_dir()
        res = self.options.resolution
        for part in ("JPEGImages", "Annotations"):
            if not (root / part / res).is_dir():
                raise self.missing(root, [f"{part}/{res}/"])
        listing = root / "ImageSets" / "2017" / f"{self.options.split}.txt"
        for name in self.sequence_names(root):
            frames_dir = inside_root(root, ("JPEGImages", res, name), f"{listing}")
            masks_dir = root / "Annotations" / res / name
            frames = (
                sorted(
                    p
                    for p in frames_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
                if frames_dir.is_dir()
                else []
            )
            masks = [masks_dir / f"{p.stem}.png" for p in frames]
            if not frames:
                # an empty video: the evaluation skips it, naming the folder
                yield Video(
                    name,
                    [],
                    first=None,
                    meta={"error": f"{frames_dir}: no frames"},
                )
                continue
            yield Video(
                name,
                frames,
                labels="masks",
                first=masks[0],
                truth=list(masks),
                meta={"frames_dir": str(frames_dir), "masks_dir": str(masks_dir)},
            )
