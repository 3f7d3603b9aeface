"""The arithmetic of the homography task (DIFT's ``eval_hpatches.py`` / ``eval_homography.py``).

- :func:`sample_descriptors`: descriptors at keypoints, sampled bilinearly from a
  view's descriptor map. DIFT normalises keypoint ``x`` with ``(w - 1) / 2``
  (``u = 2x / (w - 1) - 1``) and then calls ``grid_sample`` with
  ``align_corners=False`` (zeros padding), for which ``u = -1`` is the *edge* of
  the first cell, not its centre: points are read up to half a cell away from
  where they lie. ``half_cell_offset=True`` reproduces that exactly
  (:func:`official_points` gives the pixel each keypoint is really read at);
  ``False`` samples at the keypoints with the library's convention
  (:func:`diffeat.core.geometry.sample_at`, border padding).
- :func:`mutual_nearest`: mutual nearest neighbours between two descriptor sets,
  cosine (DIFT SD) or squared L2 (DIFT ADM).
- :func:`estimate_homography`: OpenCV ``findHomography`` (LMEDS, or RANSAC with a
  reprojection threshold).
- :func:`corner_error` and :func:`accuracy`: mean distance of the four warped image
  corners, and the share of pairs within each threshold (``error <= t``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffeat.core.components import View
from diffeat.core.errors import DiffeatError
from diffeat.core.geometry import grid_size_of, sample_at
from diffeat.core.sequences import apply_homography

METHODS = ("lmeds", "ransac")
METRICS = ("cosine", "l2")

__all__ = [
    "METHODS",
    "METRICS",
    "accuracy",
    "corner_error",
    "corners",
    "estimate_homography",
    "mutual_nearest",
    "official_points",
    "require_cv2",
    "sample_descriptors",
    "unique_keypoints",
]


def require_cv2():
    """The ``cv2`` module, or a :class:`DiffeatError` saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise DiffeatError(
            "the homography task needs OpenCV (findHomography, keypoint detectors): "
            "pip install 'diffeat[geometric]' (opencv-python-headless)"
        ) from None
    return cv2


def official_points(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Where DIFT's sampling really reads each keypoint, in pixel indices of an image of
    ``size = (w, h)``: ``x * w / (w - 1) - 0.5`` (and the same for ``y``).

    DIFT's ``u = 2x / (w - 1) - 1`` with ``align_corners=False`` is the library's
    ``u = 2 (x' + 0.5) / w - 1`` at ``x' = x * w / (w - 1) - 0.5``: keypoint 0 is read
    at the image's left edge (-0.5), keypoint ``w - 1`` at its right edge (``w - 0.5``).
    """
    w, h = size
    scale = points.new_tensor([w / max(w - 1, 1), h / max(h - 1, 1)])
    return points * scale - 0.5


def _sample_zeros(feature_map: torch.Tensor, grid_points: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` at cell coordinates with zeros padding (what DIFT's call does)."""
    gw, gh = grid_size_of(feature_map)
    size = grid_points.new_tensor([float(gw), float(gh)])
    norm = (grid_points + 0.5) / size * 2.0 - 1.0
    out = F.grid_sample(
        feature_map.unsqueeze(0),
        norm.view(1, 1, -1, 2).to(feature_map.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return out[0, :, 0, :].transpose(0, 1)


def sample_descriptors(
    view: View, points: np.ndarray, *, half_cell_offset: bool = True
) -> np.ndarray:
    """``[N, C]`` float32 descriptors of ``view`` at ``[N, 2]`` image points (see module doc)."""
    if view.descriptors is None:
        raise DiffeatError("the homography task needs descriptor maps (a view without them)")
    fmap = view.descriptors.detach().float().cpu()
    pts = torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(-1, 2)
    if len(pts) == 0:
        return np.zeros((0, fmap.shape[0]), dtype=np.float32)
    if half_cell_offset:
        grid = view.image_to_grid(official_points(pts, view.image_size))
        out = _sample_zeros(fmap, grid)
    else:
        out = sample_at(fmap, view.image_to_grid(pts))
    return out.numpy().astype(np.float32)


def unique_keypoints(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints without repeats, sorted as ``np.unique(axis=0)`` sorts them (as DIFT
    does before matching), and the index of each kept one in ``points``."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(pts) == 0:
        return pts, np.zeros(0, dtype=np.int64)
    kept, index = np.unique(pts, return_index=True, axis=0)
    return kept, index


def mutual_nearest(a: np.ndarray, b: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """``[M, 2]`` index pairs ``(i, j)``: ``b[j]`` is ``a[i]``'s nearest and ``a[i]`` is
    ``b[j]``'s. ``cosine``: largest cosine similarity; ``l2``: smallest squared distance.
    Ties go to the lowest index (``torch.max``)."""
    if metric not in METRICS:
        raise DiffeatError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    ta = torch.as_tensor(np.asarray(a, dtype=np.float32))
    tb = torch.as_tensor(np.asarray(b, dtype=np.float32))
    if metric == "cosine":
        sim = F.normalize(ta, dim=1) @ F.normalize(tb, dim=1).T
    else:
        sim = -((ta**2).sum(1, keepdim=True) + (tb**2).sum(1, keepdim=True).T - 2 * ta @ tb.T)
    nn12 = sim.max(dim=1).indices
    nn21 = sim.max(dim=0).indices
    ids = torch.arange(len(ta))
    mask = ids == nn21[nn12]
    return torch.stack([ids[mask], nn12[mask]], dim=1).numpy().astype(np.int64)


def estimate_homography(
    src: np.ndarray, dst: np.ndarray, method: str = "lmeds", threshold: float = 3.0
) -> tuple[np.ndarray | None, np.ndarray]:
    """``cv2.findHomography(src, dst)`` with LMEDS or RANSAC (``threshold`` px); returns the
    3x3 matrix (``None`` with fewer than 4 matches or when OpenCV finds none) and the
    inlier mask ``[M]``."""
    if method not in METHODS:
        raise DiffeatError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    n = len(src)
    if n < 4:
        return None, np.zeros(n, dtype=bool)
    cv2 = require_cv2()
    flag = cv2.LMEDS if method == "lmeds" else cv2.RANSAC
    a = np.asarray(src, dtype=np.float32).reshape(-1, 1, 2)
    b = np.asarray(dst, dtype=np.float32).reshape(-1, 1, 2)
    matrix, mask = cv2.findHomography(a, b, flag, ransacReprojThreshold=float(threshold))
    if matrix is None or not np.isfinite(matrix).all():
        return None, np.zeros(n, dtype=bool)
    inliers = np.zeros(n, dtype=bool) if mask is None else mask.reshape(-1).astype(bool)
    return np.asarray(matrix, dtype=np.float64), inliers


def corners(size: tuple[int, int]) -> np.ndarray:
    """The four corner pixels of an image of ``size = (w, h)``, in DIFT's order."""
    w, h = size
    return np.array([[0, 0], [0, h - 1], [w - 1, 0], [w - 1, h - 1]], dtype=np.float64)


def corner_error(estimated: np.ndarray | None, truth: np.ndarray, size: tuple[int, int]) -> float:
    """Mean distance between the reference image's corners warped by ``estimated`` and by
    ``truth`` (``inf`` without an estimate or when a corner maps to infinity)."""
    if estimated is None:
        return float("inf")
    c = corners(size)
    d = np.linalg.norm(apply_homography(estimated, c) - apply_homography(truth, c), axis=1)
    value = float(np.mean(d))
    return value if np.isfinite(value) else float("inf")


def accuracy(errors: Sequence[float], thresholds: Sequence[float]) -> dict[str, float | None]:
    """Share of ``errors`` ``<= t`` for each threshold (``None`` with no errors), keyed by
    the threshold as text (``"1"``, ``"3"``, ``"5"``, ``"2.5"``)."""
    e = np.asarray(list(errors), dtype=np.float64)
    out: dict[str, float | None] = {}
    for t in thresholds:
        out[threshold_key(t)] = float(np.mean(e <= t)) if len(e) else None
    return out


def threshold_key(t: float) -> str:
    """A threshold as text: ``1.0 -> "1"``, ``2.5 -> "2.5"``."""
    return f"{float(t):g}"
