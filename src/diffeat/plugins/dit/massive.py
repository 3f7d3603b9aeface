"""DiTF's normalisation of massive activations (Gan et al., NeurIPS 2025).

A few channels of a diffusion transformer's residual stream carry activations
orders of magnitude above the rest ("massive activations"), which swamp cosine
similarities. The blocks never see the raw stream: each reads it through its
AdaLN, ``(1 + scale) * LayerNorm(x) + shift`` with ``shift``, ``scale`` computed
from the timestep (and pooled text) embedding. DiTF's features are the stream
seen that way, with the massive channels zeroed before the LayerNorm so that
they do not dominate its statistics.

Facts from the official code (``ganchaofan0000/DiTF``, ``eval_spair.py`` and
``src/flux/model.py``): the feature of FLUX block ``k = 28`` is the input of
the 10th single-stream block (the 19 double-stream blocks come first); the
ensemble is averaged first (features and the block's shift/scale); then
channels 154 and 1446 are set to 0 (``--cd``), a ``LayerNorm(3072,
elementwise_affine=False, eps=1e-6)`` runs over channels per token, and
``(1 + scale) * x + shift`` uses that block's own AdaLN modulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: the LayerNorm epsilon of DiTF (and of the blocks' AdaLN norms)
EPS = 1e-6


def ditf_normalise(
    features: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    channels: Sequence[int] = (),
) -> torch.Tensor:
    """DiTF's normalisation of feature maps ``[..., C, H, W]`` with per-map ``shift`` and
    ``scale`` ``[..., C]``: zero ``channels``, LayerNorm over ``C`` (no affine, eps 1e-6),
    then ``(1 + scale) * x + shift``. Returns a new tensor."""
    x = features.clone()
    if channels:
        x[..., list(channels), :, :] = 0.0
    tokens = x.movedim(-3, -1)  # [..., H, W, C]
    tokens = F.layer_norm(tokens, (tokens.shape[-1],), eps=EPS)
    tokens = (1 + scale[..., None, None, :]) * tokens + shift[..., None, None, :]
    return tokens.movedim(-1, -3).contiguous()
