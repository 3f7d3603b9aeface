"""The ``cross-attention`` matcher plugin: Hedlin et al.'s optimised-context correspondence
(Unsupervised Semantic Correspondence Using Stable Diffusion, NeurIPS 2023)."""

from __future__ import annotations

from diffeat.core.hookspecs import Register, hookimpl
from diffeat.plugins.cross_attention.matcher import CrossAttentionMatcher


@hookimpl
def register_matchers(register: Register) -> None:
    register("cross-attention", CrossAttentionMatcher)
