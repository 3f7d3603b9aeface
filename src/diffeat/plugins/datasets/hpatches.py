"""HPatches sequences (Balntas et al. 2017): the ``hpatches`` dataset (homography task).

Layout (``hpatches-sequences-release``, as distributed)::

    hpatches-sequences-release/
      i_<name>/1.ppm ... 6.ppm, H_1_2 ... H_1_6     (illumination: H is the identity)
      v_<name>/1.ppm ... 6.ppm, H_1_2 ... H_1_6     (viewpoint)

``H_1_k`` is a text file of 3x3 numbers mapping pixel coordinates of image 1 to
image ``k``. Image 1 of every sequence is matched against images 2..6 (5 pairs a
sequence), as in DIFT's ``eval_homography.py``.

Keypoints: DIFT evaluates at precomputed SuperPoint keypoints (1k per image),
one text file per image, ``<sequence>-<k>.kp`` in one folder (e.g.
``superpoint-1k/v_wall-3.kp``), read with ``numpy.loadtxt``: a row per
keypoint, its first two columns ``x y`` in pixels. Pass that folder as the
``keypoints`` option; without it the evaluation detects keypoints itself (see
``[homography] detector`` in docs/evaluation.md).

D2-Net's copy of the benchmark (the one DIFT evaluates, 108 sequences: 52
illumination, 56 viewpoint) drops the 8 sequences with images larger than
1600x1200; ``exclude_high_res = true`` (the default) drops them from a full
copy too, so both give the paper's set.

A sequence whose image or homography file is missing or unreadable is not
fatal: it is yielded as a :class:`~diffeat.core.sequences.SkippedSequence`
naming the file, and listed in the results.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffeat.core.datasets import Dataset, Pair
from diffeat.core.errors import DiffeatError
from diffeat.core.options import opt
from diffeat.core.sequences import (
    HomographySequence,
    SequenceImage,
    SequenceTarget,
    SkippedSequence,
    as_homography,
)

HPATCHES_URL = "https://github.com/hpatches/hpatches-dataset (hpatches-sequences-release.tar.gz)"
#: sequences with images larger than 1600x1200, left out by D2-Net's copy (and so by DIFT)
HIGH_RES = (
    "i_contruction",
    "i_crownnight",
    "i_dc",
    "i_pencils",
    "i_whitebuilding",
    "v_artisans",
    "v_astronautis",
    "v_talent",
)
KIND_OF_PREFIX = {"i_": "illumination", "v_": "viewpoint"}
SPLITS = ("all", "illumination", "viewpoint")
TARGETS = (2, 3, 4, 5, 6)
IMAGE_NAME = "{}.ppm"


@dataclass
class HPatchesOptions:
    root: str = opt("", "the hpatches-sequences-release folder (i_*/ and v_*/ sequences)")
    split: str = opt("all", "all, illumination (i_*) or viewpoint (v_*) sequences")
    keypoints: str = opt(
        "",
        "folder of DIFT's precomputed SuperPoint keypoints, <sequence>-<k>.kp text files "
        "(x y per row); empty: the evaluation detects keypoints ([homography] detector)",
    )
    exclude_high_res: bool = opt(
        True,
        "leave out the 8 sequences with images over 1600x1200, as D2-Net's copy (DIFT's) does",
    )
    sequences: list[str] = opt([], "only these sequences, by folder name (empty: all)")

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {self.split!r}")


def read_homography(path: Path) -> np.ndarray:
    """A ``H_1_k`` file as a 3x3 matrix; ``DiffeatError`` naming the file when it is not one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; we say it ourselves
            values = np.loadtxt(path, dtype=np.float64, ndmin=2)
        return as_homography(values, str(path))
    except (OSError, ValueError) as exc:
        text = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        raise DiffeatError(f"unreadable homography file {text}") from None


def read_keypoints(path: Path) -> np.ndarray:
    """A DIFT ``.kp`` file: ``[N, 2]`` ``(x, y)`` (the first two columns of each row)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DiffeatError(f"unreadable keypoint file {path}: {exc}") from None
    if values.size == 0:
        return np.zeros((0, 2))
    if values.shape[1] < 2 or not np.isfinite(values[:, :2]).all():
        raise DiffeatError(
            f"keypoint file {path}: expected rows of 'x y' numbers, got {values.shape[1]} "
            "column(s) or non-finite values"
        )
    return values[:, :2].copy()


class HPatches(Dataset):
    """HPatches sequences: image 1 against images 2..6 of every ``i_*`` / ``v_*`` folder."""

    Options = HPatchesOptions
    title = "HPatches sequences"
    url = HPATCHES_URL
    layout = """
        i_*/ and v_*/ sequence folders
        (hpatches-sequences-release): each with 1.ppm ... 6.ppm and H_1_2 ... H_1_6.
    """
    default_protocol = "dift"
    task = "homography"

    def __init__(self, options: HPatchesOptions) -> None:
        super().__init__(options)
        self.options: HPatchesOptions = options

    def pairs(self) -> Iterator[Pair]:
        raise DiffeatError(
            "hpatches is a homography benchmark, not keypoint pairs: evaluate it with "
            "diffeat eval CONFIG --dataset hpatches --root DIR (the homography task)"
        )

    def _keypoint_dir(self) -> Path | None:
        if not self.options.keypoints:
            return None
        folder = Path(self.options.keypoints).expanduser()
        if not folder.is_dir():
            raise DiffeatError(
                f"hpatches: keypoints={self.options.keypoints!r} is not a folder; pass DIFT's "
                "superpoint-1k folder (<sequence>-<k>.kp files) or leave it empty to detect "
                "keypoints"
            )
        return folder

    def sequence_dirs(self) -> list[Path]:
        """The sequence folders read, sorted by name (as DIFT's evaluation sorts them)."""
        root = self.root_dir()
        found = sorted(p for p in root.iterdir() if p.is_dir() and p.name[:2] in KIND_OF_PREFIX)
        if not found:
            raise self.missing(root, ["i_*/", "v_*/"])
        wanted = set(self.options.sequences)
        unknown = wanted - {p.name for p in found}
        if unknown:
            raise DiffeatError(
                f"hpatches: no sequence folder {', '.join(sorted(unknown))} under {root}"
            )
        split = self.options.split
        out = []
        for p in found:
            if wanted and p.name not in wanted:
                continue
            if self.options.exclude_high_res and p.name in HIGH_RES and not wanted:
                continue
            if split != "all" and KIND_OF_PREFIX[p.name[:2]] != split:
                continue
            out.append(p)
        return out

    def _image(self, folder: Path, k: int, kp_dir: Path | None) -> SequenceImage:
        path = folder / IMAGE_NAME.format(k)
        if not path.is_file():
            raise DiffeatError(f"missing image {path}")
        keypoints = None
        if kp_dir is not None:
            kp = kp_dir / f"{folder.name}-{k}.kp"
            if not kp.is_file():
                raise DiffeatError(f"missing keypoint file {kp}")
            keypoints = read_keypoints(kp)
        return SequenceImage(path, keypoints)

    def read_sequence(self, folder: Path, kp_dir: Path | None = None) -> HomographySequence:
        """One sequence folder; ``DiffeatError`` naming the missing or unreadable file."""
        reference = self._image(folder, 1, kp_dir)
        targets = []
        for k in TARGETS:
            image = self._image(folder, k, kp_dir)
            h_file = folder / f"H_1_{k}"
            if not h_file.is_file():
                raise DiffeatError(f"missing homography file {h_file}")
            targets.append(SequenceTarget(image, read_homography(h_file), k))
        return HomographySequence(folder.name, KIND_OF_PREFIX[folder.name[:2]], reference, targets)

    def sequences(self) -> Iterator[HomographySequence | SkippedSequence]:
        """Every sequence (sorted by name); unreadable ones as :class:`SkippedSequence`."""
        kp_dir = self._keypoint_dir()
        for folder in self.sequence_dirs():
            try:
                yield self.read_sequence(folder, kp_dir)
            except DiffeatError as exc:
                yield SkippedSequence(folder.name, str(exc))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["keypoints"] = (
            "precomputed files (DIFT's SuperPoint format)"
            if self.options.keypoints
            else "detected by the evaluation ([homography] detector)"
        )
        out["excluded_high_res"] = list(HIGH_RES) if self.options.exclude_high_res else []
        return out
