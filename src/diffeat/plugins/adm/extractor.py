"""The ``adm`` extractor: DIFT on guided-diffusion's ADM UNet (DIFT_adm), run by diffusers.

As the official featurizer (``src/models/dift_adm.py`` of DIFT) does it:

1. the image is squash-resized with Pillow (bicubic) to ``image_size`` (512 x 512) and
   scaled to [-1, 1];
2. it is repeated ``ensemble_size`` times and one Gaussian draw of that whole batch's
   shape is the noise (``randn_like``); here drawn on the CPU from a generator seeded by
   ``(seed, image content)``, so features do not depend on batch composition or device;
3. ``q_sample`` at t: ``sqrt(acp[t]) * x + sqrt(1 - acp[t]) * noise`` with the
   coefficients computed in float64 from guided-diffusion's linear betas (through its
   ``SpacedDiffusion`` respacing, which recomputes the betas from the products) and cast
   to float32, as ``_extract_into_tensor`` does;
4. one UNet pass on the batch at timestep t; the requested blocks' outputs are captured by
   forward hooks on the diffusers modules that end them
   (:mod:`diffeat.plugins.adm.architecture`), the forward stops after the deepest one,
   and each map is averaged over the ensemble.

The UNet is diffusers' ``UNet2DModel`` loaded with ``from_pretrained`` from a folder
written by ``diffeat convert adm``; nothing of guided-diffusion's code is copied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffeat.core.components import Extractor
from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError, ModelLoadError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size
from diffeat.core.images import (
    ImageInput,
    fit_image,
    fit_transform,
    model_size_for,
    to_tensor,
)
from diffeat.core.noise import image_seed
from diffeat.core.progress import inner_bar, row_slices
from diffeat.plugins.adm.architecture import AdmArchitecture, BlockInfo
from diffeat.plugins.adm.convert import ADM_FILE, read_adm_meta
from diffeat.plugins.adm.options import AdmOptions
from diffeat.plugins.modelfiles import files_fingerprint
from diffeat.plugins.module_capture import HookTarget, ModuleCapture, first_tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def q_sample_coefficients(
    t: int, steps: int = 1000, schedule: str = "linear"
) -> tuple[float, float]:
    """``(sqrt(acp[t]), sqrt(1 - acp[t]))`` of guided-diffusion, float64 then float32.

    The betas are guided-diffusion's named schedule; ``SpacedDiffusion`` with every step
    kept recomputes them as ``1 - acp[i] / acp[i-1]`` and their products again, which this
    repeats so the float64 values are the original's to the last bit.
    """
    if schedule == "linear":
        scale = 1000 / steps
        betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    elif schedule == "cosine":

        def bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - bar((i + 1) / steps) / bar(i / steps), 0.999) for i in range(steps)]
        )
    else:
        raise ConfigError(f"noise schedule {schedule!r} is not supported (linear, cosine)")
    if not 0 <= t < steps:
        raise ConfigError(f"[extractor] timesteps: {t} is outside 0..{steps - 1}")
    acp = np.cumprod(1.0 - betas, axis=0)
    respaced, last = [], 1.0
    for a in acp:
        respaced.append(1 - a / last)
        last = a
    acp = np.cumprod(1.0 - np.array(respaced, dtype=np.float64), axis=0)
    return float(np.float32(np.sqrt(acp[t]))), float(np.float32(np.sqrt(1.0 - acp[t])))


class AdmExtractor(Extractor):
    """Captures output (or input) blocks of a guided-diffusion ADM UNet (DIFT_adm)."""

    Options = AdmOptions

    def __init__(self, options: AdmOptions | None = None) -> None:
        self.options = options or AdmOptions()
        self.options.validate()
        self.device = pick_device(self.options.device)
        self.dtype = DTYPES[self.options.dtype]
        self.batch_size = self.options.batch_size
        self._folder: Path | None = None
        self._unet: Any = None
        self._arch: AdmArchitecture | None = None
        self._blocks: list[BlockInfo] | None = None

    # -- model ---------------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        if self._folder is None:
            model = self.options.model
            if not model:
                raise ConfigError(
                    "[extractor] model: give the folder written by `diffeat convert adm "
                    "256x256_diffusion_uncond.safetensors OUT_DIR` (docs/adm.md)"
                )
            path = Path(model).expanduser()
            if not path.is_dir():
                raise ModelLoadError(
                    f"[extractor] model {model!r} is not a folder: convert the official weights "
                    f"with `diffeat convert adm STATE.safetensors {model}` (docs/adm.md)"
                )
            if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
                found = sorted(p.name for p in path.iterdir())[:8]
                raise ModelLoadError(
                    f"{path} has no config.json and {WEIGHTS} (found {found}): the adm "
                    f"extractor reads a folder written by `diffeat convert adm`"
                )
            self._folder = path
        return self._folder

    @property
    def architecture(self) -> AdmArchitecture:
        if self._arch is None:
            path = self.folder / "config.json"
            try:
                config = json.loads(path.read_text())
            except ValueError as exc:
                raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
            self._arch = AdmArchitecture.from_unet_config(config, str(path))
        return self._arch

    @property
    def meta(self) -> dict[str, Any]:
        return read_adm_meta(self.folder)

    @property
    def unet(self) -> Any:
        if self._unet is None:
            from diffusers import UNet2DModel

            from diffeat.plugins.diffusers_models import quiet_diffusers

            self.architecture  # noqa: B018 - refuse a folder of another family first
            quiet_diffusers()
            try:
                unet = UNet2DModel.from_pretrained(self.folder, torch_dtype=self.dtype)
            except Exception as exc:
                raise ModelLoadError(
                    f"cannot load the ADM UNet from {self.folder}: {type(exc).__name__}: {exc}"
                ) from None
            self._unet = unet.to(self.device).eval().requires_grad_(False)
        return self._unet

    def model_identity(self) -> dict[str, Any]:
        files = [self.folder / "config.json", self.folder / WEIGHTS]
        if (self.folder / ADM_FILE).is_file():
            files.append(self.folder / ADM_FILE)
        meta = self.meta
        return {
            "family": "guided-diffusion",
            "fingerprint": files_fingerprint(files, self.folder),
            "diffusion_steps": meta["diffusion_steps"],
            "noise_schedule": meta["noise_schedule"],
        }

    # -- declarations --------------------------------------------------------------------------

    @property
    def blocks(self) -> list[BlockInfo]:
        """The requested blocks in forward order, with their diffusers modules."""
        if self._blocks is None:
            self._blocks = self.architecture.resolve_layers(
                list(self.options.layers), "[extractor] layers"
            )
        return self._blocks

    def timesteps(self) -> tuple[int, ...]:
        return tuple(self.options.timesteps)

    @property
    def model_size(self) -> Size:
        w, h = self.options.image_size
        return (int(w), int(h))

    def model_size_of(self, image_size: Size) -> Size:
        """The model input of an image of ``image_size`` (``image_size`` for ``resize``)."""
        return model_size_for(image_size, self.model_size, self.options.size_rule)

    def transform_for(self, image_size: Size) -> ImageTransform:
        return fit_transform(image_size, self.model_size_of(image_size), self.options.size_rule)

    def layers(self) -> list[LayerInfo]:
        """Channels and stride (input pixels per cell) of each block, from the architecture."""
        return [LayerInfo(b.name, b.channels, float(b.stride)) for b in self.blocks]

    # -- extraction ----------------------------------------------------------------------------

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """``[3, H, W]`` in [-1, 1]: Pillow resize to the model size, as the original."""
        size = self.model_size_of(image.size)
        return to_tensor(
            fit_image(image.image, size, self.options.size_rule, self.options.resample)
        )

    def make_noise(self, key: str, size: Size | None = None) -> torch.Tensor:
        """The noise of one image ``[T, E, 3, H, W]`` at the model size ``size`` (default
        ``image_size``): one draw per timestep of the whole ensemble batch, from a CPU
        generator seeded by :func:`image_seed`."""
        o = self.options
        w, h = size or self.model_size
        gen = torch.Generator().manual_seed(image_seed(o.seed, key))
        shape = (o.ensemble_size, self.architecture.in_channels, h, w)
        return torch.stack([torch.randn(shape, generator=gen) for _ in o.timesteps])

    def check_size(self, size: Size | None = None) -> None:
        factor = 2 ** (self.architecture.levels - 1)
        size = size or self.model_size
        if any(v % factor for v in size):
            raise ConfigError(
                f"[extractor] image_size {list(size)} must be a multiple of "
                f"{factor} for this model ({self.architecture.levels} levels)"
            )

    def extract(
        self, images: Sequence[ImageInput], noise: Sequence[torch.Tensor] | None = None
    ) -> list[FeatureSet]:
        """Features of each image; ``noise`` (one :meth:`make_noise`-shaped tensor per image)
        replaces the seeded noise, for exact comparisons."""
        if not images:
            return []
        groups: dict[Size, list[int]] = {}  # one UNet batch per model size (short-side)
        for i, im in enumerate(images):
            groups.setdefault(self.model_size_of(im.size), []).append(i)
        out: dict[int, FeatureSet] = {}
        for size, indices in groups.items():
            self.check_size(size)
            pixels = torch.stack([self.preprocess(images[i]) for i in indices])
            noises = [
                noise[i] if noise is not None else self.make_noise(images[i].key, size)
                for i in indices
            ]
            maps = self.features_from_pixels(pixels, noises)
            for j, i in enumerate(indices):
                out[i] = FeatureSet(
                    {b.name: maps[b.name][j] for b in self.blocks},
                    self.timesteps(),
                    {"transform": self.transform_for(images[i].size).to_dict()},
                )
        return [out[i] for i in range(len(images))]

    def features_from_pixels(
        self, pixels: torch.Tensor, noise: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per block ``[B, T, C, h, w]`` (float32, ensemble-averaged) for pixels ``[B, 3, H, W]``
        in [-1, 1] and per-image noise ``[T, E, 3, H, W]``."""
        b, e = pixels.shape[0], self.options.ensemble_size
        meta = self.meta
        x0 = pixels.to(self.device, torch.float32).repeat_interleave(e, dim=0)
        per_t: dict[str, list[torch.Tensor]] = {blk.name: [] for blk in self.blocks}
        desc = f"adm, {b} image{'s' if b != 1 else ''}"
        chunks = row_slices(b * e, self.options.ensemble_batch)
        with inner_bar(len(self.options.timesteps) * len(chunks), desc) as bar:
            for ti, t in enumerate(self.options.timesteps):
                a, s = q_sample_coefficients(t, meta["diffusion_steps"], meta["noise_schedule"])
                eps = torch.cat([n[ti] for n in noise]).to(self.device, torch.float32)
                xt = (a * x0 + s * eps).to(self.dtype)
                parts: dict[str, list[torch.Tensor]] = {blk.name: [] for blk in self.blocks}
                for rows in chunks:
                    for name, m in self.run_unet(xt[rows], t).items():
                        parts[name].append(m)
                    bar.update(1)
                for name, ms in parts.items():  # every copy ran: average each image's ensemble
                    m = torch.cat(ms)
                    per_t[name].append(m.view(b, e, *m.shape[1:]).mean(dim=1))
        return {name: torch.stack(ms, dim=1) for name, ms in per_t.items()}

    def run_unet(self, xt: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
        """The captured block outputs (float32) of one UNet pass on ``xt`` at timestep ``t``."""
        modules = dict(self.unet.named_modules())
        targets = [
            HookTarget(b.name, modules[b.module], "output", first_tensor) for b in self.blocks
        ]
        steps = torch.full((xt.shape[0],), int(t), dtype=torch.long, device=xt.device)
        with torch.no_grad(), ModuleCapture(targets, stop_early=self.options.stop_early) as cap:
            outs = cap.run(lambda: self.unet(xt, steps))
        return {name: m.float() for name, m in outs.items()}
