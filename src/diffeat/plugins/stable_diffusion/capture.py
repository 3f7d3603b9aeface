"""Which UNet modules to capture: names and glob patterns, resolved on the model."""

from __future__ import annotations

import fnmatch

from torch import nn

from diffeat.core.errors import ConfigError
from diffeat.plugins.capture import HookTarget, ModuleCapture, first_tensor


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


def OutputCapture(model: nn.Module, names: list[str], *, stop_early: bool = True) -> ModuleCapture:
    """Capture the outputs of the named submodules of ``model`` (see :class:`ModuleCapture`)."""
    modules = dict(model.named_modules())
    targets = [HookTarget(name, modules[name], "output", first_tensor) for name in names]
    return ModuleCapture(targets, stop_early=stop_early)
