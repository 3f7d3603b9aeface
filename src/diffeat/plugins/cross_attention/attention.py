"""Token attention maps of a UNet's cross-attention layers, read from hooks.

Hooks on each ``attn2``'s query and key projections capture their outputs; the
probabilities ``softmax(q k^T * scale)`` are recomputed per head in float32 from
them. The model's attention forward is never copied or replaced, so this keeps
working whatever attention implementation diffusers picks, and gradients flow to
the context through the captured key projections. The forward stops once the
last needed key projection ran.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffeat.core.errors import ConfigError
from diffeat.plugins.module_capture import HookTarget, ModuleCapture, first_tensor


@dataclass
class CrossAttentionLayer:
    """One cross-attention module: its name, the module and its head count and scale."""

    name: str
    module: nn.Module

    @property
    def heads(self) -> int:
        return int(self.module.heads)

    @property
    def scale(self) -> float:
        return float(self.module.scale)


def _is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) and all(
        hasattr(module, a) for a in ("to_q", "to_k", "heads", "scale")
    )


def resolve_layers(unet: nn.Module, names: Sequence[str]) -> list[CrossAttentionLayer]:
    """Every cross-attention module inside each named UNet module, in forward order.

    A name that is not a module of the UNet, or a module without cross-attention,
    is a :class:`ConfigError` naming it.
    """
    modules = dict(unet.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    found: list[str] = []
    for name in names:
        if name not in modules:
            tops = sorted({n.split(".")[0] for n in modules if n})
            raise ConfigError(
                f"matcher.layers: {name!r} is not a module of the UNet (top level: "
                f"{', '.join(tops)}); cross-attention lives in e.g. 'up_blocks.1.attentions.0'"
            )
        prefix = f"{name}."
        inner = [
            n
            for n, m in modules.items()
            if (n == name or n.startswith(prefix)) and _is_cross_attention(m)
        ]
        if not inner:
            candidates = [
                n.rsplit(".transformer_blocks", 1)[0]
                for n, m in modules.items()
                if _is_cross_attention(m)
            ]
            raise ConfigError(
                f"matcher.layers: the UNet module {name!r} has no cross-attention; modules "
                f"with cross-attention: {', '.join(dict.fromkeys(candidates))}"
            )
        found.extend(n for n in inner if n not in found)
    found.sort(key=order.__getitem__)
    return [CrossAttentionLayer(n, modules[n]) for n in found]


def token_probabilities(
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, token: int
) -> torch.Tensor:
    """``[B, heads, N]``: the attention probability of every query on ``token``.

    ``q`` is ``[B, N, heads * d]``, ``k`` ``[B, T, heads * d]``; softmax over the
    ``T`` keys per head, in float32.
    """
    b, n, c = q.shape
    d = c // heads
    qh = q.float().reshape(b, n, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1)[..., token]


class TokenAttention:
    """Runs the UNet and returns each layer's head maps ``[B, heads, s, s]`` of one token."""

    def __init__(self, unet: nn.Module, layers: list[CrossAttentionLayer], token: int) -> None:
        self.unet = unet
        self.layers = layers
        self.token = token

    def _targets(self) -> list[HookTarget]:
        targets = []
        for layer in self.layers:
            m = layer.module
            targets.append(HookTarget(f"{layer.name}.q", m.to_q, "output", first_tensor))
            targets.append(HookTarget(f"{layer.name}.k", m.to_k, "output", first_tensor))
        return targets

    def __call__(
        self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor]:
        with ModuleCapture(self._targets()) as cap:
            outs = cap.run(lambda: self.unet(latents, t, encoder_hidden_states=context))
        maps = []
        for layer in self.layers:
            q, k = outs[f"{layer.name}.q"], outs[f"{layer.name}.k"]
            probs = token_probabilities(q, k, layer.heads, layer.scale, self.token)
            side = math.isqrt(probs.shape[-1])
            if side * side != probs.shape[-1]:
                raise ValueError(f"{layer.name}: {probs.shape[-1]} queries is not a square grid")
            maps.append(probs.reshape(probs.shape[0], probs.shape[1], side, side))
        return maps


def select_heads(maps: torch.Tensor, heads: str) -> torch.Tensor:
    """``[B, H, s, s]`` -> the heads averaged: ``upper-half`` keeps ``H//2..H-1`` (official)."""
    if heads == "upper-half" and maps.shape[1] > 1:
        maps = maps[:, maps.shape[1] // 2 :]
    return maps.mean(dim=1)
