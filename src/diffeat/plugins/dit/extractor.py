"""The ``diffusion-transformer`` extractor: block outputs of SD3 / SD3.5, FLUX and PixArt.

Per image: resize to the model input, encode with the VAE (float32) into
``ensemble_size`` posterior samples, ``(z - shift_factor) * scaling_factor``;
for each timestep noise every copy as the family's schedule defines (flow
matching ``(1 - sigma) x0 + sigma noise``, or DDPM ``add_noise``), run the
transformer on the prompt's states with forward hooks on the requested blocks,
stopping after the deepest; keep the image tokens of each block output (text
tokens dropped), reshape them to the latent token grid (16 pixels per token),
average the copies and, with ``massive_activations = "ditf"``, normalise them
as DiTF does (:mod:`diffeat.plugins.dit.massive`).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from collections.abc import Sequence
from typing import Any

import torch

from diffeat.core.components import Extractor
from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError, DiffeatError, ModelLoadError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size
from diffeat.core.images import ImageInput, fit_image, fit_transform, resize, to_tensor
from diffeat.core.noise import image_seed
from diffeat.core.progress import inner_bar, row_slices
from diffeat.plugins.dit.families import (
    Family,
    config_block_names,
    ddpm_noise,
    default_sequence_length,
    encode_prompt,
    flow_sigma,
    forward_kwargs,
    reader_modulation,
)
from diffeat.plugins.dit.loading import (
    DitParts,
    detect_family,
    fingerprint,
    load_parts,
    needed_parts,
    read_index,
    resolve_folder,
)
from diffeat.plugins.dit.massive import ditf_normalise
from diffeat.plugins.dit.options import CATEGORY, PATCH_PIXELS, DiffusionTransformerOptions
from diffeat.plugins.module_capture import HookTarget, ModuleCapture

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_COND = "__conditioning__"

__all__ = ["DiffusionTransformerExtractor", "image_tokens", "tokens_to_map"]


def image_tokens(output: Any, n_image: int) -> torch.Tensor:
    """The image tokens ``[B, n_image, C]`` of a block output.

    Joint blocks (SD3, FLUX double- and single-stream) return ``(text, image)``;
    PixArt blocks return the image tokens; a block that returns text and image
    tokens concatenated (FLUX single-stream blocks of older diffusers) has the
    image tokens last. The text tokens are dropped.
    """
    x = output[-1] if isinstance(output, (tuple, list)) else output
    if x.shape[1] < n_image:
        raise DiffeatError(f"a block output has {x.shape[1]} tokens, fewer than {n_image}")
    return x[:, x.shape[1] - n_image :]


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major tokens ``[B, h*w, C]`` -> maps ``[B, C, h, w]``."""
    b, _n, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


class DiffusionTransformerExtractor(Extractor):
    """Captures block outputs of a diffusers SD3, FLUX or PixArt transformer."""

    Options = DiffusionTransformerOptions

    def __init__(self, options: DiffusionTransformerOptions | None = None) -> None:
        self.options = options or DiffusionTransformerOptions()
        self.options.validate()
        self.device = pick_device(self.options.device)
        self.dtype = DTYPES[self.options.dtype]
        self.batch_size = self.options.batch_size
        self._folder: Any = None
        self._family: Family | None = None
        self._parts: DitParts | None = None
        self._names: list[str] | None = None
        self._prompts: dict[str, dict[str, torch.Tensor]] = {}
        self._configs: dict[str, dict[str, Any]] = {}

    # -- model -------------------------------------------------------------------

    @property
    def folder(self) -> Any:
        if self._folder is None:
            self._folder = resolve_folder(self.options.model, self.options.revision)
        return self._folder

    @property
    def family(self) -> Family:
        if self._family is None:
            self._family = detect_family(self.folder)
        return self._family

    @property
    def parts(self) -> DitParts:
        if self._parts is None:
            o = self.options
            text_device = torch.device("cpu") if o.offload_text_encoders else self.device
            self._parts = load_parts(
                self.folder,
                self.family,
                dtype=self.dtype,
                device=self.device,
                text_device=text_device,
                t5=o.t5,
            )
        return self._parts

    def _check_channels(self) -> None:
        c = self.channels
        bad = [k for k in self.options.massive_channels if k >= c]
        if bad:
            raise ConfigError(
                f"[extractor] massive_channels {bad} are out of range: the blocks of "
                f"{self.options.model} have {c} channels"
            )

    @property
    def channels(self) -> int:
        cfg = self.config("transformer")
        return int(cfg["num_attention_heads"] * cfg["attention_head_dim"])

    def config(self, part: str) -> dict[str, Any]:
        """``<part>/config.json`` of the model folder (read without loading weights)."""
        if part not in self._configs:
            path = self.folder / part / "config.json"
            try:
                self._configs[part] = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read {path}: {exc}") from None
        return self._configs[part]

    def model_identity(self) -> dict[str, Any]:
        index = read_index(self.folder)
        parts = [
            "transformer",
            "vae",
            "scheduler",
            *needed_parts(index, self.family, self.options.t5),
        ]
        return {
            "model": self.options.model,
            "revision": self.options.revision,
            "family": self.family.name,
            "fingerprint": fingerprint(self.folder, parts),
        }

    @property
    def module_names(self) -> list[str]:
        """The requested blocks, in forward order (names and globs resolved)."""
        if self._names is None:
            valid = config_block_names(self.family, self.config("transformer"))
            chosen: list[str] = []
            for pattern in self.options.layers:
                matches = [n for n in valid if fnmatch.fnmatchcase(n, pattern)]
                if not matches:
                    near = difflib.get_close_matches(pattern, valid, n=4, cutoff=0.5)
                    first, last = valid[0], valid[-1]
                    raise ConfigError(
                        f"[extractor] layers: {self.family.name} model {self.options.model} has "
                        f"no block {pattern!r}"
                        + (f"; nearest: {', '.join(near)}" if near else "")
                        + f". Its blocks run from {first} to {last}"
                        + (
                            " (transformer_blocks.* then single_transformer_blocks.*)"
                            if self.family.name == "flux"
                            else ""
                        )
                        + "; glob patterns such as 'transformer_blocks.*' are allowed"
                    )
                chosen.extend(m for m in matches if m not in chosen)
            order = {n: i for i, n in enumerate(valid)}
            self._names = sorted(chosen, key=order.__getitem__)
            self._check_channels()
        return self._names

    # -- declarations ------------------------------------------------------------

    def timesteps(self) -> tuple[int, ...]:
        return tuple(self.options.timesteps)

    @property
    def model_size(self) -> Size:
        w, h = self.options.image_size
        return (int(w), int(h))

    def input_size(self, image_size: Size) -> Size:
        """The model input size for an image (fixed, or DiTF's ``longest`` rule)."""
        if self.options.size_rule != "longest":
            return self.model_size
        w, h = image_size
        s = max(self.model_size) / max(w, h)
        return (
            max(PATCH_PIXELS, round(w * s / PATCH_PIXELS) * PATCH_PIXELS),
            max(PATCH_PIXELS, round(h * s / PATCH_PIXELS) * PATCH_PIXELS),
        )

    def transform_for(self, image_size: Size) -> ImageTransform:
        if self.options.size_rule == "longest":
            return ImageTransform.resize(image_size, self.input_size(image_size))
        return fit_transform(image_size, self.model_size, self.options.size_rule)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.config("vae")["block_out_channels"]) - 1)

    @property
    def stride(self) -> int:
        """Pixels per token: the VAE factor times the 2x2 patch (FLUX packs it, the others patchify)."""
        patch = 2 if self.family.name == "flux" else int(self.config("transformer")["patch_size"])
        return self.vae_factor * patch

    def layers(self) -> list[LayerInfo]:
        """Every requested block: the transformer's width, one token per ``stride`` pixels
        (from the configs: no weights are loaded)."""
        return [LayerInfo(n, self.channels, float(self.stride)) for n in self.module_names]

    # -- prompts -------------------------------------------------------------------

    def prompt_for(self, image: ImageInput) -> str:
        template = self.options.prompt
        if CATEGORY in template and not image.category:
            raise DiffeatError(
                f"the prompt {template!r} needs the image's category, but {image.source} has "
                f"none: give a category (--category NAME, or evaluate on a dataset) or use a "
                f"fixed prompt"
            )
        return template.replace(CATEGORY, image.category)

    def conditioning(self, image: ImageInput) -> str:
        return self.prompt_for(image) if CATEGORY in self.options.prompt else ""

    def prompt_states(self, prompt: str) -> dict[str, torch.Tensor]:
        """The prompt's conditioning tensors (batch 1, on the device), encoded once.

        With ``offload_text_encoders`` the encoders come to the device for this and
        go back to the CPU after."""
        if prompt not in self._prompts:
            p, o = self.parts, self.options
            length = o.max_sequence_length or default_sequence_length(self.family, p.pipeline)
            offload = o.offload_text_encoders and self.device.type != "cpu"
            if offload:
                for enc in p.encoders:
                    enc.to(self.device)
            try:
                with torch.no_grad():
                    states = encode_prompt(self.family, p.pipeline, prompt, self.device, length)
            finally:
                if offload:
                    for enc in p.encoders:
                        enc.to("cpu")
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            self._prompts[prompt] = {
                k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in states.items()
            }
        return self._prompts[prompt]

    # -- noise ---------------------------------------------------------------------

    def latent_shape(self, size: Size) -> tuple[int, int, int]:
        w, h = size
        f = self.vae_factor
        return (int(self.config("vae")["latent_channels"]), h // f, w // f)

    def make_noise(self, key: str, size: Size | None = None) -> dict[str, torch.Tensor]:
        """``posterior`` ``[E, c, h, w]`` and ``noise`` ``[T, E, c, h, w]`` of one image,
        drawn on the CPU from the seed and the image content."""
        o = self.options
        shape = self.latent_shape(size or self.model_size)
        gen = torch.Generator().manual_seed(image_seed(o.seed, key))
        posterior = torch.randn((o.ensemble_size, *shape), generator=gen)
        noise = torch.randn((len(o.timesteps), o.ensemble_size, *shape), generator=gen)
        return {"posterior": posterior, "noise": noise}

    # -- extraction ----------------------------------------------------------------

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """``[3, H, W]`` in [-1, 1] at the model input size of this image."""
        o = self.options
        if o.size_rule == "longest":
            return to_tensor(resize(image.image, self.input_size(image.size), o.resample))
        return to_tensor(fit_image(image.image, self.model_size, o.size_rule, o.resample))

    def extract(
        self, images: Sequence[ImageInput], noise: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> list[FeatureSet]:
        """Features of each image; ``noise`` (one :meth:`make_noise` dict per image)
        replaces the seeded noise, for exact comparisons."""
        out: list[FeatureSet | None] = [None] * len(images)
        groups: dict[Size, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self.input_size(im.size), []).append(i)
        for size, idx in groups.items():
            pixels = torch.stack([self.preprocess(images[i]) for i in idx])
            draws = [
                noise[i] if noise is not None else self.make_noise(images[i].key, size) for i in idx
            ]
            prompts = [self.prompt_for(images[i]) for i in idx]
            maps = self.features_from_pixels(pixels, draws, prompts)
            for j, i in enumerate(idx):
                layers = {name: maps[name][j] for name in self.module_names}
                meta = {
                    "transform": self.transform_for(images[i].size).to_dict(),
                    "prompt": prompts[j],
                }
                out[i] = FeatureSet(layers, self.timesteps(), meta)
        return [fs for fs in out if fs is not None]

    def encode(
        self, pixels: torch.Tensor, noise: Sequence[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """Clean latents ``[B*E, c, h, w]``: ``(z - shift_factor) * scaling_factor`` with ``z``
        a posterior sample per copy (or the mean), in the model dtype."""
        vae, e = self.parts.vae, self.options.ensemble_size
        dist = vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        mean = dist.mean.repeat_interleave(e, dim=0)
        if self.options.latent == "sample":
            std = dist.std.repeat_interleave(e, dim=0)
            eps = torch.cat([n["posterior"] for n in noise]).to(self.device, mean.dtype)
            z = mean + std * eps
        else:
            z = mean
        shift = vae.config.get("shift_factor", None) or 0.0
        return ((z - shift) * vae.config.scaling_factor).to(self.dtype)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
        """``(x_t, sigma or t)``: the latents noised at timestep ``t`` as the family defines,
        and the value the transformer's timestep argument is made from."""
        fam, cfg = self.family, self.parts.scheduler_config
        if fam.flow:
            seq = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
            sigma = flow_sigma(cfg, t, seq, self.options.timestep_shift == "scheduler")
            return ((1 - sigma) * x0.float() + sigma * noise.float()).to(self.dtype), sigma
        xt = ddpm_noise(cfg, x0.float().cpu(), noise.float().cpu(), t)
        return xt.to(self.device, self.dtype), t

    def features_from_pixels(
        self,
        pixels: torch.Tensor,
        noise: Sequence[dict[str, torch.Tensor]],
        prompts: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """Per layer ``[B, T, C, h, w]`` (float32, ensemble-averaged, normalised with ``ditf``)."""
        b, e = pixels.shape[0], self.options.ensemble_size
        with torch.no_grad():
            x0 = self.encode(pixels, noise)
            states = [self.prompt_states(p) for p in prompts]
            cond = {
                k: torch.cat([s[k] for s in states]).repeat_interleave(e, dim=0)
                for k in states[0]
                if k != "txt_ids"
            }
            if "txt_ids" in states[0]:
                cond["txt_ids"] = states[0]["txt_ids"]
                if len({s["txt_ids"].shape for s in states}) > 1:
                    raise DiffeatError("FLUX prompts of one batch must have one T5 length")
            per_t: dict[str, list[torch.Tensor]] = {n: [] for n in self.module_names}
            desc = f"{self.family.name}, {b} image{'s' if b != 1 else ''}"
            chunks = row_slices(b * e, self.options.ensemble_batch)
            with inner_bar(len(self.options.timesteps) * len(chunks), desc) as bar:
                for ti, t in enumerate(self.options.timesteps):
                    eps = torch.cat([n["noise"][ti] for n in noise]).to(self.device)
                    xt, value = self.noisy(x0, eps, t)
                    done = []
                    for rows in chunks:
                        done.append(self.run(xt[rows], value, cond_rows(cond, rows)))
                        bar.update(1)
                    maps, mods = join_passes(done)
                    for name, m in maps.items():
                        mean = m.view(b, e, *m.shape[1:]).mean(dim=1)  # the ensemble first
                        if name in mods:  # DiTF: the AdaLN mean over the ensemble too
                            shift, scale = (v.view(b, e, -1).mean(dim=1) for v in mods[name])
                            mean = ditf_normalise(mean, shift, scale, self.options.massive_channels)
                        per_t[name].append(mean)
        return {name: torch.stack(items, dim=1) for name, items in per_t.items()}

    def run(
        self, xt: torch.Tensor, value: float, cond: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """One transformer pass: per layer maps ``[N, C, h, w]`` (float32) and, with
        ``ditf``, the ``(shift, scale)`` ``[N, C]`` of the AdaLN that reads each layer."""
        tf = self.parts.transformer
        h, w = xt.shape[-2] // 2, xt.shape[-1] // 2
        kwargs = forward_kwargs(self.family, tf, xt, value, cond, self.options.guidance)
        outs = self.capture(lambda: tf(**kwargs), h * w)
        maps = {n: tokens_to_map(outs[n].float(), h, w) for n in self.module_names}
        mods = {}
        if self.options.massive_activations == "ditf":
            mods = {
                n: reader_modulation(self.family, tf, n, outs[_COND]) for n in self.module_names
            }
        return maps, mods

    def capture(self, forward: Any, n_image: int) -> dict[str, Any]:
        """Run ``forward`` with hooks on the requested blocks (image tokens ``[N, n, C]``) and,
        for ``ditf``, on the conditioning module; stop after the deepest block."""
        modules = dict(self.parts.transformer.named_modules())
        targets = []
        if self.options.massive_activations == "ditf":
            # FLUX/SD3: the temb tensor; PixArt: adaln_single's (timestep, embedded_timestep)
            module = modules[self.family.conditioning_module]
            targets.append(HookTarget(_COND, module, "output", lambda o: o))
        for n in self.module_names:
            targets.append(HookTarget(n, modules[n], "output", lambda o: image_tokens(o, n_image)))
        with ModuleCapture(targets, stop_early=self.options.stop_early) as cap:
            return dict(cap.run(forward))


def cond_rows(cond: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The prompt tensors of the latents ``rows`` (FLUX's ``txt_ids`` has no row per latent)."""
    return {k: v if k == "txt_ids" else v[rows] for k, v in cond.items()}


def join_passes(
    passes: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The maps and AdaLN ``(shift, scale)`` of several forwards over consecutive rows, as
    one forward over all of them would give them."""
    if len(passes) == 1:
        return passes[0]
    maps = {n: torch.cat([p[0][n] for p in passes]) for n in passes[0][0]}
    mods = {
        n: (torch.cat([p[1][n][0] for p in passes]), torch.cat([p[1][n][1] for p in passes]))
        for n in passes[0][1]
    }
    return maps, mods
