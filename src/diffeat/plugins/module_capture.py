"""Capturing named submodules' outputs (or inputs) with hooks, stopping the forward once all are in.

Models are never modified or re-implemented: hooks sit on their public
submodules, and a private exception ends the forward early when no deeper
module is needed. Used by every built-in extractor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


class _StopForward(Exception):
    """Raised from a hook once every requested output has been captured."""


@dataclass
class HookTarget:
    """Where one layer comes from.

    ``kind`` ``"output"``: a forward hook, ``read(output)`` gives ``[B, N, C]``;
    ``"input"``: a forward pre-hook, ``read(args)`` gives ``[B, N, C]``.
    """

    name: str
    module: nn.Module
    kind: Literal["output", "input"]
    read: Callable[[Any], torch.Tensor]


class ModuleCapture:
    """Context manager: hooks the targets; ``run(fn)`` calls ``fn()`` and returns the captures."""

    def __init__(self, targets: list[HookTarget], *, stop_early: bool = True) -> None:
        self.targets = targets
        self.stop_early = stop_early
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ModuleCapture:
        for t in self.targets:
            if t.kind == "output":
                self._handles.append(t.module.register_forward_hook(self._output_hook(t)))
            else:
                self._handles.append(t.module.register_forward_pre_hook(self._input_hook(t)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        self.outputs[name] = tensor
        if self.stop_early and len(self.outputs) == len(self.targets):
            raise _StopForward

    def _output_hook(self, t: HookTarget) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._store(t.name, t.read(output))

        return hook

    def _input_hook(self, t: HookTarget) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._store(t.name, t.read(args))

        return hook

    def run(self, forward: Callable[[], Any]) -> dict[str, torch.Tensor]:
        """Call ``forward()`` (ended early once all are in, with ``stop_early``) and return
        the captured tensors by name; a target that never ran is an error."""
        self.outputs = {}
        try:
            forward()
        except _StopForward:
            pass
        missing = [t.name for t in self.targets if t.name not in self.outputs]
        if missing:
            raise RuntimeError(f"layers {missing} were not computed during the forward pass")
        return self.outputs


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor of a module output (transformers 4.x layers return tuples)."""
    return output[0] if isinstance(output, (tuple, list)) else output
