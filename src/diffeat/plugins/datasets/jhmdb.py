"""JHMDB (Jhuang et al., 2013): the ``jhmdb`` dataset, keypoint propagation through
videos (task ``"propagation"``, VideoWalk's protocol).

Layout (``JHMDB_video.zip`` frames and ``joint_positions.zip``)::

    Rename_Images/<action>/<video>/00001.png ...        the frames
    joint_positions/<action>/<video>/joint_positions.mat  MATLAB file: pos_img [2, 15, T]
    testlist_split1.txt                                  the test videos (TimeCycle / UVC /
                                                         VideoWalk list): per line a
                                                         joint_positions.mat path and a
                                                         Rename_Images folder
    splits/<action>_test_split1.txt                      (else) JHMDB's own split files:
                                                         "<video>.avi 2" marks a test video

``pos_img`` holds the 15 joints' ``(x, y)`` image coordinates per frame; they
are used as given (``one_based = true`` subtracts 1). The ``.mat`` files are
read with ``scipy.io.loadmat`` (data, not pickles): ``pip install
'diffeat[jhmdb]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffeat.core.datasets import Dataset, inside_root
from diffeat.core.errors import DiffeatError
from diffeat.core.images import IMAGE_SUFFIXES
from diffeat.core.options import opt
from diffeat.core.videos import Video

JHMDB_URL = "http://jhmdb.is.tue.mpg.de/dataset (JHMDB_video.zip, joint_positions.zip, splits.zip)"


@dataclass
class JhmdbOptions:
    root: str = opt("", "folder containing Rename_Images/ and joint_positions/")
    split: str = opt("1", "the split number of testlist_split<N>.txt / *_test_split<N>.txt")
    list: str = opt("", "a test list file (empty: testlist_split<N>.txt, else splits/)")
    one_based: bool = opt(False, "subtract 1 from pos_img (default: used as given)")


def load_mat(path: Path) -> dict:
    """A MATLAB file's variables (scipy; a clear error when scipy is missing or the file is bad)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DiffeatError(
            f"reading {path} needs scipy: pip install 'diffeat[jhmdb]' (or pip install scipy)"
        ) from None
    if not path.is_file():
        raise DiffeatError(f"annotation not found: {path}")
    try:
        return loadmat(str(path))
    except Exception as exc:  # scipy raises several kinds for a damaged file
        raise DiffeatError(f"{path} is not a readable MATLAB file ({exc})") from None


class Jhmdb(Dataset):
    Options = JhmdbOptions
    title = "JHMDB"
    url = JHMDB_URL
    layout = """
        Rename_Images/<action>/<video>/*.png and joint_positions/<action>/<video>/joint_positions.mat
        (pos_img [2, 15, T]) with testlist_split1.txt (per line: a joint_positions.mat path and
        its Rename_Images folder) or splits/<action>_test_split1.txt ("<video>.avi 2": test).
    """
    default_protocol = "jhmdb-videowalk"
    task = "propagation"

    def __init__(self, options: JhmdbOptions | None = None) -> None:
        super().__init__(options or JhmdbOptions())

    def _relative(self, root: Path, raw: str, marker: str, where: str) -> Path:
        """A list entry under root: from its ``marker`` part on (lists carry their author's
        absolute prefix), else as a relative path."""
        parts = Path(raw.replace("\\", "/")).parts
        if marker in parts:
            return inside_root(root, parts[parts.index(marker) :], where)
        return inside_root(root, raw, where)

    def entries(self, root: Path) -> list[tuple[str, Path, Path]]:
        """``(id, frames folder, joint_positions.mat)`` of every test video."""
        n = self.options.split
        listing = Path(self.options.list).expanduser() if self.options.list else None
        if listing is not None and not listing.is_absolute():
            listing = root / listing
        if listing is None and (root / f"testlist_split{n}.txt").is_file():
            listing = root / f"testlist_split{n}.txt"
        out = []
        if listing is not None:
            if not listing.is_file():
                raise DiffeatError(f"JHMDB test list not found: {listing}")
            for number, line in enumerate(listing.read_text().splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                mats = [f for f in fields if f.endswith(".mat")]
                dirs = [f for f in fields if not f.endswith(".mat")]
                if len(mats) != 1 or len(dirs) != 1:
                    raise DiffeatError(
                        f"{listing} line {number}: expected a joint_positions.mat path and a "
                        f"Rename_Images folder, got {line!r}"
                    )
                where = f"{listing} line {number}"
                mat = self._relative(root, mats[0], "joint_positions", where)
                frames = self._relative(root, dirs[0], "Rename_Images", where)
                out.append((f"{frames.parent.name}/{frames.name}", frames, mat))
            return out
        splits = sorted((root / "splits").glob(f"*_test_split{n}.txt"))
        if not splits:
            raise self.missing(root, [f"testlist_split{n}.txt or splits/*_test_split{n}.txt"])
        for split_file in splits:
            action = split_file.name[: -len(f"_test_split{n}.txt")]
            for line in split_file.read_text().splitlines():
                fields = line.split()
                if len(fields) == 2 and fields[1] == "2":
                    video = Path(fields[0]).stem
                    where = str(split_file)
                    frames = inside_root(root, ("Rename_Images", action, video), where)
                    mat = inside_root(
                        root, ("joint_positions", action, video, "joint_positions.mat"), where
                    )
                    out.append((f"{action}/{video}", frames, mat))
        return out

    def videos(self) -> Iterator[Video]:
        root = self.root_dir()
        for vid, frames_dir, mat in self.entries(root):
            frames = (
                sorted(
                    p
                    for p in frames_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
                if frames_dir.is_dir()
                else []
            )
            try:
                if not frames:
                    raise DiffeatError(f"{frames_dir}: no frames")
                pos = np.asarray(load_mat(mat).get("pos_img"), dtype=np.float64)
                if pos.ndim != 3 or pos.shape[0] != 2:
                    raise DiffeatError(
                        f"{mat}: pos_img should be [2, joints, frames], got {pos.shape}"
                    )
            except DiffeatError as exc:
                yield Video(vid, frames, labels="joints", meta={"error": str(exc)})
                continue
            joints = pos.transpose(2, 1, 0) - (1.0 if self.options.one_based else 0.0)
            t = min(len(frames), len(joints))
            yield Video(
                vid,
                frames[:t],
                labels="joints",
                first=joints[0],
                truth=[joints[i] for i in range(t)],
                meta={"frames_dir": str(frames_dir), "annotation": str(mat)},
            )
