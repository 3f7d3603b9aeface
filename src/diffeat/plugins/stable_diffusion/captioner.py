"""ODISE's implicit captioner: the UNet conditioned on the image's own CLIP embedding.

ODISE (Xu et al. 2023), and SD-DINO through it, do not give the UNet a text
prompt. A frozen CLIP image tower embeds the (tile of the) image; two trained
"positional linear" layers map that embedding to

- a prompt: ``uncond + tanh(alpha_cond) * (W_c e + b_c + P_c)``, where
  ``uncond`` is the empty prompt's text-encoder states ``[1, 77, D]`` and
  ``P_c`` a learned ``[1, 77, D]`` positional term;
- a time-embedding offset per timestep ``i``:
  ``tanh(alpha_cond_time_embed) * (W_t e + b_t + P_t[:, i])``, added to the
  UNet's time embedding (after its MLP), as ODISE's ``unet_forward`` does.

The CLIP input is the tile in [0, 1] resized so its short side is the tower's
size (bicubic, no antialias: torchvision's tensor ``Resize`` of ODISE's era),
centre-cropped, normalised with the model's mean and std (ODISE's
``ClipAdapter`` with ``open_clip`` ``ViT-L-14-336`` / ``openai``); the embedding
is the tower's pooled, projected output, not L2-normalised.

The trained weights live only in ODISE's pickled checkpoint; diffeat reads them
from a safetensors file the user exports once (docs/sd-dino.md), with or
without ODISE's ``backbone.feature_extractor.`` name prefix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffeat.core.errors import ModelLoadError
from diffeat.plugins.openclip_models import OpenClipTower

#: the name prefix of these tensors in ODISE's checkpoint
ODISE_PREFIX = "backbone.feature_extractor."
_EXPORT_HINT = "export them from ODISE's checkpoint as docs/sd-dino.md shows"
_PROMPT_KEYS = ("clip_project.linear.weight", "clip_project.linear.bias")
_TIME_KEYS = (
    "time_embed_project.linear.weight",
    "time_embed_project.linear.bias",
    "time_embed_project.positional_embedding",
    "alpha_cond_time_embed",
)


@dataclass
class CaptionerWeights:
    """The trained tensors of the implicit captioner (ODISE's names, without the prefix)."""

    prompt_weight: torch.Tensor  # [D, E]
    prompt_bias: torch.Tensor  # [D]
    prompt_position: torch.Tensor  # [1, L, D]
    alpha_cond: torch.Tensor  # [1, L, D]
    time_weight: torch.Tensor  # [T_dim, E]
    time_bias: torch.Tensor  # [T_dim]
    time_position: torch.Tensor  # [1, n, T_dim]
    alpha_time: torch.Tensor  # [T_dim]

    @property
    def time_slots(self) -> int:
        """How many timesteps the time-embedding offset has positions for."""
        return int(self.time_position.shape[1])

    def to(self, device: torch.device | str) -> CaptionerWeights:
        """The same tensors on ``device``."""
        return CaptionerWeights(**{k: v.to(device) for k, v in vars(self).items()})


def captioner_file(path: str | Path) -> Path:
    """The captioner weights file, or a :class:`ModelLoadError` saying how to make it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelLoadError(
            f'captioner weights {file} do not exist; {_EXPORT_HINT}, or set captioner = "" '
            f"to condition on the prompt"
        )
    return file


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"captioner weights {path} are not a readable safetensors file ({exc}); {_EXPORT_HINT}"
        ) from None
    return {k.removeprefix(ODISE_PREFIX): v.float() for k, v in tensors.items()}


def _expect(
    tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], path: Path
) -> torch.Tensor:
    if key not in tensors:
        raise ModelLoadError(
            f"captioner weights {path} have no tensor {key!r} (found: "
            f"{', '.join(sorted(tensors)) or 'none'}); {_EXPORT_HINT}"
        )
    found = tuple(tensors[key].shape)
    if found != shape:
        raise ModelLoadError(
            f"captioner weights {path}: {key!r} has shape {list(found)}, this model needs "
            f"{list(shape)} (prompt length and width of the text encoder, width of the UNet's "
            f"time embedding, CLIP embedding size): the weights belong to another model"
        )
    return tensors[key]


def load_captioner_weights(
    path: str | Path, prompt_shape: tuple[int, int], time_dim: int, clip_dim: int
) -> CaptionerWeights:
    """Read and check the captioner tensors for a text encoder giving ``prompt_shape``
    ``(L, D)``, a UNet time embedding of ``time_dim`` and a CLIP embedding of ``clip_dim``."""
    path = captioner_file(path)
    t = _read(path)
    length, width = prompt_shape
    # the time projection's positions: one per timestep ODISE was trained with (1)
    position = t.get(_TIME_KEYS[2])
    slots = int(position.shape[1]) if position is not None and position.ndim == 3 else 1
    return CaptionerWeights(
        prompt_weight=_expect(t, _PROMPT_KEYS[0], (width, clip_dim), path),
        prompt_bias=_expect(t, _PROMPT_KEYS[1], (width,), path),
        prompt_position=_expect(t, "clip_project.positional_embedding", (1, length, width), path),
        alpha_cond=_expect(t, "alpha_cond", (1, length, width), path),
        time_weight=_expect(t, _TIME_KEYS[0], (time_dim, clip_dim), path),
        time_bias=_expect(t, _TIME_KEYS[1], (time_dim,), path),
        time_position=_expect(t, _TIME_KEYS[2], (1, slots, time_dim), path),
        alpha_time=_expect(t, _TIME_KEYS[3], (time_dim,), path),
    )


def clip_input(
    pixels: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> the CLIP tower's input: short side to ``size`` (bicubic,
    no antialias), centre crop ``size`` x ``size``, normalised."""
    h, w = pixels.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    x = pixels
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    x = x[..., top : top + size, left : left + size]
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


class ImplicitCaptioner:
    """Turns image tiles into ODISE's prompt states and time-embedding offsets."""

    def __init__(
        self,
        weights: CaptionerWeights,
        visual: nn.Module,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.weights = weights
        self.visual = visual
        self.size = size
        self.mean, self.std = mean, std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings ``[N, E]`` (float32) of tiles ``[N, 3, H, W]`` in [0, 1]."""
        param = next(self.visual.parameters())
        x = clip_input(pixels.float(), self.size, self.mean, self.std)
        with torch.no_grad():
            return self.visual(x.to(param.device, param.dtype)).float()

    def condition(
        self, pixels: torch.Tensor, empty_prompt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt states ``[N, L, D]`` and time offsets ``[N, n, T_dim]`` of tiles
        ``[N, 3, H, W]`` in [0, 1]; ``empty_prompt`` ``[1, L, D]`` is the text encoder's
        states of the empty prompt."""
        w = self.weights  # on the tower's device (build_captioner)
        e = self.embed(pixels)
        projected = F.linear(e, w.prompt_weight, w.prompt_bias)
        prompt = projected[:, None] + w.prompt_position
        states = empty_prompt.to(e.device).float() + torch.tanh(w.alpha_cond) * prompt
        t = F.linear(e, w.time_weight, w.time_bias)
        offsets = torch.tanh(w.alpha_time) * (t[:, None] + w.time_position)
        return states.to(empty_prompt.device), offsets.to(empty_prompt.device)


def clip_tower(model: str, pretrained: str, device: str) -> OpenClipTower:
    """The captioner's CLIP tower (not yet loaded), at the tower's own input size as ODISE
    runs it; open_clip resolves ``model``/``pretrained`` as the ``openclip`` extractor does."""
    return OpenClipTower(model, pretrained, device)


def build_captioner(
    path: str | Path, clip: OpenClipTower, prompt_shape: tuple[int, int], time_dim: int
) -> ImplicitCaptioner:
    """The captioner of the weights at ``path`` on the tower ``clip`` (:func:`clip_tower`),
    checked against a text encoder giving ``prompt_shape`` and a time embedding of ``time_dim``."""
    weights = load_captioner_weights(path, prompt_shape, time_dim, clip.embed_dim).to(clip.device)
    mean, std = clip.normalisation()
    return ImplicitCaptioner(weights, clip.model, clip.size, tuple(mean), tuple(std))


@contextlib.contextmanager
def time_embedding_offset(unet: nn.Module, offset: torch.Tensor | None) -> Iterator[None]:
    """Add ``offset`` ``[B, T_dim]`` to the output of ``unet.time_embedding`` while inside.

    That output is the embedding every ResNet block receives (diffusers applies
    no activation after it for Stable Diffusion), which is where ODISE adds its
    ``cond_emb``.
    """
    if offset is None:
        yield
        return

    def add(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        return output + offset.to(output.device, output.dtype)

    handle = unet.time_embedding.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
