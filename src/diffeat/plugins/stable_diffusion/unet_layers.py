"""The UNet layers an extractor reads: names and glob patterns resolved on the model, and
the one way every recipe runs a UNet pass while capturing those layers' outputs."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from diffeat.core.errors import ConfigError
from diffeat.plugins.module_capture import HookTarget, ModuleCapture, first_tensor


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


def capture_outputs(
    model: nn.Module, names: list[str], *, stop_early: bool = True
) -> ModuleCapture:
    """A :class:`ModuleCapture` of the outputs of the named submodules of ``model``."""
    modules = dict(model.named_modules())
    targets = [HookTarget(name, modules[name], "output", first_tensor) for name in names]
    return ModuleCapture(targets, stop_early=stop_early)


class UNetPasses:
    """UNet passes that capture the outputs of ``names`` (float32), shared by every recipe.

    :meth:`maps` is for a pass whose UNet output is not needed: with ``stop_early``
    the forward ends once the deepest captured module ran. :meth:`predict` is for a
    pass whose noise prediction moves a latent on: it runs the whole UNet and
    captures only when asked.
    """

    def __init__(self, unet: nn.Module, names: list[str], *, stop_early: bool = True) -> None:
        self.unet = unet
        self.names = names
        self.stop_early = stop_early

    def maps(
        self, latents: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The captured outputs of one pass at timestep ``t`` on prompt states ``context``."""
        with capture_outputs(self.unet, self.names, stop_early=self.stop_early) as cap:
            outs = cap.run(lambda: self.unet(latents, t, encoder_hidden_states=context))
        return {name: outs[name].float() for name in self.names}

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, capture: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The UNet output (``.sample``) of one whole pass and, with ``capture``, its maps."""
        if not capture:
            return self.unet(latents, t, encoder_hidden_states=context).sample, None
        result: dict[str, torch.Tensor] = {}

        def forward() -> None:
            result["sample"] = self.unet(latents, t, encoder_hidden_states=context).sample

        with capture_outputs(self.unet, self.names, stop_early=False) as cap:
            outs = cap.run(forward)
        return result["sample"], {name: outs[name].float() for name in self.names}
