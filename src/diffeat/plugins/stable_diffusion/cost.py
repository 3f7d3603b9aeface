"""How long one image will take on the CPU, and a warning (once) when it is minutes.

The DIFT and hyperfeatures presets are sized for a GPU (768 px, an ensemble of
8, or 50 DDIM steps): on a CPU one image takes minutes. Before the first
extraction on a CPU, :func:`warn_if_slow` estimates the seconds per image from
the work (pixels x UNet passes, scaled by the model's parameter count and the
torch threads) and, above :data:`WARN_SECONDS`, logs one warning naming the
options that make it faster (and, when the whole ensemble runs in one UNet forward,
``ensemble_batch``, which lets the progress bar count copies).

The estimate is calibrated on ``docs/performance.md``: the real-size SD 1.5
architecture (UNet 859.5 M parameters) at 512 x 512 on 2 CPU threads takes
about 5.3 s per full UNet pass per ensemble copy (2.65 s when the forward stops
after ``up_blocks.1``) and 7.6 s per VAE encode; the DIFT preset at 512 px is
28.9 s per image. Time is taken as proportional to pixels, parameters and
passes, and inversely to threads: a rough figure, for deciding whether to wait.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from diffeat.core.progress import INNER_MIN_PASSES

if TYPE_CHECKING:
    from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor

log = logging.getLogger(__name__)

#: Warn when one image is estimated to take longer than this on the CPU.
WARN_SECONDS = 60.0
#: Calibration (docs/performance.md, 2 threads, 512 x 512, SD 1.5 sizes).
REFERENCE_PIXELS = 512 * 512
REFERENCE_THREADS = 2
REFERENCE_UNET_PARAMS = 859.5e6
REFERENCE_VAE_ENCODER_PARAMS = 34.2e6
UNET_PASS_SECONDS = 5.3
STOPPED_EARLY_FRACTION = 0.5
VAE_ENCODE_SECONDS = 7.6

_warned: weakref.WeakSet[StableDiffusionExtractor] = weakref.WeakSet()


@dataclass(frozen=True)
class CpuCost:
    """The work of one image and its estimated CPU time."""

    pixels: int
    """pixels of every UNet input of one image together (all tiles)"""
    unet_passes: int
    """UNet passes per image: ensemble copies x timesteps (add-noise) or DDIM steps"""
    seconds: float
    """estimated wall time per image on the CPU"""


def estimate(
    *,
    pixels: int,
    unet_passes: int,
    unet_params: float,
    vae_encoder_params: float,
    threads: int,
    full_passes: bool,
) -> CpuCost:
    """The estimated CPU seconds of one image (see the module docstring for the model)."""
    scale = pixels / REFERENCE_PIXELS * REFERENCE_THREADS / max(1, threads)
    per_pass = UNET_PASS_SECONDS * (1.0 if full_passes else STOPPED_EARLY_FRACTION)
    unet = unet_passes * per_pass * unet_params / REFERENCE_UNET_PARAMS
    vae = VAE_ENCODE_SECONDS * vae_encoder_params / REFERENCE_VAE_ENCODER_PARAMS
    return CpuCost(pixels, unet_passes, scale * (unet + vae))


def cpu_threads() -> int:
    """The threads torch computes with on the CPU."""
    return torch.get_num_threads()


def _params(module: torch.nn.Module | None) -> float:
    return float(sum(p.numel() for p in module.parameters())) if module is not None else 0.0


def extractor_cost(ex: StableDiffusionExtractor) -> CpuCost:
    """The estimated CPU cost of one image for this extractor's options and model."""
    o = ex.options
    tile_w, tile_h = ex.tile
    pixels = tile_w * tile_h * len(ex.tile_origins())
    inverting = o.mode in ("inversion", "generation")
    per_copy = int(o.inversion_steps) if inverting else len(o.timesteps)
    vae = ex.parts.vae
    return estimate(
        pixels=pixels,
        unet_passes=int(o.ensemble_size) * per_copy,
        unet_params=_params(ex.parts.unet),
        vae_encoder_params=_params(getattr(vae, "encoder", None)),
        threads=cpu_threads(),
        full_passes=inverting or not o.stop_early,
    )


def faster_options(ex: StableDiffusionExtractor, cost: CpuCost) -> list[str]:
    """``--set`` overrides that bring this extractor's CPU time down (smaller maps, a
    smaller ensemble or fewer DDIM steps: less accurate, for a first look)."""
    o = ex.options
    hints: list[str] = []
    seconds = cost.seconds
    if o.ensemble_size > 1:
        hints.append("--set extractor.ensemble_size=1")
        seconds /= o.ensemble_size
    target = WARN_SECONDS / 2
    if seconds > target:
        side = max(0.25, (target / seconds) ** 0.5)
        w, h = ex.model_size
        size = (max(128, int(w * side) // 64 * 64), max(128, int(h * side) // 64 * 64))
        if size != (w, h):
            hints.append(f"--set 'extractor.image_size=[{size[0]},{size[1]}]'")
    return hints


def progress_hint(ex: StableDiffusionExtractor) -> str:
    """How to see progress inside an image whose ensemble runs in too few UNet forwards for
    a bar (DIFT: one forward per timestep for all copies): ``ensemble_batch``; else ``""``."""
    o = ex.options
    if ex.recipe.mode not in ("add-noise", "clean") or o.ensemble_batch or o.ensemble_size < 2:
        return ""
    if len(o.timesteps) >= INNER_MIN_PASSES:
        return ""
    return "; --set extractor.ensemble_batch=1 shows its progress copy by copy"


def warn_if_slow(ex: StableDiffusionExtractor) -> CpuCost | None:
    """Before the first extraction of ``ex`` on a CPU, log a warning (once per extractor)
    when one image will take longer than :data:`WARN_SECONDS`. Returns the estimate when
    it was made (first call on a CPU), else None."""
    if ex.device.type != "cpu" or ex in _warned:
        return None
    _warned.add(ex)
    cost = extractor_cost(ex)
    if cost.seconds <= WARN_SECONDS:
        return cost
    w, h = ex.model_size
    hints = " ".join(faster_options(ex, cost))
    faster = f"for a quick look: {hints} (less accurate), or " if hints else ""
    took = f"{cost.seconds:.0f} s" if cost.seconds < 120 else f"{cost.seconds / 60:.0f} min"
    log.warning(
        "stable-diffusion on the CPU: about %s per image (%dx%d px, %d UNet passes, "
        "%d threads); %suse a GPU (--device cuda)%s",
        took,
        w,
        h,
        cost.unet_passes,
        cpu_threads(),
        faster,
        progress_hint(ex),
    )
    return cost
