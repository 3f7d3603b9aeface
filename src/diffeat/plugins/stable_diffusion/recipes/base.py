"""What a recipe is: how one ``mode`` of the extractor turns clean latents into maps.

The extractor does what every mode shares (model loading, preprocessing, VAE
encoding, prompt states, noise, tiles, the implicit captioner) and hands the
latents to its recipe; every recipe runs the UNet through the extractor's one
:class:`~diffeat.plugins.stable_diffusion.unet_layers.UNetPasses`, so capturing
and stopping early work the same way in each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from diffeat.plugins.stable_diffusion.ddim import (
    DdimStep,
    alpha_at,
    check_kept,
    ddim_update,
    epsilon_from,
)

if TYPE_CHECKING:
    from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
    from diffeat.plugins.stable_diffusion.options import StableDiffusionOptions


class Recipe(ABC):
    """One mode of the ``stable-diffusion`` extractor. Recipes hold no state: the
    extractor passes itself (model parts, options, devices) to each call."""

    #: the ``mode`` option value that selects this recipe
    mode: ClassVar[str]
    #: whether the VAE decoder is loaded (to decode a sampled latent)
    decodes: ClassVar[bool] = False
    #: whether each image draws noise per timestep besides its posterior sample
    noise_per_timestep: ClassVar[bool] = False

    def validate(self, options: StableDiffusionOptions) -> None:
        """Refuse options this mode cannot run (``ValueError`` with the message for the user)."""
        return None

    def check_extract(self) -> None:
        """Raise when this mode cannot extract features of existing images."""
        return None

    def forwards(self, ex: StableDiffusionExtractor, rows: int) -> int:
        """UNet forwards of one :meth:`run` on ``rows`` latents (images x ensemble copies):
        one call per timestep, split by ``ensemble_batch``; what the progress bar counts."""
        return len(ex.options.timesteps) * ex.unet_passes.forwards(rows)

    @abstractmethod
    def run(
        self,
        ex: StableDiffusionExtractor,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: Sequence[dict[str, torch.Tensor]],
        time_offsets: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Per layer ``[N, T, C, h, w]`` (float32) for scaled latents ``[N, c, h, w]``.

        ``context`` ``[N, L, D]`` holds the prompt states, ``noise`` each image's
        :meth:`~StableDiffusionExtractor.make_noise` draws (copies image by image),
        ``time_offsets`` ``[N, T, T_dim]`` the implicit captioner's (or None).
        """


class DdimRecipe(Recipe):
    """A deterministic DDIM walk (eta 0) that keeps the maps at the kept timesteps."""

    def validate(self, options: StableDiffusionOptions) -> None:
        if options.ensemble_size != 1 and options.latent == "mean":
            raise ValueError(
                "ensemble_size > 1 with latent = mean repeats one deterministic inversion; "
                "use ensemble_size = 1"
            )
        if options.tile_size:
            raise ValueError("tile_size works with mode = add-noise only")
        if options.captioner:
            raise ValueError("captioner works with mode = add-noise only (as ODISE)")

    @abstractmethod
    def schedule(self, ex: StableDiffusionExtractor) -> list[DdimStep]:
        """The UNet passes of the walk, in the order they run."""

    def kept(self, ex: StableDiffusionExtractor) -> tuple[list[DdimStep], dict[int, int]]:
        """The schedule and the step index of each kept timestep (unknown ones are refused)."""
        steps = self.schedule(ex)
        return steps, check_kept(list(ex.options.timesteps), steps, self.mode)


def unet_timestep(t: int, batch: int, device: torch.device) -> torch.Tensor:
    """The UNet's timestep input: float, as the official code passes it; -1 (the clean
    latent) is embedded as is."""
    return torch.full((batch,), float(t), device=device)


def ddim_move(
    ex: StableDiffusionExtractor, x: torch.Tensor, output: torch.Tensor, step: DdimStep
) -> torch.Tensor:
    """The latent ``x`` (float32) moved from ``step.t`` to ``step.t_next`` by the UNet
    ``output`` (float32) of that step."""
    scheduler = ex.parts.scheduler
    alphas = scheduler.alphas_cumprod.float()
    a = alpha_at(alphas, step.t).to(ex.device)
    a_next = alpha_at(alphas, step.t_next).to(ex.device)
    eps = epsilon_from(output, x, a, scheduler.config.prediction_type)
    return ddim_update(x, eps, a, a_next)
