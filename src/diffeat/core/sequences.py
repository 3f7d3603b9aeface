"""Image sequences related by known homographies: the records of ``"homography"`` datasets.

A dataset whose :attr:`~diffeat.core.datasets.Dataset.task` is ``"homography"``
(HPatches) yields, from ``sequences()``, one :class:`HomographySequence` per
sequence it can read and one :class:`SkippedSequence` per sequence it cannot (a
missing image or homography file, an unreadable one): the evaluation scores the
first and lists the second in ``results["skipped"]``, so one damaged sequence
never stops the others.

Coordinates follow the library convention (``diffeat.core.geometry``): points
are ``(x, y)`` pixel indices, the centre of the top-left pixel is ``(0, 0)``.
A homography ``H`` maps a reference point ``p`` to ``H @ [x, y, 1]`` (then
divided by its third coordinate) in the target, as HPatches' ``H_1_k`` files do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: the kinds of change a sequence shows (HPatches: ``i_*`` and ``v_*`` folders)
SEQUENCE_KINDS = ("illumination", "viewpoint")

__all__ = [
    "SEQUENCE_KINDS",
    "HomographyDataset",
    "HomographySequence",
    "SequenceImage",
    "SequenceTarget",
    "SkippedSequence",
    "apply_homography",
    "as_homography",
]


def as_homography(value: Any, what: str) -> np.ndarray:
    """``value`` as a finite, invertible 3x3 float64 matrix; ``ValueError`` naming ``what``."""
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"{what}: a homography is 3x3 numbers, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{what}: the homography has non-finite entries")
    if abs(np.linalg.det(matrix)) < 1e-12:
        raise ValueError(f"{what}: the homography is singular")
    return matrix


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``[N, 2]`` points through a 3x3 homography (``[N, 2]``; ``inf`` where the
    third coordinate is 0)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    hom = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ np.asarray(matrix).T
    with np.errstate(divide="ignore", invalid="ignore"):
        out = hom[:, :2] / hom[:, 2:3]
    return out


@dataclass
class SequenceImage:
    """One image of a sequence, with the keypoints the benchmark gives for it (if any).

    ``keypoints`` is ``[N, 2]`` ``(x, y)`` pixel indices (DIFT's precomputed SuperPoint
    points for HPatches), or ``None``: the evaluation then detects its own.
    """

    path: Path
    keypoints: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.keypoints is not None:
            kps = np.asarray(self.keypoints, dtype=np.float64)
            if kps.size == 0:
                kps = np.zeros((0, 2))
            if kps.ndim != 2 or kps.shape[1] != 2:
                raise ValueError(
                    f"{self.path}: keypoints must be [N, 2] (x, y), got {tuple(kps.shape)}"
                )
            self.keypoints = kps


@dataclass
class SequenceTarget:
    """A target image of a sequence and the homography from the reference to it."""

    image: SequenceImage
    homography: np.ndarray
    #: the image's number in its sequence (HPatches: 2..6)
    index: int

    def __post_init__(self) -> None:
        self.homography = as_homography(self.homography, f"{self.image.path}: homography")


@dataclass
class HomographySequence:
    """A reference image and the targets it is matched against (HPatches: 1 vs 2..6)."""

    name: str
    kind: str
    reference: SequenceImage
    targets: list[SequenceTarget] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in SEQUENCE_KINDS:
            raise ValueError(
                f"sequence {self.name}: kind must be one of {', '.join(SEQUENCE_KINDS)}, "
                f"got {self.kind!r}"
            )


@dataclass(frozen=True)
class SkippedSequence:
    """A sequence the dataset could not read, and why (the message names the file)."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


class HomographyDataset(Protocol):
    """What the homography evaluation needs of a dataset (besides ``describe``)."""

    def sequences(self) -> Iterator[HomographySequence | SkippedSequence]:
        """Every sequence of the benchmark in a stable order, readable or skipped."""
        ...
