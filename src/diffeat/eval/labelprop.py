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
context frame, the affinity is computed in chunks of target rows against only
the context rows the window can reach; the values kept and their sums are the
same (tested against a dense transcription), the memory is bounded by
``chunk_rows``. The context queue (:class:`Propagator`) lives on the device of
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
    chunk_rows: int = 8


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
    out = torch.empty(labels_n, hw, device=target.device, dtype=context_labels.dtype)
    ctx_f = context_feats.view(n, h, w, c)
    ctx_l = context_labels.view(n, labels_n, h, w)
    xs = torch.arange(w, device=target.device)
    step = max(1, settings.chunk_rows)
    for y0 in range(0, h, step):
        y1 = min(h, y0 + step)
        b0, b1 = max(0, y0 - r), min(h, y1 + r)  # the context rows the window reaches
        q = target[y0 * w : y1 * w]  # [m, C]
        keys = ctx_f[:, b0:b1].reshape(-1, c)  # [n*band, C]
        aff = torch.exp((keys @ q.T) / settings.temperature)  # [n*band, m]
        ty = torch.arange(y0, y1, device=target.device).repeat_interleave(w)
        tx = xs.repeat(y1 - y0)
        ky = torch.arange(b0, b1, device=target.device).repeat_interleave(w)
        kx = xs.repeat(b1 - b0)
        inside = ((ky[:, None] - ty[None, :]).abs() <= r) & ((kx[:, None] - tx[None, :]).abs() <= r)
        aff = aff.view(n, -1, aff.shape[1]) * inside.unsqueeze(0)
        aff = aff.reshape(-1, aff.shape[2])
        k = min(settings.topk, aff.shape[0])
        kth = torch.topk(aff, k=k, dim=0).values.min(dim=0).values
        if aff.shape[0] < n * hw and settings.topk > aff.shape[0]:
            kth = torch.zeros_like(kth)  # the official top-k also sees the zeros out of reach
        aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
        aff = aff / aff.sum(dim=0, keepdim=True)
        labels = ctx_l[:, :, b0:b1].permute(1, 0, 2, 3).reshape(labels_n, -1)  # [L, n*band]
        out[:, y0 * w : y1 * w] = labels @ aff
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
