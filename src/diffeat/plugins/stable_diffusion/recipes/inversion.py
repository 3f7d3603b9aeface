"""``inversion`` (Diffusion Hyperfeatures, Luo et al. 2023): deterministic DDIM inversion
of the clean latent, keeping the maps at the kept timesteps on the way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from diffeat.plugins.stable_diffusion.ddim import DdimStep, inversion_steps
from diffeat.plugins.stable_diffusion.recipes.base import DdimRecipe, ddim_move, unet_timestep

if TYPE_CHECKING:
    from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor


class Inversion(DdimRecipe):
    """The clean latent walked up the DDIM schedule (``t`` = -1, 0, 20, ..., 960)."""

    mode = "inversion"

    def schedule(self, ex: StableDiffusionExtractor) -> list[DdimStep]:
        o = ex.options
        n_train = int(ex.parts.scheduler.config.num_train_timesteps)
        return inversion_steps(o.inversion_steps, n_train, o.steps_offset)

    def forwards(self, ex: StableDiffusionExtractor, rows: int) -> int:
        """The inversion's steps up to the last kept timestep, each split by ``ensemble_batch``."""
        _, kept = self.kept(ex)
        return (max(kept.values()) + 1) * ex.unet_passes.forwards(rows)

    def run(
        self,
        ex: StableDiffusionExtractor,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: Sequence[dict[str, torch.Tensor]],
        time_offsets: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        return self.invert(ex, latents, context)

    def invert(
        self,
        ex: StableDiffusionExtractor,
        latents: torch.Tensor,
        context: torch.Tensor,
        trajectory: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """DDIM inversion of ``latents`` capturing at the kept timesteps; ``[N, T, C, h, w]``.

        The latent is carried in float32 between steps (as the official code's
        autocast does); only the UNet runs in the model dtype. The inversion
        stops after the last kept step, and that last pass stops after the
        deepest captured module. ``trajectory``, when given, receives the
        latent after every completed step.
        """
        steps, kept = self.kept(ex)
        last = max(kept.values())
        passes = ex.unet_passes
        x = latents.float()
        captured: dict[int, dict[str, torch.Tensor]] = {}
        for step in steps[: last + 1]:
            z, t_in = x.to(ex.dtype), unet_timestep(step.t, x.shape[0], ex.device)
            if step.index == last:  # nothing after this pass is needed
                captured[step.t] = passes.maps(z, t_in, context)
                break
            out, maps = passes.predict(z, t_in, context, capture=step.t in kept)
            if maps is not None:
                captured[step.t] = maps
            x = ddim_move(ex, x, out.float(), step)
            if trajectory is not None:
                trajectory.append(x)
        return {
            name: torch.stack([captured[t][name] for t in ex.options.timesteps], dim=1)
            for name in ex.module_names
        }
