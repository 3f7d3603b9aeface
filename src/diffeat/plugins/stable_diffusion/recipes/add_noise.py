"""``add-noise`` (DIFT, Tang et al. 2023): noise the latent to each timestep with the
scheduler's ``add_noise`` and run the UNet once per timestep."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from diffeat.core.errors import ConfigError
from diffeat.plugins.stable_diffusion.captioner import time_embedding_offset
from diffeat.plugins.stable_diffusion.recipes.base import Recipe

if TYPE_CHECKING:
    from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
    from diffeat.plugins.stable_diffusion.options import StableDiffusionOptions


class AddNoise(Recipe):
    """Per timestep: ``add_noise`` to the clean latent, one UNet pass, the maps kept.

    The only mode with tiles (ODISE's ``slide_forward``) and the implicit captioner.
    """

    mode = "add-noise"
    noise_per_timestep = True

    def validate(self, options: StableDiffusionOptions) -> None:
        tile, stride, size = options.tile_size, options.tile_stride, options.image_size
        if not tile:
            return
        if len(tile) != 2 or any(v < 8 or v % 8 for v in tile):
            raise ValueError("tile_size must be [width, height], multiples of 8")
        if any(t > s for t, s in zip(tile, size)):
            raise ValueError(f"tile_size {tile} exceeds image_size {size}")
        if stride and (
            len(stride) != 2
            or any(v < 1 for v in stride)
            or any(st > t for st, t in zip(stride, tile))
        ):
            raise ValueError(
                f"tile_stride must be [x, y] > 0 and at most tile_size {tile} "
                f"(a larger step leaves parts of the input uncovered), got {stride}"
            )

    def noised(
        self,
        latents: torch.Tensor,
        scheduler: Any,
        noise: list[dict[str, torch.Tensor]],
        index: int,
        step: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet input at the ``index``-th timestep ``step``: the clean latents noised
        with each image's timestep noise by the scheduler's ``add_noise``."""
        n = torch.cat([item["noise"][index] for item in noise]).to(latents.device, latents.dtype)
        return scheduler.add_noise(latents, n, step)

    def run(
        self,
        ex: StableDiffusionExtractor,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: Sequence[dict[str, torch.Tensor]],
        time_offsets: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """``[N, T, C, h, w]`` per layer; ``time_offsets`` position ``i`` is added to the
        UNet's time embedding at the ``i``-th timestep."""
        p, timesteps = ex.parts, list(ex.options.timesteps)
        n_train = int(p.scheduler.config.num_train_timesteps)
        bad = [t for t in timesteps if not 0 <= t < n_train]
        if bad:
            raise ConfigError(
                f"[extractor] timesteps {bad} are outside 0..{n_train - 1}, the timesteps of "
                f'{self.mode} mode (t = -1, the clean latent, exists in mode = "inversion")'
            )
        per_t: dict[str, list[torch.Tensor]] = {name: [] for name in ex.module_names}
        for ti, t in enumerate(timesteps):
            step = torch.tensor(t, dtype=torch.long, device=ex.device)
            noisy = self.noised(latents, p.scheduler, list(noise), ti, step)
            around = _offset_rows(p.unet, time_offsets[:, ti]) if time_offsets is not None else None
            maps = ex.unet_passes.maps(noisy, step, context, around)
            for name in ex.module_names:
                per_t[name].append(maps[name])
        return {name: torch.stack(maps, dim=1) for name, maps in per_t.items()}


def _offset_rows(
    unet: torch.nn.Module, offset: torch.Tensor
) -> Callable[[slice], AbstractContextManager[None]]:
    """For the forward of some rows: the captioner's time-embedding ``offset`` of those rows."""
    return lambda rows: time_embedding_offset(unet, offset[rows])
