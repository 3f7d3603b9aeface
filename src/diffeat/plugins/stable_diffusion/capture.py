"""Capture module outputs with forward hooks and stop the forward once all are in.

The diffusers model is never modified or re-implemented: hooks sit on its
public submodules, and a private exception ends the forward early when no
deeper module is needed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffeat.core.errors import ConfigError


class _StopForward(Exception):
    """Raised from a hook once every requested output has been captured."""


def resolve_modules(model: nn.Module, patterns: list[str], where: str = "layers") -> list[str]:
    """Expand exact names and glob patterns (``up_blocks.*.resnets.*.conv2``) to module names.

    The order is the model's registration order; a name matching nothing is an error
    that lists the top-level candidates.
    """
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pattern in patterns:
        matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            tops = sorted({n.split(".")[0] for n in names})
            sample = [n for n in names if n.count(".") <= 1][:12]
            raise ConfigError(
                f"{where}: no module of the model matches {pattern!r}. Module names look like "
                f"{', '.join(sample)} (top level: {', '.join(tops)}); glob patterns such as "
                f"'up_blocks.*.resnets.*.conv2' are allowed"
            )
        chosen.extend(m for m in matches if m not in chosen)
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


class OutputCapture:
    """Context manager: hooks ``names`` of ``model``; ``run(fn)`` returns their outputs."""

    def __init__(self, model: nn.Module, names: list[str], *, stop_early: bool = True) -> None:
        self.model = model
        self.names = list(names)
        self.stop_early = stop_early
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> OutputCapture:
        modules = dict(self.model.named_modules())
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            self.outputs[name] = tensor
            if self.stop_early and len(self.outputs) == len(self.names):
                raise _StopForward

        return hook

    def run(self, forward: Callable[[], Any]) -> dict[str, torch.Tensor]:
        """Call ``forward()`` and return the captured outputs (all of them, or an error)."""
        self.outputs = {}
        try:
            forward()
        except _StopForward:
            pass
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"modules {missing} did not run during the forward pass")
        return self.outputs
