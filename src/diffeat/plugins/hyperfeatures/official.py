"""Import the official Diffusion Hyperfeatures aggregation network's weights.

The official release (``weights/aggregation_network.pt``) is a pickle, which
diffeat never loads: its state dict must first be exported to safetensors by
the user, once, in an environment they trust (the command is in
``docs/hyperfeatures.md``, "The official weights").

:func:`import_official` then checks the tensors against the official
architecture (12 decoder ResNet layers ``up_blocks.{i}.resnets.{j}`` in order,
one bottleneck each, flat mixing weights, timestep-major) and writes a diffeat
checkpoint for the extractor's layers and timesteps. The state-dict names are
the same in both, so the weights are taken as they are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffeat.core.errors import DiffeatError
from diffeat.plugins.hyperfeatures.checkpoint import save_checkpoint
from diffeat.plugins.hyperfeatures.network import AggregationNetwork

#: the official save_timestep [49, 45, ..., 0] of a 50-step inversion, as UNet timesteps
OFFICIAL_TIMESTEPS = [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]
_CONV1 = re.compile(r"^bottleneck_layers\.(\d+)\.0\.conv1\.weight$")


def official_layer_names(count: int) -> list[str]:
    """The official layer order: ``up_blocks[i].resnets[j]`` for i, j in row-major order."""
    return [f"up_blocks.{i // 3}.resnets.{i % 3}.conv2" for i in range(count)]


def config_layers(patterns: Sequence[str], count: int = 12) -> list[str]:
    """The layer names a config's ``layers`` patterns stand for, when they are the official ones.

    Only the official layer set can take the official weights, so the glob
    ``up_blocks.*.resnets.*.conv2`` (or the 12 names spelled out) is all this
    needs to expand, without loading a model.
    """
    names = official_layer_names(count)
    if list(patterns) in (["up_blocks.*.resnets.*.conv2"], names):
        return names
    return list(patterns)


def read_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with a message naming the file on failure."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise DiffeatError(f"{p} does not exist: export the official state dict first (see docs)")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DiffeatError(
            f"{p} is not a safetensors file ({exc}); export the official state dict with "
            "safetensors.torch.save_file (docs/hyperfeatures.md)"
        ) from None


def import_official(
    state_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    layers: Sequence[str],
    timesteps: Sequence[int],
    size: tuple[int, int] = (64, 64),
    norm_groups: int = 32,
) -> Path:
    """Write a diffeat checkpoint holding the official network's weights.

    ``layers`` and ``timesteps`` are the extractor's (names in order, UNet
    timesteps in order); they must be the official 12 decoder layers and as
    many timesteps as the weights were trained with.
    """
    state = read_state(state_path)
    where = str(state_path)
    indices = sorted(int(m.group(1)) for k in state if (m := _CONV1.match(k)))
    if not indices or indices != list(range(len(indices))) or "mixing_weights" not in state:
        raise DiffeatError(
            f"{where} does not hold the official aggregation network's state dict (expected "
            "bottleneck_layers.<i>.0.conv1.weight and mixing_weights)"
        )
    names = official_layer_names(len(indices))
    if list(layers) != names:
        raise DiffeatError(
            f"the official weights are for the layers {names}; this config's extractor has "
            f'{list(layers)}: use layers = ["up_blocks.*.resnets.*.conv2"] (the presets do)'
        )
    mixing = state["mixing_weights"]
    if mixing.numel() % len(names) or mixing.numel() // len(names) != len(timesteps):
        raise DiffeatError(
            f"{where} mixes {mixing.numel()} maps ({len(names)} layers x "
            f"{mixing.numel() / len(names):g} timesteps); this config keeps {len(timesteps)} "
            f"timesteps {list(timesteps)}: use the preset the weights were trained with"
        )
    official = {11: OFFICIAL_TIMESTEPS, 1: [-1]}.get(len(timesteps))
    if official is not None and list(timesteps) != official:
        raise DiffeatError(
            f"the official {len(timesteps)}-timestep weights mix the maps of UNet timesteps "
            f"{official} in that order; this config keeps {list(timesteps)}: use the preset's "
            "timesteps (the mixing weights would be assigned to the wrong maps)"
        )
    channels = [int(state[f"bottleneck_layers.{i}.0.conv1.weight"].shape[1]) for i in indices]
    projection = int(state["bottleneck_layers.0.0.conv3.weight"].shape[0])
    network = AggregationNetwork(
        list(zip(names, channels)),
        list(timesteps),
        projection_dim=projection,
        norm_groups=norm_groups,
        size=size,
    )
    try:
        network.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise DiffeatError(
            f"{where}: the tensors do not fit the official architecture: {exc}"
        ) from None
    extra: dict[str, Any] = {"imported_from": str(state_path), "source": "official"}
    return save_checkpoint(out_path, network, extra=extra)
