"""DAVIS-2017 semi-supervised scores, computed as ``davis2017-evaluation`` computes them.

- J (region similarity): the IoU of a predicted and a ground-truth object mask;
  ``1`` when both are empty (``union == 0``).
- F (boundary accuracy): the F-measure of the masks' one-pixel boundaries
  (``_seg2bmap``: a pixel differing from its east, south or south-east
  neighbour), a boundary pixel matching when the other boundary, dilated by a
  disk of radius ``ceil(0.008 * image diagonal)`` (skimage ``disk``), covers
  it. Both boundaries empty: F = 1; only one empty: precision / recall 1 and 0,
  so F = 0.
- Semi-supervised protocol: the objects are the ids ``1..N`` of the first
  frame's annotation (void ``255`` counted as background); every frame but the
  first and the last is scored (``[1:-1]``); an object's J (F) is the mean
  over those frames; J-Mean and F-Mean are means over all objects of all
  sequences; ``J&F = (J-Mean + F-Mean) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BOUNDARY_TOLERANCE",
    "boundary_f",
    "disk",
    "object_masks",
    "region_j",
    "score_sequence",
    "seg2bmap",
]

#: the boundary tolerance of F, a fraction of the image diagonal
BOUNDARY_TOLERANCE = 0.008


def region_j(gt: np.ndarray, pred: np.ndarray) -> float:
    """IoU of two boolean masks ``[H, W]`` (1 when both are empty)."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} and {pred.shape}")
    union = np.sum(gt | pred)
    if np.isclose(union, 0):
        return 1.0
    return float(np.sum(gt & pred) / union)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """The one-pixel boundary of a boolean mask (``davis2017-evaluation``'s ``_seg2bmap``)."""
    seg = np.asarray(seg, bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def disk(radius: int) -> np.ndarray:
    """skimage's ``disk(radius)``: ``x^2 + y^2 <= radius^2`` on a ``(2r+1)^2`` grid."""
    r = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(r, r)
    return (x**2 + y**2 <= radius**2).astype(np.uint8)


def _dilate(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Binary dilation with a symmetric kernel, outside the image counting as empty (cv2's)."""
    r = kernel.shape[0] // 2
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = torch.from_numpy(kernel.astype(np.float32))[None, None]
    return (F.conv2d(x, k, padding=r)[0, 0] > 0.5).numpy()


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUNDARY_TOLERANCE) -> float:
    """DAVIS boundary F-measure of two boolean masks ``[H, W]``."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} and {pred.shape}")
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(pred.shape))
    fg_boundary = seg2bmap(pred)
    gt_boundary = seg2bmap(gt)
    kernel = disk(int(bound_pix))
    fg_dil = _dilate(fg_boundary, kernel)
    gt_dil = _dilate(gt_boundary, kernel)
    gt_match = gt_boundary & fg_dil
    fg_match = fg_boundary & gt_dil
    n_fg, n_gt = int(fg_boundary.sum()), int(gt_boundary.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float(fg_match.sum()) / n_fg
        recall = float(gt_match.sum()) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def object_masks(ids: np.ndarray, objects: int) -> np.ndarray:
    """``[objects, H, W]`` booleans of ids ``1..objects`` (void 255 is no object)."""
    ids = np.asarray(ids)
    return (
        np.stack([ids == k for k in range(1, objects + 1)])
        if objects
        else np.zeros((0, *ids.shape), bool)
    )


def score_sequence(
    truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray]
) -> dict[str, list[float] | list[list[float]]]:
    """Per-object J and F of one sequence (semi-supervised: frames ``[1:-1]``).

    ``truth`` and ``predicted`` are the id maps of every frame. Returns ``J`` and
    ``F`` (per object, the mean over the scored frames) and ``J_frames`` /
    ``F_frames`` (per object, per scored frame).
    """
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} ground-truth frames but {len(predicted)} predictions")
    first = np.where(np.asarray(truth[0]) == 255, 0, truth[0])
    objects = int(first.max(initial=0))
    j_frames: list[list[float]] = [[] for _ in range(objects)]
    f_frames: list[list[float]] = [[] for _ in range(objects)]
    for gt_ids, pred_ids in zip(truth[1:-1], predicted[1:-1]):
        gt_ids = np.where(np.asarray(gt_ids) == 255, 0, gt_ids)
        gts = object_masks(gt_ids, objects)
        preds = object_masks(pred_ids, objects)
        for k in range(objects):
            j_frames[k].append(region_j(gts[k], preds[k]))
            f_frames[k].append(boundary_f(gts[k], preds[k]))
    j = [float(np.mean(v)) if v else float("nan") for v in j_frames]
    f = [float(np.mean(v)) if v else float("nan") for v in f_frames]
    return {"J": j, "F": f, "J_frames": j_frames, "F_frames": f_frames}
