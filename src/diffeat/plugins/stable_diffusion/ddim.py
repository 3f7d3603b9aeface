"""Deterministic DDIM (eta 0) inversion and generation schedules, as Diffusion Hyperfeatures runs them.

The official code (Luo et al. 2023, after Shape-Guided Diffusion) takes the DDIM
timesteps of ``steps`` inference steps in ascending order, ``seq = [0, 20, ...,
980]`` for 50 steps, and pairs them with ``seq_next = [-1, 0, 20, ..., 960]``.
Inversion step ``i`` runs the UNet at ``seq_next[i]`` (``-1`` is the clean
latent, with an alpha of 1) and moves the latent to ``seq[i]``; generation walks
the same pairs backwards, from ``980`` down to ``0``, ending on ``-1`` (the
clean image). The update is DDIM with eta 0::

    x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_next = sqrt(a_next) * x0 + sqrt(1 - a_next) * eps
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffeat.core.errors import ConfigError

CLEAN = -1  # the "timestep" of the clean latent: alpha 1


@dataclass(frozen=True)
class DdimStep:
    """One UNet pass: run the UNet at ``t`` and move the latent to ``t_next``."""

    index: int
    t: int
    t_next: int


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, offset: int = 0) -> list[int]:
    """Ascending DDIM timesteps with diffusers' "leading" spacing plus ``offset``."""
    if steps < 1 or steps > num_train_timesteps:
        raise ConfigError(f"inversion_steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps // steps
    seq = [k * ratio + offset for k in range(steps)]
    if seq[0] < 0 or seq[-1] >= num_train_timesteps:
        raise ConfigError(
            f"steps_offset {offset} with {steps} steps gives timesteps {seq[0]}..{seq[-1]}, "
            f"outside 0..{num_train_timesteps - 1}: use an offset in 0..{ratio - 1}"
        )
    return seq


def inversion_steps(steps: int, num_train_timesteps: int = 1000, offset: int = 0) -> list[DdimStep]:
    """The inversion's UNet passes, clean latent first: ``t`` runs -1, 0, 20, ..., 960 for 50 steps."""
    seq = ddim_timesteps(steps, num_train_timesteps, offset)
    seq_prev = [CLEAN, *seq[:-1]]
    return [DdimStep(i, t, t_next) for i, (t, t_next) in enumerate(zip(seq_prev, seq))]


def generation_steps(
    steps: int, num_train_timesteps: int = 1000, offset: int = 0
) -> list[DdimStep]:
    """The sampler's UNet passes, noise first: ``t`` runs 980, 960, ..., 0 for 50 steps."""
    seq = ddim_timesteps(steps, num_train_timesteps, offset)
    seq_prev = [CLEAN, *seq[:-1]]
    pairs = list(zip(reversed(seq), reversed(seq_prev)))
    return [DdimStep(i, t, t_next) for i, (t, t_next) in enumerate(pairs)]


def alpha_at(alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    """``alphas_cumprod[t]``, or 1 for the clean latent (``t = -1``)."""
    if t == CLEAN:
        return torch.ones((), dtype=alphas_cumprod.dtype)
    return alphas_cumprod[t]


def epsilon_from(
    output: torch.Tensor, latent: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise estimate from a UNet output (``epsilon`` as is; ``v_prediction`` converted)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha.sqrt() * output + (1 - alpha).sqrt() * latent
    raise ConfigError(
        f"DDIM inversion supports epsilon and v_prediction models, not {prediction_type!r}"
    )


def ddim_update(
    latent: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_next: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM move (eta 0) from ``alpha`` to ``alpha_next``."""
    x0 = (latent - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    return alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps


def check_kept(kept: list[int], schedule: list[DdimStep], mode: str) -> dict[int, int]:
    """Map each kept UNet timestep to its step index, or say which timesteps exist."""
    by_t = {s.t: s.index for s in schedule}
    missing = [t for t in kept if t not in by_t]
    if missing:
        valid = [s.t for s in schedule]
        shown = ", ".join(map(str, valid[:8])) + (", ..." if len(valid) > 8 else "")
        raise ConfigError(
            f"[extractor] timesteps {missing} are not UNet timesteps of the {len(schedule)}-step "
            f"DDIM {mode} (those are {shown}, {valid[-1]}); pick timesteps from that list or "
            f"change inversion_steps"
        )
    if len(set(kept)) != len(kept):
        raise ConfigError(f"[extractor] timesteps {kept} lists a timestep twice")
    return {t: by_t[t] for t in kept}
