"""Label propagation through a video with a feature affinity: the tensor arithmetic.

This is the propagation of DINO's ``eval_video_segmentation.py`` (from UVC),
which DIFT uses for DAVIS-2017 and JHMDB, with its settings as parameters:

- the context of a target frame is the first frame (its ground truth, one-hot
  at feature resolution) and the last ``context`` frames' predicted *soft*
  labels, each with its features;
- the affinity from a target cell to a context cell is ``exp(cos / temperature)``
  (cosine of the L2-normalised features), zero outside a ``(2 * radius + 1)^2``
  window around the target cell on the grid (``radius <= 0``: no window);
- for each target cell only the ``topk`` largest affinities over *all* context
  positions jointly are kept (every value equal to the k-th largest is kept, as
  the official ``aff[aff < kth] = 0``), then they are normalised to sum to 1;
- the target's soft labels are the context labels times the affinity.

Then :func:`labels_to_ids`: bilinear upsampling to the model input
(``align_corners=False``, i.e. ``x stride``), per-channel min-max
normalisation (channels whose maximum is not positive are left alone), argmax,
and a nearest resize to the original frame size.

Unlike the official code, which builds a dense ``[hw, hw]`` window mask per
context frame, the affinity is computed in blocks of target cells against only
the context cells the window can reach; the values kept and their sums are the
same (tested against a dense transcription), the memory is bounded by
``block``. The context queue (:class:`Propagator`) lives on the device of
the features given to it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "Propagator",
    "PropagationSettings",
    "dense_reference",
    "labels_to_ids",
    "norm_mask",
    "one_hot",
    "propagate",
]


@dataclass(frozen=True)
class PropagationSettings:
    """The numbers of the propagation (DIFT's DAVIS defaults)."""

    temperature: float = 0.2
    topk: int = 15
    context: int = 28
    radius: int = 15
    block: int = 8


def one_hot(ids: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """``[C, h, w]`` float one-hot of integer ids ``[h, w]``; ``C = max id + 1`` by default
    (the official ``to_one_hot``)."""
    ids = ids.long()
    n = int(ids.max().item()) + 1 if channels is None else channels
    return F.one_hot(ids, n).permute(2, 0, 1).float()


def _normalise(features: torch.Tensor) -> torch.Tensor:
    """``[C, h, w]`` -> unit-norm ``[h*w, C]`` rows."""
    c = features.shape[0]
    return F.normalize(features.reshape(c, -1).T.float(), dim=1, p=2)


def propagate(
    target: torch.Tensor,
    context_feats: torch.Tensor,
    context_labels: torch.Tensor,
    settings: PropagationSettings,
) -> torch.Tensor:
    """Soft labels ``[L, h, w]`` of a target frame.

    ``target`` is ``[h*w, C]`` unit-norm features; ``context_feats`` ``[n, h*w, C]``
    unit-norm; ``context_labels`` ``[n, L, h, w]``. Every map has the grid ``h x w``.
    """
    n, hw, c = context_feats.shape
    labels_n, h, w = context_labels.shape[1:]
    assert h * w == hw == target.shape[0], "target and context grids differ"
    r = settings.radius if settings.radius > 0 else max(h, w)
    out = torch.empty(labels_n, h, w, device=target.device, dtype=context_labels.dtype)
    tgt = target.view(h, w, c)
    ctx_f = context_feats.view(n, h, w, c)
    ctx_l = context_labels.view(n, labels_n, h, w)
    dev = target.device
    step = max(1, settings.block)
    for y0 in range(0, h, step):
        y1 = min(h, y0 + step)
        b0, b1 = max(0, y0 - r), min(h, y1 + r)  # the context rows the window reaches
        for x0 in range(0, w, step):
            x1 = min(w, x0 + step)
            a0, a1 = max(0, x0 - r), min(w, x1 + r)  # ... and columns
            q = tgt[y0:y1, x0:x1].reshape(-1, c)  # [m, C]
            keys = ctx_f[:, b0:b1, a0:a1].reshape(-1, c)  # [n*band, C]
            aff = torch.exp((q @ keys.T) / settings.temperature)  # [m, n*band]
            ty, tx = torch.meshgrid(
                torch.arange(y0, y1, device=dev), torch.arange(x0, x1, device=dev), indexing="ij"
            )
            ky, kx = torch.meshgrid(
                torch.arange(b0, b1, device=dev), torch.arange(a0, a1, device=dev), indexing="ij"
            )
            ty, tx, ky, kx = ty.reshape(-1), tx.reshape(-1), ky.reshape(-1), kx.reshape(-1)
            inside = ((ty[:, None] - ky[None, :]).abs() <= r) & (
                (tx[:, None] - kx[None, :]).abs() <= r
            )
            m = aff.shape[0]
            aff = (aff.view(m, n, -1) * inside.unsqueeze(1)).view(m, -1)
            k = min(settings.topk, aff.shape[1])
            kth = torch.topk(aff, k=k, dim=1).values[:, -1:]
            if settings.topk > aff.shape[1]:
                kth = torch.zeros_like(kth)  # the official top-k also sees the zeros out of reach
            aff = aff.masked_fill_(aff < kth, 0.0)
            aff = aff / aff.sum(dim=1, keepdim=True)
            labels = ctx_l[:, :, b0:b1, a0:a1].permute(0, 2, 3, 1).reshape(-1, labels_n)
            out[:, y0:y1, x0:x1] = (aff @ labels).T.view(labels_n, y1 - y0, x1 - x0)
    return out.view(labels_n, h, w)


def dense_reference(
    target: torch.Tensor,
    context_feats: torch.Tensor,
    context_labels: torch.Tensor,
    settings: PropagationSettings,
) -> torch.Tensor:
    """A direct transcription of the official dense computation (for tests): a full
    ``[n, hw, hw]`` affinity, window mask, top-k over dim 0 of ``[n*hw, hw]``."""
    n, hw, _ = context_feats.shape
    labels_n, h, w = context_labels.shape[1:]
    aff = torch.exp(
        torch.bmm(target.unsqueeze(0).repeat(n, 1, 1), context_feats.transpose(1, 2))
        / settings.temperature
    )  # [n, hw (target), hw (context)]
    if settings.radius > 0:
        r = settings.radius
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        mask = ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)
        aff = aff * mask.unsqueeze(0).to(aff)
    aff = aff.transpose(2, 1).reshape(-1, hw)  # [n*hw (context), hw (target)]
    kth = torch.topk(aff, dim=0, k=settings.topk).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / torch.sum(aff, keepdim=True, dim=0)
    segs = context_labels.reshape(n, labels_n, -1).transpose(2, 1).reshape(-1, labels_n).T
    return torch.mm(segs, aff).reshape(labels_n, h, w)


def norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max normalisation of ``[C, H, W]`` (channels with max <= 0 unchanged)."""
    out = mask.clone()
    for i in range(out.shape[0]):
        ch = out[i]
        if ch.max() > 0:
            ch = ch - ch.min()
            out[i] = ch / ch.max()
    return out


def upsample(labels: torch.Tensor, model_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear ``[C, h, w]`` -> ``[C, H, W]`` at the model input (``x stride``)."""
    w, h = model_size
    return F.interpolate(labels[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def labels_to_ids(
    labels: torch.Tensor,
    model_size: tuple[int, int],
    frame_size: tuple[int, int],
    content_box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Soft labels ``[C, h, w]`` -> ids ``[H, W]`` (uint8) at the original ``frame_size``.

    ``content_box`` ``(x0, y0, x1, y1)`` is where the frame lies in the model
    input (a padded fit); ``None``: all of it (a resize).
    """
    up = norm_mask(upsample(labels, model_size))
    ids = torch.argmax(up, dim=0).to(torch.uint8).cpu().numpy()
    if content_box is not None:
        x0, y0, x1, y1 = content_box
        ids = ids[y0:y1, x0:x1]
    return np.asarray(Image.fromarray(ids).resize(tuple(frame_size), Image.Resampling.NEAREST))


class Propagator:
    """The context queue of one video: the first frame plus the last ``context`` predictions.

    Everything it holds stays on the device of the features it is given.
    """

    def __init__(self, settings: PropagationSettings) -> None:
        self.settings = settings
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None
        self.queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(
            maxlen=max(0, settings.context)
        )

    def start(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Frame 0: its features ``[C, h, w]`` and labels ``[L, h, w]`` (one-hot or maps)."""
        self.first = (_normalise(features), labels.to(features.device, torch.float32))
        self.queue.clear()

    def step(self, features: torch.Tensor) -> torch.Tensor:
        """Soft labels ``[L, h, w]`` of the next frame; it joins the context."""
        if self.first is None:
            raise RuntimeError("Propagator.start first")
        tgt = _normalise(features)
        items = [self.first, *self.queue]
        if tgt.shape != items[0][0].shape:
            raise ValueError(
                f"frame features {tuple(features.shape)} differ in size from the first frame's"
            )
        feats = torch.stack([f for f, _ in items])
        labels = torch.stack([lab for _, lab in items])
        soft = propagate(tgt, feats, labels, self.settings)
        if self.queue.maxlen:
            self.queue.append((tgt, soft))
        return soft
