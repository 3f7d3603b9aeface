"""``diffeat convert adm``: guided-diffusion's state dict -> a diffusers ``UNet2DModel`` folder.

The official checkpoint (``256x256_diffusion_uncond.pt``) is a pickle, which diffeat never
loads: export its state dict to safetensors once, in an environment you trust
(``docs/adm.md``). :func:`convert_state_dict` then

1. infers the architecture from the tensors' shapes (channels per level, residual blocks per
   level, the levels with attention, learned sigma, scale-shift norm); the width of an
   attention head is not in the weights and is an argument (64 for the 256x256 model);
2. compares the file key by key and shape by shape with the official key set of that
   architecture (:meth:`AdmArchitecture.official_shapes`) and refuses any missing,
   unexpected or misshapen tensor, naming them;
3. renames every tensor to its ``UNet2DModel`` name, splitting each fused ``qkv`` of the
   legacy attention per head (:func:`interleaved_qkv`; a plain split into thirds would
   silently give other features), squeezing the 1-d convolutions to linear weights;
4. checks the result against a freshly built ``UNet2DModel`` (names and shapes again) and
   writes it with ``save_pretrained`` (safetensors) plus ``adm.json`` (where it came from,
   the diffusion schedule of the original).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from diffeat.core.errors import DiffeatError
from diffeat.plugins.adm.architecture import (
    AdmArchitecture,
    AttentionOrder,
    Part,
    interleaved_qkv,
)

#: written beside config.json: what the folder was converted from, the diffusion schedule
ADM_FILE = "adm.json"
_INPUT_RES = re.compile(r"^input_blocks\.(\d+)\.0\.in_layers\.2\.weight$")


def read_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or unreadable file is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        raise DiffeatError(
            f"{p} is a folder: pass the safetensors file of the official state dict "
            f"(docs/adm.md, 'Converting the weights')"
        )
    if not p.is_file():
        raise DiffeatError(
            f"{p} does not exist: export the official state dict to safetensors first "
            f"(docs/adm.md, 'Converting the weights')"
        )
    if p.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise DiffeatError(
            f"{p} looks like a PyTorch pickle, which diffeat never loads: export its state "
            f"dict to safetensors once (docs/adm.md, 'Converting the weights') and pass that file"
        )
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DiffeatError(f"{p} is not a readable safetensors file: {exc}") from None


def infer_architecture(
    state: dict[str, torch.Tensor],
    *,
    num_head_channels: int = 64,
    image_size: int = 256,
    where: str = "state dict",
) -> AdmArchitecture:
    """The guided-diffusion architecture whose state dict ``state`` is (see module docs);
    a state dict that is not one (odd key names, missing blocks, tensors of the wrong rank)
    is a :class:`DiffeatError` naming what is wrong."""
    try:
        return _infer_architecture(
            state, num_head_channels=num_head_channels, image_size=image_size, where=where
        )
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise DiffeatError(
            f"{where}: not a guided-diffusion UNet state dict ({type(exc).__name__}: {exc}). "
            "Export `model.state_dict()` of guided-diffusion's UNetModel (docs/adm.md)"
        ) from None


def _infer_architecture(
    state: dict[str, torch.Tensor],
    *,
    num_head_channels: int,
    image_size: int,
    where: str,
) -> AdmArchitecture:
    if "label_emb.weight" in state:
        raise DiffeatError(
            f"{where}: a class-conditional model (label_emb.weight); the adm extractor runs "
            f"unconditional models such as 256x256_diffusion_uncond (DIFT_adm)"
        )
    needed = ["input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        sample = ", ".join(sorted(state)[:5]) or "no tensors"
        raise DiffeatError(
            f"{where}: not a guided-diffusion UNet state dict (no {', '.join(missing)}; found "
            f"{sample}, ...). Export `model.state_dict()` of guided-diffusion's UNetModel"
        )
    c0, in_ch = state["input_blocks.0.0.weight"].shape[:2]
    out_ch = state["out.2.weight"].shape[0]
    # output blocks: the first one ending with an upsampling ResBlock is number num_res_blocks
    n_out = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("output_blocks."))
    up = [
        i
        for i in range(n_out)
        if f"output_blocks.{i}.1.in_layers.0.weight" in state
        or f"output_blocks.{i}.2.in_layers.0.weight" in state
    ]
    if not up:
        raise DiffeatError(f"{where}: no upsampling block among output_blocks.0-{n_out - 1}")
    per_level = up[0] + 1
    if n_out % per_level:
        raise DiffeatError(
            f"{where}: {n_out} output blocks do not split into levels of {per_level} blocks"
        )
    levels = n_out // per_level
    res = {int(m.group(1)): state[k].shape[0] for k in state if (m := _INPUT_RES.match(k))}
    channels, attention = [], []
    for level in range(levels):
        first = 1 + level * per_level
        if first not in res:
            raise DiffeatError(f"{where}: no input_blocks.{first}.0 residual block")
        channels.append(int(res[first]))
        if f"input_blocks.{first}.1.qkv.weight" in state:
            attention.append(level)
    if levels > 1 and f"input_blocks.{per_level}.0.op.weight" in state:
        raise DiffeatError(
            f"{where}: down-sampling by strided convolution (resblock_updown=False); diffeat "
            f"converts guided-diffusion models with resblock_updown=True, as the 256x256 model"
        )
    emb = state.get("input_blocks.1.0.emb_layers.1.weight")
    scale_shift = emb is not None and emb.shape[0] == 2 * channels[0]
    if channels[0] != c0:
        raise DiffeatError(f"{where}: conv_in gives {c0} channels, level 0 has {channels[0]}")
    return AdmArchitecture(
        block_out_channels=tuple(channels),
        num_res_blocks=per_level - 1,
        attention_levels=tuple(attention),
        num_head_channels=num_head_channels,
        in_channels=int(in_ch),
        out_channels=int(out_ch),
        scale_shift=scale_shift,
        image_size=image_size,
    )


def check_keys(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Refuse missing, unexpected or misshapen tensors, naming up to 8 of each."""

    def listing(names: list[str]) -> str:
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        return ", ".join(names[:8]) + more

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {list(found[k])} (expected {list(expected[k])})"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) of the wrong shape: {listing(shapes)}")
    if problems:
        raise DiffeatError(f"{where}: " + "; ".join(problems))


def _part_tensors(
    p: Part, state: dict[str, torch.Tensor], arch: AdmArchitecture, order: AttentionOrder
) -> dict[str, torch.Tensor]:
    o, d = p.official, p.diffusers
    if p.kind in ("linear", "conv", "norm"):
        return {f"{d}.weight": state[f"{o}.weight"], f"{d}.bias": state[f"{o}.bias"]}
    if p.kind == "attention":
        heads = arch.heads(p.out_channels)
        wq, wk, wv = interleaved_qkv(state[f"{o}.qkv.weight"][..., 0], heads, order)
        bq, bk, bv = interleaved_qkv(state[f"{o}.qkv.bias"], heads, order)
        return {
            f"{d}.group_norm.weight": state[f"{o}.norm.weight"],
            f"{d}.group_norm.bias": state[f"{o}.norm.bias"],
            f"{d}.to_q.weight": wq,
            f"{d}.to_q.bias": bq,
            f"{d}.to_k.weight": wk,
            f"{d}.to_k.bias": bk,
            f"{d}.to_v.weight": wv,
            f"{d}.to_v.bias": bv,
            f"{d}.to_out.0.weight": state[f"{o}.proj_out.weight"][..., 0],
            f"{d}.to_out.0.bias": state[f"{o}.proj_out.bias"],
        }
    names = {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
    }
    if p.in_channels != p.out_channels:
        names["skip_connection"] = "conv_shortcut"
    return {
        f"{d}.{new}.{t}": state[f"{o}.{old}.{t}"]
        for old, new in names.items()
        for t in ("weight", "bias")
    }


def diffusers_state_dict(
    state: dict[str, torch.Tensor], arch: AdmArchitecture, order: AttentionOrder = "legacy"
) -> dict[str, torch.Tensor]:
    """``state`` (official names, checked) renamed and split for ``UNet2DModel``."""
    out: dict[str, torch.Tensor] = {}
    for p in arch.parts():
        out.update(_part_tensors(p, state, arch, order))
    return {k: v.contiguous() for k, v in out.items()}


def convert_state_dict(
    state: dict[str, torch.Tensor],
    *,
    num_head_channels: int = 64,
    attention_order: AttentionOrder = "legacy",
    image_size: int = 256,
    where: str = "state dict",
) -> tuple[Any, AdmArchitecture]:
    """A ``UNet2DModel`` (float32) holding the official weights ``state``, and its architecture."""
    from diffusers import UNet2DModel

    arch = infer_architecture(
        state, num_head_channels=num_head_channels, image_size=image_size, where=where
    )
    check_keys({k: tuple(v.shape) for k, v in state.items()}, arch.official_shapes(), where)
    converted = diffusers_state_dict(state, arch, attention_order)
    with torch.device("meta"):
        unet = UNet2DModel(**arch.unet_config())
    target = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    check_keys(
        {k: tuple(v.shape) for k, v in converted.items()},
        target,
        f"{where} converted to UNet2DModel (a diffeat bug: please report it)",
    )
    unet = UNet2DModel(**arch.unet_config())
    unet.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return unet.eval(), arch


def convert_file(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    num_head_channels: int = 64,
    attention_order: AttentionOrder = "legacy",
    image_size: int = 256,
    diffusion_steps: int = 1000,
    noise_schedule: str = "linear",
) -> tuple[Path, AdmArchitecture]:
    """Convert the safetensors file ``source`` into the folder ``out_dir`` (see module docs)."""
    from diffeat.plugins.modelfiles import file_fingerprint

    src = Path(source)
    state = read_state(src)
    unet, arch = convert_state_dict(
        state,
        num_head_channels=num_head_channels,
        attention_order=attention_order,
        image_size=image_size,
        where=str(src),
    )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / ADM_FILE).is_file():
            raise DiffeatError(
                f"{out} exists and is not empty: give a new folder (or one written by "
                f"`diffeat convert adm` to overwrite it)"
            )
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out, safe_serialization=True)
    meta = {
        "family": "guided-diffusion",
        "source": src.name,
        "source_fingerprint": file_fingerprint(src),
        "num_head_channels": num_head_channels,
        "attention_order": attention_order,
        "diffusion_steps": diffusion_steps,
        "noise_schedule": noise_schedule,
        "learn_sigma": arch.out_channels == 2 * arch.in_channels,
    }
    (out / ADM_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out, arch


def read_adm_meta(folder: Path) -> dict[str, Any]:
    """``adm.json`` of a converted folder (defaults of the 256x256 model when absent)."""
    meta: dict[str, Any] = {"diffusion_steps": 1000, "noise_schedule": "linear"}
    path = folder / ADM_FILE
    if path.is_file():
        try:
            meta.update(json.loads(path.read_text()))
        except ValueError as exc:
            raise DiffeatError(
                f"{path} is not valid JSON ({exc}): convert the weights again"
            ) from None
    return meta
