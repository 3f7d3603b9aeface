"""The Stable Diffusion feature extractor (DIFT is its first preset).

Recipe (Tang et al. 2023, as the official DIFT code runs it): squash-resize the
image, scale pixels to [-1, 1], encode with the VAE, take ``ensemble_size``
posterior samples times ``scaling_factor``, add noise at each timestep with the
DDIM scheduler's ``add_noise``, run the UNet once on the batch, capture the
requested modules' outputs with forward hooks and average over the ensemble.

Two savings over the original, both exact in distribution: the VAE encodes each
image once and the ensemble is drawn from its posterior (the original encodes
every copy), and the UNet forward stops after the deepest requested module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffeat.core.components import Extractor
from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size
from diffeat.core.images import ImageInput, fit_image, fit_transform, resize, to_tensor
from diffeat.core.options import opt
from diffeat.plugins.stable_diffusion.captioner import (
    ImplicitCaptioner,
    build_captioner,
    captioner_file,
    clip_tower,
    time_embedding_offset,
)
from diffeat.plugins.stable_diffusion.capture import OutputCapture, resolve_modules
from diffeat.plugins.stable_diffusion.ddim import (
    DdimStep,
    alpha_at,
    check_kept,
    ddim_update,
    epsilon_from,
    generation_steps,
    inversion_steps,
)
from diffeat.plugins.stable_diffusion.loading import (
    _file_fingerprint,
    load_parts,
    model_fingerprint,
    model_info,
    resolve_model_dir,
)
from diffeat.plugins.stable_diffusion.tiles import paste_tiles, tile_origins

CATEGORY = "{category}"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StableDiffusionOptions:
    """Options of the ``stable-diffusion`` extractor (defaults: DIFT's semantic preset on SD 2.1)."""

    model: str = opt("stabilityai/stable-diffusion-2-1", "hub id or local diffusers folder")
    revision: str = opt("", "hub revision (branch, tag or commit); empty: the default branch")
    layers: list[str] = opt(
        ["up_blocks.1"],
        "UNet module names or glob patterns whose outputs are captured, e.g. up_blocks.1 "
        "(DIFT up_ft_index 1) or up_blocks.*.resnets.*.conv2 (decoder ResNet residual branches)",
    )
    mode: Literal["add-noise", "inversion", "generation"] = opt(
        "add-noise",
        "add-noise: noise the latent to each timestep and run the UNet once per timestep (DIFT); "
        "inversion: deterministic DDIM inversion of the clean latent, capturing at the kept "
        "timesteps on the way (Diffusion Hyperfeatures); generation: sample an image from the "
        "prompt and capture while denoising (`diffeat generate`)",
        cache="if-set",
    )
    timesteps: list[int] = opt(
        [261],
        "add-noise: noise timesteps, one UNet pass each; inversion/generation: the UNet "
        "timesteps whose maps are kept (-1 is the clean latent, e.g. [-1, 60, 160, ..., 960])",
    )
    inversion_steps: int = opt(
        50,
        "DDIM steps of the inversion or generation (eta 0); 1 with timesteps [-1]: one-step",
        cache="if-set",
    )
    steps_offset: int = opt(
        0,
        "added to the DDIM timesteps of inversion/generation; 0 as the hyperfeatures code "
        "(SD 1.5's own scheduler config says 1)",
        cache="if-set",
    )
    guidance_scale: float = opt(
        -1.0,
        "generation: classifier-free guidance scale with negative_prompt when > 0 (the "
        "official code guides for any value but -1); <= 0: no guidance; maps come from the "
        "conditional pass",
        cache="if-set",
    )
    negative_prompt: str = opt(
        "", "generation: the unconditional prompt of guidance", cache="if-set"
    )
    ensemble_size: int = opt(8, "noisy copies per image; their feature maps are averaged")
    image_size: list[int] = opt([768, 768], "model input [width, height]")
    size_rule: Literal["resize", "pad"] = opt(
        "resize",
        "resize: squash the image to image_size (DIFT, hyperfeatures); pad: fit it inside "
        "image_size keeping its aspect ratio, centred on black (SD-DINO)",
        cache="if-set",
    )
    load_size: list[int] = opt(
        [],
        "resize the image to this [width, height] first (PIL bilinear), then to image_size by "
        "bilinear interpolation of the tensor: the hyperfeatures paper's use_paper_size ([64, "
        "64] for training, [224, 224] for testing); empty: straight to image_size",
        cache="if-set",
    )
    resample: Literal["bicubic", "bilinear", "lanczos", "nearest"] = opt(
        "bicubic", "PIL resize filter (DIFT uses PIL's default, bicubic)"
    )
    prompt: str = opt(
        "",
        "text prompt (empty: the null prompt, as DIFT); {category} is replaced by each "
        "image's category, e.g. \"a photo of a {category}\" (DIFT's SPair protocol)",
    )
    captioner: str = opt(
        "",
        "add-noise: safetensors file of ODISE's implicit captioner (exported from ODISE's "
        "checkpoint, docs/sd-dino.md): the UNet is conditioned on each tile's CLIP image "
        "embedding and its time embedding offset, as ODISE / SD-DINO; a non-empty prompt "
        "replaces the captioner's prompt states (SD-DINO's TEXT_INPUT), the time offset stays; "
        "empty: no captioner. Identified in the store by content",
        cache=False,
    )
    captioner_clip: str = opt(
        "ViT-L-14-336-quickgelu",
        "the captioner's CLIP image tower (open_clip model, as the openclip extractor's model; "
        "runs in float32, as ODISE)",
        cache="if-set",
    )
    captioner_clip_pretrained: str = opt(
        "openai",
        "its weights: an open_clip pretrained tag or a checkpoint file (ODISE: openai)",
        cache="if-set",
    )
    latent: Literal["sample", "mean"] = opt(
        "sample", "VAE latent: a posterior sample (DIFT) or the posterior mean (Hedlin et al.)"
    )
    seed: int = opt(0, "seed of the posterior and timestep noise (per image, from its content)")
    noise: Literal["per-image", "shared"] = opt(
        "per-image",
        "per-image: noise drawn from seed and the image content; shared: one draw from seed "
        "(timestep noise first) used for every image and tile, as ODISE / SD-DINO (seed 42)",
        cache="if-set",
    )
    tile_size: list[int] = opt(
        [],
        "add-noise: run the UNet on tiles [width, height] of the model input and average the "
        "overlapping maps (ODISE's slide_forward: [512, 512] on a 960 input); empty: no tiles",
        cache="if-set",
    )
    tile_stride: list[int] = opt([], "tile step [x, y]; empty: the tile size", cache="if-set")
    dtype: Literal["float32", "float16", "bfloat16"] = opt("float32", "model dtype")
    device: str = opt("auto", "torch device; auto: cuda if available, else cpu", cache=False)
    batch_size: int = opt(1, "images per UNet pass (each with ensemble_size copies)", cache=False)
    encode_per_copy: bool = opt(
        False,
        "VAE-encode every ensemble copy, as the original code does (slower, same result)",
        cache=False,
    )
    stop_early: bool = opt(True, "stop the UNet once the deepest requested layer ran", cache=False)

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: give at least one UNet module name")
        if not self.timesteps:
            raise ValueError("timesteps: give at least one timestep")
        if self.mode != "add-noise" and self.ensemble_size != 1 and self.latent == "mean":
            raise ValueError(
                "ensemble_size > 1 with latent = mean repeats one deterministic inversion; "
                "use ensemble_size = 1"
            )
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(self.image_size) != 2 or any(v < 8 or v % 8 for v in self.image_size):
            raise ValueError(
                f"image_size must be [width, height], multiples of 8, got {self.image_size}"
            )
        if self.load_size and (len(self.load_size) != 2 or any(v < 1 for v in self.load_size)):
            raise ValueError(f"load_size must be [width, height] > 0, got {self.load_size}")
        if self.load_size and self.size_rule != "resize":
            raise ValueError('load_size works with size_rule = "resize" only')
        if self.tile_size:
            if self.mode != "add-noise":
                raise ValueError("tile_size works with mode = add-noise only")
            if len(self.tile_size) != 2 or any(v < 8 or v % 8 for v in self.tile_size):
                raise ValueError("tile_size must be [width, height], multiples of 8")
            if any(t > s for t, s in zip(self.tile_size, self.image_size)):
                raise ValueError(f"tile_size {self.tile_size} exceeds image_size {self.image_size}")
            if self.tile_stride and (
                len(self.tile_stride) != 2
                or any(v < 1 for v in self.tile_stride)
                or any(st > t for st, t in zip(self.tile_stride, self.tile_size))
            ):
                raise ValueError(
                    f"tile_stride must be [x, y] > 0 and at most tile_size {self.tile_size} "
                    f"(a larger step leaves parts of the input uncovered), got {self.tile_stride}"
                )
        elif self.tile_stride:
            raise ValueError("tile_stride needs tile_size")
        if self.captioner and self.mode != "add-noise":
            raise ValueError("captioner works with mode = add-noise only (as ODISE)")


def image_seed(seed: int, key: str) -> int:
    """The noise seed of one image: depends on the config seed and the image content only."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


class StableDiffusionExtractor(Extractor):
    """Captures UNet module outputs of a diffusers Stable Diffusion checkpoint."""

    Options = StableDiffusionOptions

    def __init__(self, options: StableDiffusionOptions | None = None) -> None:
        self.options = options or StableDiffusionOptions()
        self.options.validate()
        self.device = pick_device(self.options.device)
        self.dtype = DTYPES[self.options.dtype]
        self.batch_size = self.options.batch_size
        self._parts: Any = None
        self._folder: Any = None
        self._module_names: list[str] | None = None
        self._layer_infos: list[LayerInfo] | None = None
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._captioner: ImplicitCaptioner | None = None
        self._captioner_clip: Any = None

    # -- model -------------------------------------------------------------------

    @property
    def folder(self) -> Any:
        if self._folder is None:
            self._folder = resolve_model_dir(self.options.model, self.options.revision)
        return self._folder

    @property
    def parts(self) -> Any:
        if self._parts is None:
            decoder = self.options.mode == "generation"
            self._parts = load_parts(self.folder, self.dtype, self.device, decoder=decoder)
        return self._parts

    def model_identity(self) -> dict[str, Any]:
        identity = {
            "model": self.options.model,
            "revision": self.options.revision,
            "fingerprint": model_fingerprint(self.folder),
            **model_info(self.folder),
        }
        if self.options.captioner:
            identity["captioner"] = {
                "fingerprint": _file_fingerprint(captioner_file(self.options.captioner)),
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
        if self._module_names is None:
            self._module_names = resolve_modules(
                self.parts.unet, list(self.options.layers), "[extractor] layers"
            )
        return self._module_names

    # -- declarations ------------------------------------------------------------

    def timesteps(self) -> tuple[int, ...]:
        return tuple(self.options.timesteps)

    @property
    def model_size(self) -> Size:
        w, h = self.options.image_size
        return (int(w), int(h))

    def transform_for(self, image_size: Size) -> ImageTransform:
        return fit_transform(image_size, self.model_size, self.options.size_rule)

    def layers(self) -> list[LayerInfo]:
        """Channels and stride of each layer, from a small dry run of the UNet."""
        if self._layer_infos is None:
            unet = self.parts.unet
            vae_factor = 2 ** (len(self.parts.vae.config.block_out_channels) - 1)
            latent = 2 ** (len(unet.config.down_block_types) - 1) * 2
            z = torch.zeros(
                1, unet.config.in_channels, latent, latent, device=self.device, dtype=self.dtype
            )
            context = self.prompt_embeddings("")  # shapes only
            with torch.no_grad(), OutputCapture(unet, self.module_names) as cap:
                outs = cap.run(lambda: unet(z, 0, encoder_hidden_states=context))
            px = latent * vae_factor
            self._layer_infos = [
                LayerInfo(name, int(outs[name].shape[1]), px / outs[name].shape[-1])
                for name in self.module_names
            ]
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

    def latent_shape(self) -> tuple[int, int, int]:
        """``(c, h, w)`` of the latent of one UNet input (a tile when tiling)."""
        vae_factor = 2 ** (len(self.parts.vae.config.block_out_channels) - 1)
        w, h = self.tile
        return (int(self.parts.vae.config.latent_channels), h // vae_factor, w // vae_factor)

    def make_noise(self, key: str) -> dict[str, torch.Tensor]:
        """The noise one image gets: ``posterior`` ``[E, c, h, w]`` and (add-noise) ``noise`` ``[T, E, c, h, w]``.

        Drawn on the CPU from :func:`image_seed`, so results do not depend on
        the device, the batch composition or the order of images; with ``noise =
        "shared"`` drawn from ``seed`` alone, the same for every image.
        """
        o = self.options
        e, shape = o.ensemble_size, self.latent_shape()
        shared = o.noise == "shared"
        gen = torch.Generator().manual_seed(o.seed if shared else image_seed(o.seed, key))
        draws = {"posterior": (e, *shape)}
        if o.mode == "add-noise":  # the inversion and generation are deterministic
            draws["noise"] = (len(o.timesteps), e, *shape)
        # shared: the timestep noise is the generator's first draw, as ODISE's one randn
        order = list(reversed(draws)) if shared else list(draws)
        return {name: torch.randn(draws[name], generator=gen) for name in order}

    # -- extraction ----------------------------------------------------------------

    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        """Text-encoder hidden states ``[1, L, D]`` for ``prompt``, computed once per prompt."""
        if prompt not in self._prompt_cache:
            tok, enc = self.parts.tokenizer, self.parts.text_encoder
            ids = tok(
                [prompt],
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            with torch.no_grad():
                self._prompt_cache[prompt] = enc(ids)[0].to(self.dtype)
        return self._prompt_cache[prompt]

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
        o = self.options
        if o.load_size:  # two stages, as the hyperfeatures code's use_paper_size
            small = to_tensor(resize(image.image, (o.load_size[0], o.load_size[1]), "bilinear"))
            w, h = self.model_size
            return F.interpolate(small[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return to_tensor(fit_image(image.image, self.model_size, o.size_rule, o.resample))

    def extract(
        self, images: Sequence[ImageInput], noise: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> list[FeatureSet]:
        """Features of each image; ``noise`` (one :meth:`make_noise`-shaped dict per image,
        or with ``tile_size`` one per image and tile, image by image) replaces the seeded
        noise, for exact comparisons."""
        if not images:
            return []
        pixels = torch.stack([self.preprocess(im) for im in images])
        prompts = [self.prompt_for(im) for im in images]
        if self.options.tile_size:
            maps = self.tiled_features(pixels, [im.key for im in images], prompts, noise)
        else:
            noise = list(noise) if noise is not None else [self.make_noise(im.key) for im in images]
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
        if self.options.mode == "generation":
            raise DiffeatError(
                "this extractor is in generation mode: it makes its own images from the prompt "
                "(`diffeat generate CONFIG --prompt ...`); to extract features of existing "
                'images use mode = "inversion" or "add-noise"'
            )
        b, e = pixels.shape[0], self.options.ensemble_size
        with torch.no_grad():
            latents = self.encode(pixels, noise)
            context, offsets = self.conditioning_states(pixels, prompts)
            context = context.repeat_interleave(e, dim=0)
            if offsets is not None:
                offsets = offsets.repeat_interleave(e, dim=0)
            if self.options.mode == "inversion":
                maps = self.invert(latents, context)
            else:
                maps = self.noised_passes(latents, context, noise, offsets)
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
        x = pixels.to(self.device, self.dtype)
        if o.encode_per_copy:
            dist = p.vae.encode(x.repeat_interleave(e, dim=0)).latent_dist
            mean, std = dist.mean, dist.std
        else:
            dist = p.vae.encode(x).latent_dist
            mean = dist.mean.repeat_interleave(e, dim=0)
            std = dist.std.repeat_interleave(e, dim=0)
        if o.latent == "sample":
            eps = torch.cat([n["posterior"] for n in noise]).to(self.device, mean.dtype)
            latents = mean + std * eps
        else:
            latents = mean
        return latents * p.vae.config.scaling_factor

    def noised_passes(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        noise: Sequence[dict[str, torch.Tensor]],
        time_offsets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """DIFT: per timestep, ``add_noise`` and one UNet pass; ``[B*E, T, C, h, w]`` per layer.

        ``time_offsets`` ``[B*E, n, T_dim]`` (the implicit captioner's) are added to the
        UNet's time embedding, position ``i`` at the ``i``-th timestep.
        """
        p, o = self.parts, self.options
        n_train = int(p.scheduler.config.num_train_timesteps)
        bad = [t for t in o.timesteps if not 0 <= t < n_train]
        if bad:
            raise ConfigError(
                f"[extractor] timesteps {bad} are outside 0..{n_train - 1}, the noise levels of "
                f'add-noise mode (t = -1, the clean latent, exists in mode = "inversion")'
            )
        per_t: dict[str, list[torch.Tensor]] = {name: [] for name in self.module_names}
        for ti, t in enumerate(o.timesteps):
            step = torch.tensor(t, dtype=torch.long, device=self.device)
            n = torch.cat([item["noise"][ti] for item in noise]).to(self.device, latents.dtype)
            noisy = p.scheduler.add_noise(latents, n, step)
            offset = time_offsets[:, ti] if time_offsets is not None else None
            with (
                time_embedding_offset(p.unet, offset),
                OutputCapture(p.unet, self.module_names, stop_early=o.stop_early) as cap,
            ):
                outs = cap.run(lambda z=noisy, s=step: p.unet(z, s, encoder_hidden_states=context))
            for name in self.module_names:
                per_t[name].append(outs[name].float())
        return {name: torch.stack(maps, dim=1) for name, maps in per_t.items()}

    # -- DDIM inversion and generation (Diffusion Hyperfeatures) ----------------------------

    def schedule(self) -> list[DdimStep]:
        """The UNet passes of the inversion (or, in generation mode, of the sampler)."""
        n = int(self.parts.scheduler.config.num_train_timesteps)
        make = generation_steps if self.options.mode == "generation" else inversion_steps
        return make(self.options.inversion_steps, n, self.options.steps_offset)

    def _unet_timestep(self, t: int, batch: int) -> torch.Tensor:
        # float, as the official code passes it; -1 (the clean latent) is embedded as is
        return torch.full((batch,), float(t), device=self.device)

    def invert(
        self,
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
        p, o = self.parts, self.options
        steps = self.schedule()
        kept = check_kept(list(o.timesteps), steps, "inversion")
        last = max(kept.values())
        alphas = p.scheduler.alphas_cumprod.float()
        prediction = p.scheduler.config.prediction_type
        x = latents.float()
        captured: dict[int, dict[str, torch.Tensor]] = {}
        for step in steps[: last + 1]:
            z, t_in = x.to(self.dtype), self._unet_timestep(step.t, x.shape[0])
            if step.t not in kept:
                out = p.unet(z, t_in, encoder_hidden_states=context).sample
            elif step.index == last:  # nothing after this pass is needed
                with OutputCapture(p.unet, self.module_names, stop_early=o.stop_early) as cap:
                    captured[step.t] = cap.run(
                        partial(p.unet, z, t_in, encoder_hidden_states=context)
                    )
                break
            else:
                with OutputCapture(p.unet, self.module_names, stop_early=False) as cap:
                    out = p.unet(z, t_in, encoder_hidden_states=context).sample
                captured[step.t] = {k: v.float() for k, v in cap.outputs.items()}
            a, a_next = alpha_at(alphas, step.t), alpha_at(alphas, step.t_next)
            a, a_next = a.to(self.device), a_next.to(self.device)
            eps = epsilon_from(out.float(), x, a, prediction)
            x = ddim_update(x, eps, a, a_next)
            if trajectory is not None:
                trajectory.append(x)
        return {
            name: torch.stack([captured[t][name].float() for t in o.timesteps], dim=1)
            for name in self.module_names
        }

    def generate(self, seed: int) -> tuple[Image.Image, FeatureSet]:
        """Sample one image from the prompt, capturing the maps while denoising.

        The initial noise is drawn on the CPU from ``seed``; with
        ``guidance_scale > 0`` every step runs the UNet on ``negative_prompt``
        and then on the prompt (classifier-free guidance) and the maps come
        from the prompt's pass, as the official code keeps the last call's.
        Returns the decoded image (at the model size) and its features, whose
        transform is the identity.
        """
        p, o = self.parts, self.options
        if o.mode != "generation":
            raise DiffeatError(
                f'generate needs [extractor] mode = "generation" (this one is {o.mode!r})'
            )
        if CATEGORY in o.prompt:
            raise DiffeatError("a generation prompt cannot use {category}: give the prompt itself")
        steps = self.schedule()
        kept = check_kept(list(o.timesteps), steps, "generation")
        alphas = p.scheduler.alphas_cumprod.float()
        prediction = p.scheduler.config.prediction_type
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn((1, *self.latent_shape()), generator=gen).to(self.device)
        guided = o.guidance_scale > 0
        captured: dict[int, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            cond = self.prompt_embeddings(o.prompt)
            uncond = self.prompt_embeddings(o.negative_prompt) if guided else None
            for step in steps:
                z, t_in = x.to(self.dtype), self._unet_timestep(step.t, 1)
                if uncond is not None:
                    out_u = p.unet(z, t_in, encoder_hidden_states=uncond).sample.float()
                if step.t in kept:
                    with OutputCapture(p.unet, self.module_names, stop_early=False) as cap:
                        out = p.unet(z, t_in, encoder_hidden_states=cond).sample.float()
                    captured[step.t] = {k: v.float() for k, v in cap.outputs.items()}
                else:
                    out = p.unet(z, t_in, encoder_hidden_states=cond).sample.float()
                if uncond is not None:
                    out = out_u + o.guidance_scale * (out - out_u)
                a, a_next = alpha_at(alphas, step.t), alpha_at(alphas, step.t_next)
                a, a_next = a.to(self.device), a_next.to(self.device)
                x = ddim_update(x, epsilon_from(out, x, a, prediction), a, a_next)
            image = self.decode(x)
        layers = {
            name: torch.cat([captured[t][name] for t in o.timesteps]) for name in self.module_names
        }
        meta = {
            "transform": self.transform_for(image.size).to_dict(),
            "prompt": o.prompt,
            "generation_seed": int(seed),
        }
        return image, FeatureSet(layers, self.timesteps(), meta)

    def decode(self, latents: torch.Tensor) -> Image.Image:
        """The image of one scaled latent ``[1, c, h, w]``, rounded to 8 bits."""
        vae = self.parts.vae
        pixels = vae.decode((latents / vae.config.scaling_factor).to(self.dtype)).sample
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray((pixels * 255).round().astype(np.uint8))
