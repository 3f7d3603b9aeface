"""``clean`` (CleanDIFT, Stracke et al. 2024): the UNet runs on the clean latent, no noise
added, once per timestep; the timestep only conditions the UNet (CleanDIFT's fine-tuned
UNets were trained to give noise-free features at t = 261, their ``t_init``)."""

from __future__ import annotations

from typing import Any

import torch

from diffeat.plugins.stable_diffusion.recipes.add_noise import AddNoise


class Clean(AddNoise):
    """Per timestep: one UNet pass on the clean latent (no ``add_noise``), the maps kept.

    Tiles and the implicit captioner work as in ``add-noise``; the only noise an image
    draws is its posterior sample (``latent = "sample"``).
    """

    mode = "clean"
    noise_per_timestep = False

    def noised(
        self,
        latents: torch.Tensor,
        scheduler: Any,
        noise: list[dict[str, torch.Tensor]],
        index: int,
        step: torch.Tensor,
    ) -> torch.Tensor:
        return latents
