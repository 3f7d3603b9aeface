"""Keypoints for the homography task when the benchmark gives none (OpenCV detectors).

DIFT evaluates HPatches at precomputed SuperPoint keypoints (see
``diffeat.plugins.datasets.hpatches``). Without those files the task detects
its own, so that it runs on any folder of images:

- ``sift`` (default): ``cv2.SIFT_create()`` on the grayscale image;
- ``orb``: ``cv2.ORB_create(nfeatures=max(500, max_keypoints))``;
- ``gftt``: ``cv2.goodFeaturesToTrack`` (Shi-Tomasi corners, quality level 0.01,
  minimum distance 3 px), its response being the minimum eigenvalue at the corner.

Each keeps the ``max_keypoints`` strongest by response (ties: the detector's order),
as ``(x, y)`` pixel indices (OpenCV's pixel centres are the library's). Only the
location is used: descriptors come from the pipeline.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffeat.core.errors import DiffeatError
from diffeat.eval.homography_metrics import require_cv2

DETECTORS = ("sift", "orb", "gftt")

__all__ = ["DETECTORS", "detect_keypoints"]


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.uint8)


def detect_keypoints(image: Image.Image, detector: str = "sift", count: int = 1000) -> np.ndarray:
    """The ``count`` strongest keypoints of ``image``: ``[N, 2]`` float64 ``(x, y)``."""
    if detector not in DETECTORS:
        raise DiffeatError(
            f"[homography] detector must be one of {', '.join(DETECTORS)}, got {detector!r}"
        )
    cv2 = require_cv2()
    gray = _gray(image)
    if detector == "gftt":
        found = cv2.goodFeaturesToTrack(gray, maxCorners=0, qualityLevel=0.01, minDistance=3)
        if found is None:
            return np.zeros((0, 2))
        pts = found.reshape(-1, 2).astype(np.float64)
        eig = cv2.cornerMinEigenVal(gray, 3)
        xi, yi = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
        response = eig[yi, xi]
    else:
        make = cv2.SIFT_create() if detector == "sift" else cv2.ORB_create(max(500, count))
        kps = make.detect(gray, None)
        if not kps:
            return np.zeros((0, 2))
        pts = np.array([k.pt for k in kps], dtype=np.float64)
        response = np.array([k.response for k in kps], dtype=np.float64)
    order = np.argsort(-response, kind="stable")[:count]
    return pts[order]
