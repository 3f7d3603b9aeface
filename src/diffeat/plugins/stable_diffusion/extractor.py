"""The Stable Diffusion feature extractor (DIFT is its first preset).

What every mode shares: squash-resize (or pad) the image, scale pixels to
[-1, 1], encode with the VAE, take ``ensemble_size`` posterior samples times
``scaling_factor``, build the prompt states (or the implicit captioner's), hand
the latents to the mode's recipe (:mod:`~diffeat.plugins.stable_diffusion.recipes`:
DIFT's ``add-noise``, DDIM ``inversion``, ``generation``), which runs the UNet
capturing the requested modules' outputs with forward hooks, and average the
maps over the ensemble.

Two savings over the original, both exact in distribution: the VAE encodes each
image once and the ensemble is drawn from its posterior (the original encodes
every copy), and the UNet forward stops after the deepest requested module.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffeat.core.components import Extractor
from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError, DiffeatError, ModelLoadError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size
from diffeat.core.images import (
    ImageInput,
    fit_image,
    fit_transform,
    model_size_for,
    resize,
    to_tensor,
)
from diffeat.core.noise import image_seed
from diffeat.core.progress import inner_bar
from diffeat.core.speed import compile_around, to_channels_last
from diffeat.plugins.modelfiles import file_fingerprint, hub_origin
from diffeat.plugins.stable_diffusion.captioner import (
    ImplicitCaptioner,
    build_captioner,
    captioner_file,
    clip_tower,
)
from diffeat.plugins.stable_diffusion.cost import warn_if_slow
from diffeat.plugins.stable_diffusion.ddim import DdimStep
from diffeat.plugins.stable_diffusion.loading import (
    load_parts,
    model_family,
    model_fingerprint,
    model_info,
    resolve_model_dir,
    weights_fingerprint,
)
from diffeat.plugins.stable_diffusion.options import CATEGORY, StableDiffusionOptions
from diffeat.plugins.stable_diffusion.recipes import (
    DdimRecipe,
    Generation,
    Inversion,
    Recipe,
    recipe_for,
)
from diffeat.plugins.stable_diffusion.tiles import paste_tiles, tile_origins
from diffeat.plugins.stable_diffusion.unet_layers import (
    UNetPasses,
    resolve_modules,
    unet_layer_catalog,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = [
    "CATEGORY",
    "GeneratingStableDiffusionExtractor",
    "StableDiffusionExtractor",
    "StableDiffusionOptions",
    "image_seed",
]


def preprocess_pixels(
    image: ImageInput,
    model_size: Size,
    size_rule: str,
    resample: str,
    load_size: Sequence[int] = (),
) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1] at ``model_size`` (with ``size_rule = "short-side"``, the
    image's own aspect-preserving size); module level: picklable for workers."""
    if load_size:  # two stages, as the hyperfeatures code's use_paper_size
        small = to_tensor(resize(image.image, (load_size[0], load_size[1]), "bilinear"))
        w, h = model_size
        return F.interpolate(small[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    size = model_size_for(image.size, model_size, size_rule)
    return to_tensor(fit_image(image.image, size, size_rule, resample))


class StableDiffusionExtractor(Extractor):
    """Captures UNet module outputs of a diffusers Stable Diffusion checkpoint.

    What every mode shares lives here (model, preprocessing, VAE encoding, prompt
    states, noise, tiles, the implicit captioner); what a mode does with the clean
    latents is its :attr:`recipe` (:mod:`diffeat.plugins.stable_diffusion.recipes`).
    Built with ``mode = "generation"`` it is a :class:`GeneratingStableDiffusionExtractor`,
    the only kind with ``generate``.
    """

    Options = StableDiffusionOptions

    def __new__(cls, options: StableDiffusionOptions | None = None) -> StableDiffusionExtractor:
        if cls is StableDiffusionExtractor and options is not None:
            if options.mode == Generation.mode:
                cls = GeneratingStableDiffusionExtractor
        return super().__new__(cls)

    def __init__(self, options: StableDiffusionOptions | None = None) -> None:
        self.options = options or StableDiffusionOptions()
        self.options.validate()
        #: what this mode does with the clean latents
        self.recipe: Recipe = recipe_for(self.options.mode)
        self.device = pick_device(self.options.device)
        self.dtype = DTYPES[self.options.dtype]
        self.batch_size = self.options.batch_size
        self._parts: Any = None
        self._folder: Any = None
        self._module_names: list[str] | None = None
        self._layer_infos: list[LayerInfo] | None = None
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._pooled_cache: dict[str, torch.Tensor] = {}
        self._catalog: list[LayerInfo] | None = None
        self._family: str | None = None
        self._skeleton: torch.nn.Module | None = None
        self._captioner: ImplicitCaptioner | None = None
        self._captioner_clip: Any = None
        self._unet_passes: UNetPasses | None = None

    # -- model -------------------------------------------------------------------

    @property
    def folder(self) -> Any:
        if self._folder is None:
            self._folder = resolve_model_dir(self.options.model, self.options.revision)
        return self._folder

    @property
    def parts(self) -> Any:
        if self._parts is None:
            decoder = self.recipe.decodes
            self._parts = load_parts(
                self.folder,
                self.dtype,
                self.device,
                decoder=decoder,
                unet_weights=self.options.unet_weights,
            )
            self._speed_switches()
        return self._parts

    @property
    def family(self) -> str:
        """``"sd"`` (SD 1.x/2.x) or ``"sdxl"`` (SDXL, SDXL-Turbo), read from the model folder."""
        if self._family is None:
            self._family = model_family(self.folder)
        return self._family

    def _speed_switches(self) -> None:
        """``channels_last`` and ``compile`` (:mod:`diffeat.core.speed`) on the loaded parts."""
        p, o = self._parts, self.options
        if o.channels_last:
            to_channels_last(p.unet, p.vae)
        if o.compile:
            compile_around(p.unet, self.module_names)
            compile_around(p.vae, [])

    def model_identity(self) -> dict[str, Any]:
        origin = hub_origin(self.folder)
        if origin is not None:  # a hub snapshot: its repository and commit, nothing read
            identity: dict[str, Any] = {**origin.identity(), **model_info(self.folder)}
        else:
            identity = {
                "model": self.options.model,
                "revision": self.options.revision,
                "fingerprint": model_fingerprint(self.folder),
                **model_info(self.folder),
            }
        if self.family != "sd":  # SD 1.x/2.x identities (store keys) stay as they were
            identity["family"] = self.family
        if self.options.unet_weights:
            weights = Path(self.options.unet_weights).expanduser()
            if not weights.exists():
                raise ModelLoadError(
                    f"[extractor] unet_weights {self.options.unet_weights!r} not found; give a "
                    f"safetensors file of UNet weights (e.g. CleanDIFT's "
                    f"cleandift_sd21_unet.safetensors, `hf download CompVis/cleandift "
                    f"cleandift_sd21_unet.safetensors --local-dir DIR`) or a UNet folder"
                )
            identity["unet_weights"] = {"fingerprint": weights_fingerprint(weights)}
        if self.options.captioner:
            identity["captioner"] = {
                "fingerprint": file_fingerprint(captioner_file(self.options.captioner)),
                "clip": self.captioner_clip.model_identity(),
            }
        return identity

    @property
    def captioner_clip(self) -> Any:
        """The implicit captioner's CLIP tower (an ``openclip`` extractor, loaded on use)."""
        if self._captioner_clip is None:
            o = self.options
            self._captioner_clip = clip_tower(
                o.captioner_clip, o.captioner_clip_pretrained, str(self.device)
            )
        return self._captioner_clip

    @property
    def captioner(self) -> ImplicitCaptioner | None:
        """ODISE's implicit captioner when ``captioner`` names its weights, else None."""
        if not self.options.captioner:
            return None
        if self.family != "sd":
            raise ConfigError(
                "[extractor] captioner: ODISE's implicit captioner is made for SD 1.x; "
                f'{self.options.model} is {self.family}: set captioner = ""'
            )
        if self._captioner is None:
            o = self.options
            empty = self.prompt_embeddings("")
            captioner = build_captioner(
                o.captioner,
                self.captioner_clip,
                (int(empty.shape[1]), int(empty.shape[2])),
                int(self.parts.unet.time_embedding.linear_2.out_features),
            )
            if captioner.weights.time_slots < len(o.timesteps):
                raise ConfigError(
                    f"[extractor] captioner {o.captioner} has time-embedding positions for "
                    f"{captioner.weights.time_slots} timestep(s), the extractor runs "
                    f"{len(o.timesteps)} (timesteps {list(o.timesteps)})"
                )
            self._captioner = captioner
        return self._captioner

    @property
    def module_names(self) -> list[str]:
        """The capturable UNet layers the ``layers`` option names (patterns expanded)."""
        if self._module_names is None:
            self._module_names = resolve_modules(
                self.unet_skeleton(),
                list(self.options.layers),
                "[extractor] layers",
                capturable=[info.name for info in self.available_layers()],
            )
        return self._module_names

    def unet_skeleton(self) -> torch.nn.Module:
        """The UNet built from its config on the ``meta`` device: its structure, no weights."""
        from diffusers import UNet2DConditionModel

        if self._parts is not None:
            return self._parts.unet
        if self._skeleton is not None:
            return self._skeleton
        weights = (
            Path(self.options.unet_weights).expanduser() if self.options.unet_weights else None
        )
        if weights is not None and weights.is_dir():
            sub = "unet" if (weights / "unet" / "config.json").is_file() else None
            config = UNet2DConditionModel.load_config(weights, subfolder=sub)
        else:
            model_family(self.folder)  # refuse other families before reading their configs
            config = UNet2DConditionModel.load_config(self.folder, subfolder="unet")
        with torch.device("meta"):
            self._skeleton = UNet2DConditionModel.from_config(config)
        return self._skeleton

    def vae_factor(self) -> int:
        """Pixels per latent cell (8 for SD and SDXL), from the VAE config."""
        config = json.loads((self.folder / "vae" / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)

    def available_layers(self) -> list[LayerInfo]:
        """Every capturable UNet layer with channels and stride, from the UNet's config
        (:func:`~diffeat.plugins.stable_diffusion.unet_layers.unet_layer_catalog`)."""
        if self._catalog is None:
            self._catalog = unet_layer_catalog(self.unet_skeleton(), self.vae_factor())
        return self._catalog

    @property
    def unet_passes(self) -> UNetPasses:
        """UNet passes capturing :attr:`module_names` (the one capture mechanism of the recipes)."""
        if self._unet_passes is None:
            self._unet_passes = UNetPasses(
                self.parts.unet,
                self.module_names,
                stop_early=self.options.stop_early,
                rows_per_pass=self.options.ensemble_batch,
            )
        return self._unet_passes

    # -- declarations ------------------------------------------------------------

    def timesteps(self) -> tuple[int, ...]:
        return tuple(self.options.timesteps)

    @property
    def model_size(self) -> Size:
        w, h = self.options.image_size
        return (int(w), int(h))

    def model_size_for(self, image_size: Size) -> Size:
        """The model input of an image of ``image_size``: ``image_size`` of the options, or
        with ``size_rule = "short-side"`` the aspect-preserving size (854x480 -> 832x480)."""
        return model_size_for(image_size, self.model_size, self.options.size_rule)

    def transform_for(self, image_size: Size) -> ImageTransform:
        return fit_transform(image_size, self.model_size_for(image_size), self.options.size_rule)

    def layers(self) -> list[LayerInfo]:
        """Channels and stride of each requested layer, from the UNet's config (no weights
        are loaded and nothing runs)."""
        if self._layer_infos is None:
            catalog = {info.name: info for info in self.available_layers()}
            self._layer_infos = [catalog[name] for name in self.module_names]
        return self._layer_infos

    # -- noise ---------------------------------------------------------------------

    @property
    def tile(self) -> Size:
        """The size of one UNet input in pixels: the tile, or the whole model input."""
        o = self.options
        return (int(o.tile_size[0]), int(o.tile_size[1])) if o.tile_size else self.model_size

    def tile_origins(self) -> list[tuple[int, int]]:
        o = self.options
        if not o.tile_size:
            return [(0, 0)]
        stride = o.tile_stride or o.tile_size
        return tile_origins(self.model_size, self.tile, (int(stride[0]), int(stride[1])))

    def latent_shape(self, size: Size | None = None) -> tuple[int, int, int]:
        """``(c, h, w)`` of the latent of one UNet input (a tile when tiling) or of a model
        input of ``size``."""
        vae_factor = 2 ** (len(self.parts.vae.config.block_out_channels) - 1)
        w, h = size or self.tile
        return (int(self.parts.vae.config.latent_channels), h // vae_factor, w // vae_factor)

    def make_noise(self, key: str, size: Size | None = None) -> dict[str, torch.Tensor]:
        """The noise one image gets: ``posterior`` ``[E, c, h, w]`` and (add-noise) ``noise`` ``[T, E, c, h, w]``.

        Drawn on the CPU from :func:`image_seed`, so results do not depend on
        the device, the batch composition or the order of images; with ``noise =
        "shared"`` drawn from ``seed`` alone, the same for every image. ``size``: the
        model input (``short-side`` sizes differ per image); default the tile / model size.
        """
        o = self.options
        e, shape = o.ensemble_size, self.latent_shape(size)
        shared = o.noise == "shared"
        gen = torch.Generator().manual_seed(o.seed if shared else image_seed(o.seed, key))
        draws = {"posterior": (e, *shape)}
        if self.recipe.noise_per_timestep:  # the inversion and generation are deterministic
            draws["noise"] = (len(o.timesteps), e, *shape)
        # shared: the timestep noise is the generator's first draw, as ODISE's one randn
        order = list(reversed(draws)) if shared else list(draws)
        return {name: torch.randn(draws[name], generator=gen) for name in order}

    # -- extraction ----------------------------------------------------------------

    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        """Text-encoder hidden states ``[1, L, D]`` for ``prompt``, computed once per prompt.

        SD 1.x/2.x: the last hidden states of the text encoder. SDXL: the penultimate
        hidden states of both text encoders concatenated, as
        ``StableDiffusionXLPipeline.encode_prompt`` (its pooled embedding:
        :meth:`pooled_embedding`).
        """
        if prompt not in self._prompt_cache:
            p = self.parts
            with torch.no_grad():
                if p.family == "sdxl":
                    first = p.text_encoder(
                        self._token_ids(p.tokenizer, prompt), output_hidden_states=True
                    )
                    second = p.text_encoder_2(
                        self._token_ids(p.tokenizer_2, prompt), output_hidden_states=True
                    )
                    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
                    self._pooled_cache[prompt] = second[0].to(self.dtype)
                else:
                    states = p.text_encoder(self._token_ids(p.tokenizer, prompt))[0]
                self._prompt_cache[prompt] = states.to(self.dtype)
        return self._prompt_cache[prompt]

    def _token_ids(self, tok: Any, prompt: str) -> torch.Tensor:
        return tok(
            [prompt],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def pooled_embedding(self, prompt: str) -> torch.Tensor:
        """SDXL: the pooled, projected embedding ``[1, P]`` of ``text_encoder_2``."""
        self.prompt_embeddings(prompt)
        return self._pooled_cache[prompt]

    def added_conditioning(
        self, prompts: Sequence[str], size: tuple[int, int]
    ) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` for UNet inputs of ``size`` ``(height, width)`` px:
        ``text_embeds`` ``[B, P]`` (each prompt's pooled embedding) and ``time_ids``
        ``[B, 6]`` = original size, crop top-left, target size, each ``(height, width)``,
        as ``StableDiffusionXLPipeline._get_add_time_ids``; None for SD 1.x/2.x."""
        if self.family != "sdxl":
            return None
        o = self.options
        original = (int(o.original_size[1]), int(o.original_size[0])) if o.original_size else size
        ids = [*original, 0, 0, *size]
        unet = self.parts.unet
        expected = int(unet.add_embedding.linear_1.in_features)
        pooled = torch.cat([self.pooled_embedding(pr) for pr in prompts])
        got = int(unet.config.addition_time_embed_dim) * len(ids) + int(pooled.shape[-1])
        if got != expected:
            raise ModelLoadError(
                f"{self.folder}: the UNet's added embedding takes {expected} inputs, the pooled "
                f"text embedding and time ids give {got}: text_encoder_2 does not belong to "
                f"this UNet"
            )
        time_ids = torch.tensor([ids] * len(prompts), dtype=pooled.dtype, device=self.device)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def prompt_for(self, image: ImageInput) -> str:
        """The prompt of one image: the template with ``{category}`` filled in."""
        template = self.options.prompt
        if CATEGORY in template and not image.category:
            raise DiffeatError(
                f"the prompt {template!r} needs the image's category, but {image.source} has "
                f"none: give a category (--category NAME, or evaluate on a dataset) or use a "
                f"fixed prompt"
            )
        return template.replace(CATEGORY, image.category)

    def conditioning(self, image: ImageInput) -> str:
        """The per-image prompt when the template uses ``{category}`` (else nothing)."""
        return self.prompt_for(image) if CATEGORY in self.options.prompt else ""

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """``[3, H, W]`` in [-1, 1] at the model size."""
        return self.preprocessor()(image)

    def preprocessor(self) -> Callable[[ImageInput], torch.Tensor]:
        """:meth:`preprocess` as a picklable function (it runs in DataLoader workers)."""
        o = self.options
        return functools.partial(
            preprocess_pixels,
            model_size=self.model_size,
            size_rule=o.size_rule,
            resample=o.resample,
            load_size=tuple(o.load_size),
        )

    def extract(
        self, images: Sequence[ImageInput], noise: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> list[FeatureSet]:
        """Features of each image; ``noise`` (one :meth:`make_noise`-shaped dict per image,
        or with ``tile_size`` one per image and tile, image by image) replaces the seeded
        noise, for exact comparisons."""
        if not images:
            return []
        sizes = [self.model_size_for(im.size) for im in images]
        if len(set(sizes)) > 1:  # short-side: one UNet batch per model size
            out: list[FeatureSet | None] = [None] * len(images)
            for size in dict.fromkeys(sizes):
                idx = [i for i, s in enumerate(sizes) if s == size]
                part = self.extract(
                    [images[i] for i in idx], [noise[i] for i in idx] if noise else None
                )
                for i, fs in zip(idx, part):
                    out[i] = fs
            return [fs for fs in out if fs is not None]
        pixels = torch.stack([self.preprocess(im) for im in images])
        return self.extract_preprocessed(images, pixels, noise)

    def extract_preprocessed(
        self,
        images: Sequence[ImageInput],
        pixels: torch.Tensor,
        noise: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> list[FeatureSet]:
        """:meth:`extract` from :meth:`preprocess` ed ``pixels`` ``[B, 3, H, W]`` (CPU or
        device): all images in one batch, ``B x ensemble_size`` UNet inputs per pass. Each
        image gets its own seeded noise, so its features do not depend on its batch-mates
        (beyond float rounding: kernels may sum in another order for another batch)."""
        if not images:
            return []
        warn_if_slow(self)  # once, on a CPU, when an image will take minutes
        sizes = [self.model_size_for(im.size) for im in images]
        prompts = [self.prompt_for(im) for im in images]
        if self.options.tile_size:
            maps = self.tiled_features(pixels, [im.key for im in images], prompts, noise)
        else:
            noise = (
                list(noise)
                if noise is not None
                else [self.make_noise(im.key, size) for im, size in zip(images, sizes)]
            )
            maps = self.features_from_pixels(pixels, noise, prompts)
        out = []
        for i, im in enumerate(images):
            layers = {name: maps[name][i] for name in self.module_names}
            meta = {
                "transform": self.transform_for(im.size).to_dict(),
                "prompt": prompts[i],
            }
            out.append(FeatureSet(layers, self.timesteps(), meta))
        return out

    def tiled_features(
        self,
        pixels: torch.Tensor,
        keys: Sequence[str],
        prompts: Sequence[str],
        noise: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per layer ``[B, T, C, h, w]`` from UNet passes over tiles, overlaps averaged.

        Tile ``p`` of an image gets the noise of key ``"<key>#tile<p>"`` (or the
        shared noise); ``noise``, when given, holds one dict per image and tile.
        """
        origins = self.tile_origins()
        (tw, th), n = self.tile, len(origins)
        crops = torch.stack(
            [pixels[b, :, y : y + th, x : x + tw] for b in range(len(keys)) for x, y in origins]
        )
        if noise is None:
            noise = [self.make_noise(f"{k}#tile{p}") for k in keys for p in range(n)]
        per_tile = self.features_from_pixels(crops, noise, [pr for pr in prompts for _ in origins])
        out = {}
        for name, maps in per_tile.items():
            grouped = maps.view(len(keys), n, *maps.shape[1:])
            out[name] = torch.stack(
                [paste_tiles(g, origins, self.model_size, self.tile, name) for g in grouped]
            )
        return out

    def features_from_pixels(
        self,
        pixels: torch.Tensor,
        noise: Sequence[dict[str, torch.Tensor]],
        prompts: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """Per layer ``[B, T, C, h, w]`` (float32, ensemble-averaged) for pixels ``[B, 3, H, W]``."""
        self.recipe.check_extract()
        b, e = pixels.shape[0], self.options.ensemble_size
        with torch.no_grad():
            latents = self.encode(pixels, noise)
            context, offsets = self.conditioning_states(pixels, prompts)
            context = context.repeat_interleave(e, dim=0)
            if offsets is not None:
                offsets = offsets.repeat_interleave(e, dim=0)
            added = self.added_conditioning(prompts, (pixels.shape[-2], pixels.shape[-1]))
            if added is not None:
                added = {k: v.repeat_interleave(e, dim=0) for k, v in added.items()}
            zero = self.options.added_conditioning == "none"
            passes = self.unet_passes
            forwards = self.recipe.forwards(self, latents.shape[0])
            desc = f"stable-diffusion {self.options.mode}, {b} input{'s' if b != 1 else ''}"
            with inner_bar(forwards, desc) as bar, passes.conditioned(added, zero_added=zero):
                passes.bar = bar  # counts UNet forwards (ensemble chunks x timesteps or steps)
                try:
                    maps = self.recipe.run(self, latents, context, noise, offsets)
                finally:
                    passes.bar = None
        return {name: m.view(b, e, *m.shape[1:]).mean(dim=1) for name, m in maps.items()}

    def conditioning_states(
        self, pixels: torch.Tensor, prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt states ``[B, L, D]`` of each image (or tile) and, with the implicit
        captioner, its time-embedding offsets ``[B, n, T_dim]`` (else None).

        With the captioner, images whose prompt is empty get the captioner's
        states; a non-empty prompt keeps its text states (SD-DINO's TEXT_INPUT).
        """
        text = torch.cat([self.prompt_embeddings(pr) for pr in prompts])
        captioner = self.captioner
        if captioner is None:
            return text, None
        states, offsets = captioner.condition((pixels + 1) / 2, self.prompt_embeddings(""))
        use = torch.tensor([not pr for pr in prompts], device=text.device)
        context = torch.where(use[:, None, None], states.to(text.dtype), text)
        return context, offsets

    def encode(
        self, pixels: torch.Tensor, noise: Sequence[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """Scaled VAE latents ``[B*E, c, h, w]``: posterior samples (or the mean) per copy."""
        p, o, e = self.parts, self.options, self.options.ensemble_size
        x = pixels.to(self.device, p.vae.dtype, non_blocking=True)  # float32 VAE for SDXL
        if o.encode_per_copy:
            dist = p.vae.encode(x.repeat_interleave(e, dim=0)).latent_dist
            mean, std = dist.mean, dist.std
        else:
            dist = p.vae.encode(x).latent_dist
            mean = dist.mean.repeat_interleave(e, dim=0)
            std = dist.std.repeat_interleave(e, dim=0)
        if o.latent == "sample":
            eps = torch.cat([n["posterior"] for n in noise]).to(
                self.device, mean.dtype, non_blocking=True
            )
            latents = mean + std * eps
        else:
            latents = mean
        return (latents * p.vae.config.scaling_factor).to(self.dtype)

    # -- the DDIM recipes' walks, for tests and benchmarks -------------------------------

    def schedule(self) -> list[DdimStep]:
        """The UNet passes of the inversion (or, in generation mode, of the sampler)."""
        if not isinstance(self.recipe, DdimRecipe):
            raise DiffeatError(f"mode {self.options.mode!r} runs no DDIM schedule")
        return self.recipe.schedule(self)

    def invert(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        trajectory: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """DDIM inversion of ``latents`` (see :meth:`Inversion.invert`); ``[N, T, C, h, w]``."""
        return Inversion().invert(self, latents, context, trajectory)

    def decode(self, latents: torch.Tensor) -> Image.Image:
        """The image of one scaled latent ``[1, c, h, w]``, rounded to 8 bits."""
        vae = self.parts.vae
        pixels = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray((pixels * 255).round().astype(np.uint8))


class GeneratingStableDiffusionExtractor(StableDiffusionExtractor):
    """The ``stable-diffusion`` extractor in ``mode = "generation"``: it samples its own
    images (:class:`~diffeat.core.components.GeneratingExtractor`) and refuses existing ones."""

    recipe: Generation

    def __init__(self, options: StableDiffusionOptions | None = None) -> None:
        super().__init__(options)
        if not isinstance(self.recipe, Generation):
            raise ConfigError(
                f'{type(self).__name__} needs mode = "generation", not {self.options.mode!r}'
            )

    def generate(self, seed: int) -> tuple[Image.Image, FeatureSet]:
        """Sample one image from the prompt, capturing the maps while denoising
        (see :meth:`Generation.generate`)."""
        return self.recipe.generate(self, seed)
