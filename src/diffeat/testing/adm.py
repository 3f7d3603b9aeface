"""Tiny guided-diffusion (ADM) checkpoints with the official key names, and a written-out
reference of the official forward, for offline tests of the ``adm`` extractor.

- :func:`tiny_adm_architecture`: the 256x256 model's structure (6 levels with channel
  multipliers 1, 1, 2, 2, 4, 4, two residual blocks per level, attention on the three
  lowest resolutions, scale-shift norm, resnet up/down-sampling, learned sigma) with 32
  base channels and 16 channels per head (so every attention has 2 to 8 heads and the
  per-head qkv layout matters), at 64 px.
- :func:`tiny_official_state_dict` / :func:`write_tiny_official_state`: random tensors
  under every official key (``input_blocks.4.1.qkv.weight``, ...), generated from the
  architecture rules, as ``model.state_dict()`` of guided-diffusion gives them.
- :func:`build_tiny_adm`: that state dict written to safetensors and converted with
  ``diffeat convert adm``'s code into a ``UNet2DModel`` folder.
- :func:`reference_blocks`: guided-diffusion's ``UNetModel.forward`` written out with
  ``torch.nn.functional`` on the official state dict (legacy attention: heads split before
  q, k, v; ``scale = ch ** -0.25`` on both q and k), returning every block's output; it
  reads the block structure from the keys, not from diffeat's architecture walk.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from diffeat.plugins.adm.architecture import AdmArchitecture, AttentionOrder

__all__ = [
    "build_tiny_adm",
    "reference_blocks",
    "tiny_adm_architecture",
    "tiny_official_state_dict",
    "write_tiny_official_state",
]

#: the 256x256 model's (256, 256, 512, 512, 1024, 1024) divided by 8
TINY_ADM_CHANNELS = (32, 32, 64, 64, 128, 128)
TINY_ADM_HEAD_CHANNELS = 16


def tiny_adm_architecture() -> AdmArchitecture:
    """The 256x256 unconditional model's structure at tiny width (see module docs)."""
    return AdmArchitecture(
        block_out_channels=TINY_ADM_CHANNELS,
        num_res_blocks=2,
        attention_levels=(3, 4, 5),
        num_head_channels=TINY_ADM_HEAD_CHANNELS,
        in_channels=3,
        out_channels=6,
        scale_shift=True,
        image_size=64,
    )


def tiny_official_state_dict(
    arch: AdmArchitecture | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random float32 tensors under every official key of ``arch`` (tiny by default).

    Weights are N(0, 1/fan_in) (so activations stay O(1) through the depth), norm scales
    1 + N(0, 0.1^2), biases N(0, 0.1^2); the zero-initialised output convolutions of the
    original are random too, so every module changes the result.
    """
    arch = arch or tiny_adm_architecture()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in arch.official_shapes().items():
        noise = torch.randn(shape, generator=gen)
        is_norm = ".norm." in key or ".in_layers.0." in key or ".out_layers.0." in key
        is_norm = is_norm or key.startswith("out.0.")
        if key.endswith(".bias"):
            state[key] = 0.1 * noise
        elif is_norm:
            state[key] = 1.0 + 0.1 * noise
        else:
            fan_in = math.prod(shape[1:])
            state[key] = noise / math.sqrt(fan_in)
    return state


def write_tiny_official_state(
    path: str | Path, arch: AdmArchitecture | None = None, seed: int = 0
) -> Path:
    """:func:`tiny_official_state_dict` saved as safetensors at ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_official_state_dict(arch, seed), str(path))
    return path


def build_tiny_adm(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ADM ``UNet2DModel`` folder converted from a tiny official state dict
    (``<folder>.official.safetensors`` beside it). Returns ``folder``."""
    from diffeat.plugins.adm.convert import convert_file

    folder = Path(folder)
    arch = tiny_adm_architecture()
    source = write_tiny_official_state(
        folder.with_name(folder.name + ".official.safetensors"), arch, seed
    )
    convert_file(
        source, folder, num_head_channels=arch.num_head_channels, image_size=arch.image_size
    )
    return folder


# -- the official forward, written out ----------------------------------------------------------


def _timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(x: torch.Tensor, state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return F.group_norm(x.float(), 32, state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-5)


def _resblock(
    s: dict[str, torch.Tensor],
    key: str,
    x: torch.Tensor,
    emb: torch.Tensor,
    updown: str = "",
) -> torch.Tensor:
    h = F.silu(_norm(x, s, f"{key}.in_layers.0"))
    if updown == "up":
        h, x = (
            F.interpolate(h, scale_factor=2, mode="nearest"),
            F.interpolate(x, scale_factor=2, mode="nearest"),
        )
    elif updown == "down":
        h, x = F.avg_pool2d(h, 2, 2), F.avg_pool2d(x, 2, 2)
    h = F.conv2d(h, s[f"{key}.in_layers.2.weight"], s[f"{key}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), s[f"{key}.emb_layers.1.weight"], s[f"{key}.emb_layers.1.bias"])
    e = e[..., None, None]
    if e.shape[1] == 2 * h.shape[1]:  # use_scale_shift_norm
        scale, shift = torch.chunk(e, 2, dim=1)
        h = _norm(h, s, f"{key}.out_layers.0") * (1 + scale) + shift
    else:
        h = _norm(h + e, s, f"{key}.out_layers.0")
    h = F.conv2d(
        F.silu(h), s[f"{key}.out_layers.3.weight"], s[f"{key}.out_layers.3.bias"], padding=1
    )
    if f"{key}.skip_connection.weight" in s:
        x = F.conv2d(x, s[f"{key}.skip_connection.weight"], s[f"{key}.skip_connection.bias"])
    return x + h


def _attention(
    s: dict[str, torch.Tensor], key: str, x: torch.Tensor, head_channels: int, order: AttentionOrder
) -> torch.Tensor:
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(_norm(x, s, f"{key}.norm"), s[f"{key}.qkv.weight"], s[f"{key}.qkv.bias"])
    heads, length = c // head_channels, x.shape[-1]
    ch = head_channels
    if order == "legacy":  # QKVAttentionLegacy: split heads, then q, k, v
        q, k, v = qkv.reshape(b * heads, ch * 3, length).split(ch, dim=1)
    else:  # QKVAttention: split q, k, v, then heads
        q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
    h = F.conv1d(a, s[f"{key}.proj_out.weight"], s[f"{key}.proj_out.bias"])
    return (x + h).reshape(b, c, *spatial)


def _sub_layers(s: dict[str, torch.Tensor], block: str) -> list[tuple[str, str]]:
    """``(key, kind)`` of the layers of one TimestepEmbedSequential, read from the keys."""
    out = []
    for i in range(4):
        key = f"{block}.{i}"
        if f"{key}.qkv.weight" in s:
            out.append((key, "attention"))
        elif f"{key}.in_layers.0.weight" in s:
            out.append((key, "resblock"))
        elif f"{key}.weight" in s:
            out.append((key, "conv"))
    return out


def reference_blocks(
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    num_res_blocks: int = 2,
    head_channels: int = TINY_ADM_HEAD_CHANNELS,
    order: AttentionOrder = "legacy",
) -> dict[str, torch.Tensor]:
    """Every block's output (``input_blocks.i``, ``middle_block``, ``output_blocks.i``) and
    ``out`` of guided-diffusion's forward on ``x`` at timesteps ``t``, written out."""
    s = {k: v.float() for k, v in state.items()}
    c0 = s["input_blocks.0.0.weight"].shape[0]
    emb = _timestep_embedding(t, c0)
    emb = F.linear(F.silu(F.linear(emb, s["time_embed.0.weight"], s["time_embed.0.bias"])),
                   s["time_embed.2.weight"], s["time_embed.2.bias"])  # fmt: skip
    n_in = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("input_blocks."))
    n_out = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("output_blocks."))
    outs: dict[str, torch.Tensor] = {}

    def run_block(block: str, h: torch.Tensor, mode: str = "") -> torch.Tensor:
        """``mode``: "down" (a downsampling ResBlock), "up" (an output block: a ResBlock after
        the first layer upsamples), "" (neither)."""
        for j, (key, kind) in enumerate(_sub_layers(s, block)):
            if kind == "conv":
                h = F.conv2d(h, s[f"{key}.weight"], s[f"{key}.bias"], padding=1)
            elif kind == "attention":
                h = _attention(s, key, h, head_channels, order)
            else:
                updown = "down" if mode == "down" else ("up" if mode == "up" and j > 0 else "")
                h = _resblock(s, key, h, emb, updown)
        outs[block] = h
        return h

    h, hs = x.float(), []
    for i in range(n_in):
        down = i > 0 and i % (num_res_blocks + 1) == 0
        h = run_block(f"input_blocks.{i}", h, "down" if down else "")
        hs.append(h)
    h = run_block("middle_block", h)
    for i in range(n_out):
        h = run_block(f"output_blocks.{i}", torch.cat([h, hs.pop()], dim=1), "up")
    h = F.silu(_norm(h, s, "out.0"))
    outs["out"] = F.conv2d(h, s["out.2.weight"], s["out.2.bias"], padding=1)
    return outs
