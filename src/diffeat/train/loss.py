"""The training loss of Diffusion Hyperfeatures and the keypoint -> grid-cell mapping it needs.

``compute_clip_loss`` of the official ``train_hyperfeatures.py``: the cosine
similarity of every source cell with every target cell, times the logit scale
``1 / temperature``; cross-entropy from each source keypoint's cell to its
target keypoint's cell and back, averaged. Only the rows of the keypoints'
cells are computed, which gives the same numbers as the full matrices.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from diffeat.core.geometry import ImageTransform, Size

PointRounding = Literal["scale", "centres"]


def _flat_index(cx: np.ndarray, cy: np.ndarray, grid_size: Size) -> np.ndarray:
    gw, gh = grid_size
    cx = np.round(np.clip(cx, 0, gw - 1))  # np.round: half to even, as the official
    cy = np.round(np.clip(cy, 0, gh - 1))
    return (gw * cy + cx).astype(np.int64)


def cells_scale(
    points: np.ndarray,
    image_size: Size,
    grid_size: Size,
    transform: ImageTransform | None = None,
) -> np.ndarray:
    """Flat cell indices of image points ``[N, 2]`` (x, y) the way the official code maps them.

    ``rescale_points`` + ``points_to_idxs``: ``x * (grid_w / image_w)`` (no
    half-pixel offset), clipped to ``[0, grid_w - 1]``, rounded half to even;
    the same for ``y``; ``index = grid_w * y + x`` (row-major). With a
    ``transform`` that is not a plain resize (``size_rule = "pad"``), its fit
    scale and offset are applied the same way (no half-pixel shift).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    (w, h), (gw, gh) = image_size, grid_size
    if transform is None or transform == ImageTransform.resize(
        transform.image_size, transform.model_size
    ):
        return _flat_index(pts[:, 0] * (gw / w), pts[:, 1] * (gh / h), grid_size)
    (mw, mh) = transform.model_size
    rx, ry = gw / mw, gh / mh
    cx = pts[:, 0] * transform.scale[0] * rx + transform.offset[0] * rx
    cy = pts[:, 1] * transform.scale[1] * ry + transform.offset[1] * ry
    return _flat_index(cx, cy, grid_size)


def cells_centres(points: np.ndarray, transform: ImageTransform, grid_size: Size) -> np.ndarray:
    """Flat cell indices through diffeat's pixel-centre convention.

    The point goes through the extractor's transform to the grid covering the
    model input (``ImageTransform.image_to_grid``), then is clipped and rounded
    half to even like :func:`cells_scale`.
    """
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    grid = transform.image_to_grid(pts, grid_size).numpy()
    return _flat_index(grid[:, 0], grid[:, 1], grid_size)


def keypoint_cells(
    points: np.ndarray,
    image_size: Size,
    grid_size: Size,
    mode: PointRounding,
    transform: ImageTransform | None = None,
) -> np.ndarray:
    """Flat cell indices of ``points`` under ``mode`` (``"scale"`` or ``"centres"``)."""
    if mode == "scale":
        return cells_scale(points, image_size, grid_size, transform)
    if mode == "centres":
        if transform is None:
            raise ValueError("point_rounding 'centres' needs the image's transform")
        return cells_centres(points, transform, grid_size)
    raise ValueError(f"unknown point_rounding {mode!r}: use 'scale' or 'centres'")


def correspondence_loss(
    source: torch.Tensor,
    target: torch.Tensor,
    source_cells: torch.Tensor,
    target_cells: torch.Tensor,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Symmetric InfoNCE of two descriptor maps ``[C, H, W]`` at known corresponding cells.

    ``(CE(s[src] . t / tau, tgt) + CE(t[tgt] . s / tau, src)) / 2`` with
    L2-normalised descriptors, where ``src`` / ``tgt`` are flat cell indices
    ``[N]`` of the keypoints in the source / target map.
    """
    if source.ndim != 3 or target.ndim != 3:
        raise ValueError(
            f"expected two [C, H, W] maps, got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    src = F.normalize(source.flatten(1), dim=0)  # [C, HW]
    tgt = F.normalize(target.flatten(1), dim=0)
    scale = 1.0 / temperature
    source_cells = source_cells.to(src.device, torch.long)
    target_cells = target_cells.to(src.device, torch.long)
    source_logits = scale * (src[:, source_cells].T @ tgt)  # [N, HW_target]
    target_logits = scale * (tgt[:, target_cells].T @ src)  # [N, HW_source]
    loss_source = F.cross_entropy(source_logits, target_cells)
    loss_target = F.cross_entropy(target_logits, source_cells)
    return (loss_source + loss_target) / 2
