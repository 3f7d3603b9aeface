"""``generation``: sample an image from the prompt with the DDIM sampler (eta 0),
keeping the maps at the kept timesteps while denoising (``diffeat generate``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.features import FeatureSet
from diffeat.core.progress import inner_bar
from diffeat.plugins.stable_diffusion.ddim import DdimStep, generation_steps
from diffeat.plugins.stable_diffusion.options import CATEGORY
from diffeat.plugins.stable_diffusion.recipes.base import DdimRecipe, ddim_move, unet_timestep

if TYPE_CHECKING:
    from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor


class Generation(DdimRecipe):
    """Noise walked down the DDIM schedule (``t`` = 980, ..., 0) to a decoded image."""

    mode = "generation"
    decodes = True

    def schedule(self, ex: StableDiffusionExtractor) -> list[DdimStep]:
        o = ex.options
        n_train = int(ex.parts.scheduler.config.num_train_timesteps)
        return generation_steps(o.inversion_steps, n_train, o.steps_offset)

    def check_extract(self) -> None:
        raise DiffeatError(
            "this extractor is in generation mode: it makes its own images from the prompt "
            "(`diffeat generate CONFIG --prompt ...`); to extract features of existing "
            'images use mode = "inversion" or "add-noise"'
        )

    def run(
        self,
        ex: StableDiffusionExtractor,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: Sequence[dict[str, torch.Tensor]],
        time_offsets: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        self.check_extract()
        raise AssertionError("unreachable")  # pragma: no cover

    def generate(self, ex: StableDiffusionExtractor, seed: int) -> tuple[Image.Image, FeatureSet]:
        """Sample one image from the prompt, capturing the maps while denoising.

        The initial noise is drawn on the CPU from ``seed``; with
        ``guidance_scale > 0`` every step runs the UNet on ``negative_prompt``
        and then on the prompt (classifier-free guidance) and the maps come
        from the prompt's pass, as the official code keeps the last call's.
        Returns the decoded image (at the model size) and its features, whose
        transform is the identity.
        """
        o, passes = ex.options, ex.unet_passes
        if ex.family != "sd":
            raise ConfigError(
                f"generation mode runs SD 1.x/2.x models; {o.model} is {ex.family} (its features "
                f'of existing images: mode = "add-noise")'
            )
        if CATEGORY in o.prompt:
            raise DiffeatError("a generation prompt cannot use {category}: give the prompt itself")
        steps, kept = self.kept(ex)
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn((1, *ex.latent_shape()), generator=gen).to(ex.device)
        guided = o.guidance_scale > 0
        captured: dict[int, dict[str, torch.Tensor]] = {}
        forwards = len(steps) * (2 if guided else 1)
        with torch.no_grad(), inner_bar(forwards, "generate, 1 image") as bar:
            passes.bar = bar
            try:
                x = self._walk(ex, x, steps, kept, captured)
            finally:
                passes.bar = None
            image = ex.decode(x)
        layers = {
            name: torch.cat([captured[t][name] for t in o.timesteps]) for name in ex.module_names
        }
        meta = {
            "transform": ex.transform_for(image.size).to_dict(),
            "prompt": o.prompt,
            "generation_seed": int(seed),
        }
        return image, FeatureSet(layers, ex.timesteps(), meta)

    def _walk(
        self,
        ex: StableDiffusionExtractor,
        x: torch.Tensor,
        steps: list[DdimStep],
        kept: dict[int, int],
        captured: dict[int, dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        """The DDIM sampler from noise ``x``, the maps of the kept steps into ``captured``."""
        o, passes = ex.options, ex.unet_passes
        guided = o.guidance_scale > 0
        cond = ex.prompt_embeddings(o.prompt)
        uncond = ex.prompt_embeddings(o.negative_prompt) if guided else None
        for step in steps:
            z, t_in = x.to(ex.dtype), unet_timestep(step.t, 1, ex.device)
            if uncond is not None:
                out_u, _ = passes.predict(z, t_in, uncond, capture=False)
            out, maps = passes.predict(z, t_in, cond, capture=step.t in kept)
            if maps is not None:
                captured[step.t] = maps
            out = out.float()
            if uncond is not None:
                out_u = out_u.float()
                out = out_u + o.guidance_scale * (out - out_u)
            x = ddim_move(ex, x, out, step)
        return x
