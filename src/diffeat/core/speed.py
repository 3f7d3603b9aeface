"""Model-level speed switches the extractors share: channels-last memory and ``torch.compile``.

Neither changes what is computed, only how (float rounding may differ, as with another
batch size), so extractors mark their options ``cache=False``. Attention needs no switch:
diffusers' default processor (``AttnProcessor2_0``) and transformers' default
(``attn_implementation="sdpa"``) already call :func:`torch.nn.functional.scaled_dot_product_attention`,
which picks flash / memory-efficient kernels on CUDA.

:func:`compile_around` compiles the submodules that hold no captured layer, so the
forward hooks that capture layers and stop the forward early stay outside compiled code
(a hook inside a compiled region would break the graph or recompile on every change).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["compile_around", "to_channels_last"]


def to_channels_last(*modules: nn.Module) -> None:
    """Put the 4-d weights of ``modules`` in channels-last memory format (in place)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compile_around(model: nn.Module, captured: Iterable[str], **options: object) -> list[str]:
    """``torch.compile`` (in place, :meth:`nn.Module.compile`) the largest submodules of
    ``model`` that neither are nor contain a module named in ``captured``; returns their
    names. ``options`` go to :func:`torch.compile` (e.g. ``mode="max-autotune"``)."""
    keep = set(captured)
    compiled: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full in keep:
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or any(
                k.startswith(full + ".") for k in keep
            ):  # containers have no forward of their own: look inside
                visit(child, full)
                continue
            if any(True for _ in child.parameters()):  # nothing to gain on parameter-free glue
                child.compile(**options)  # type: ignore[arg-type]
                compiled.append(full)

    visit(model, "")
    return compiled
