"""Hyperfeatures checkpoints: one safetensors file, never a pickle.

Tensors: the network's ``state_dict`` under its own names (``bottleneck_layers.*``,
``mixing_weights``) plus optional extra tensors (e.g. optimizer state) under
:data:`EXTRA_PREFIX`. Metadata: ``{"diffeat": json.dumps({"network":
network.describe(), **extra})}``. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffeat.core.errors import DiffeatError
from diffeat.plugins.hyperfeatures.network import FORMAT, AggregationNetwork

#: metadata key holding the JSON description
METADATA_KEY = "diffeat"
#: name prefix of the extra (non-network) tensors in the file
EXTRA_PREFIX = "train."

#: a hidden ``.<name>.*.tmp`` file of an interrupted save (a killed process) is removed
#: by the next save to the same path once it has not changed for this long: a live save
#: writes its file within seconds, so a younger one may be another process's save
STALE_TMP_AGE_S = 600.0

_TRAIN_HINT = "train one with `diffeat train ... --out PATH`"


@dataclass
class Checkpoint:
    """A loaded checkpoint: network description and tensors, extra tensors and metadata."""

    path: Path
    network: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[tuple[str, int]]:
        """``(name, channels)`` of the layers the network was built (and trained) for."""
        return [(str(d["name"]), int(d["channels"])) for d in self.network["layers"]]

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.network["timesteps"]]


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def save_checkpoint(
    path: str | os.PathLike[str],
    network: AggregationNetwork,
    *,
    extra: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``network`` (and ``extra`` JSON metadata, ``tensors``) to one safetensors file.

    The file is written next to its final name and moved into place, so an
    interrupted write never leaves a partial checkpoint under ``path``; the hidden
    temporary files that killed saves to ``path`` left are removed once they are
    :data:`STALE_TMP_AGE_S` old (:func:`remove_stale_temps`).
    """
    from safetensors.torch import save_file

    extra = dict(extra or {})
    if "network" in extra:
        raise ValueError("extra metadata must not use the key 'network' (the description)")
    data = {k: _cpu(v) for k, v in network.state_dict().items()}
    for key, tensor in (tensors or {}).items():
        data[EXTRA_PREFIX + key] = _cpu(tensor)
    metadata = {METADATA_KEY: json.dumps({"network": network.describe(), **extra})}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(data, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it owner-only; a checkpoint is not secret
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(
    path: str | os.PathLike[str], min_age_s: float = STALE_TMP_AGE_S
) -> list[Path]:
    """Remove the temporary files (``.<name>.<random>.tmp`` next to ``path``) of saves to
    ``path`` that were killed, when unchanged for ``min_age_s`` seconds; best effort.
    Returns the files removed."""
    path = Path(path)
    prefix, now = f".{path.name}.", time.time()
    removed: list[Path] = []
    try:
        names = [e.name for e in os.scandir(path.parent)]
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        tmp = path.parent / name
        try:
            if now - tmp.stat().st_mtime < min_age_s:
                continue
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _not_ours(path: Path, why: str) -> DiffeatError:
    return DiffeatError(
        f"{path} is not a diffeat hyperfeatures checkpoint ({why}); give a .safetensors file "
        f"written by `diffeat train`, or {_TRAIN_HINT}"
    )


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors only, no unpickling)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DiffeatError(f"hyperfeatures checkpoint {path} {what}; {_TRAIN_HINT}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            raw = metadata.get(METADATA_KEY)
            if raw is None:
                raise _not_ours(path, "a safetensors file without diffeat metadata")
            all_tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise _not_ours(path, f"not a safetensors file: {exc}") from None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        raise _not_ours(path, "its diffeat metadata is not JSON") from None
    if not isinstance(info, dict) or not isinstance(info.get("network"), dict):
        raise _not_ours(path, "its diffeat metadata has no network description")
    network = info.pop("network")
    fmt = network.get("format")
    if fmt != FORMAT:
        raise DiffeatError(
            f"hyperfeatures checkpoint {path} has format {fmt!r}; this diffeat reads {FORMAT!r} "
            f"only. Use the diffeat version that wrote it, or {_TRAIN_HINT}"
        )
    state = {k: v for k, v in all_tensors.items() if not k.startswith(EXTRA_PREFIX)}
    tensors = {
        k[len(EXTRA_PREFIX) :]: v for k, v in all_tensors.items() if k.startswith(EXTRA_PREFIX)
    }
    return Checkpoint(path, network, state, tensors, info)


def network_from_checkpoint(ckpt: Checkpoint) -> AggregationNetwork:
    """The network described by ``ckpt`` with its weights loaded strictly."""
    try:
        with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the global RNG
            network = AggregationNetwork.from_description(ckpt.network)
    except ValueError as exc:
        raise DiffeatError(f"hyperfeatures checkpoint {ckpt.path}: {exc}") from None
    try:
        result = network.load_state_dict(ckpt.state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise DiffeatError(
            f"hyperfeatures checkpoint {ckpt.path} does not match its own description: "
            f"{str(exc).strip().splitlines()[-1].strip()}; the file is damaged, {_TRAIN_HINT}"
        ) from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing tensors {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected tensors {result.unexpected_keys[:5]}")
    if problems:
        raise DiffeatError(
            f"hyperfeatures checkpoint {ckpt.path} does not match its own description "
            f"({'; '.join(problems)}); the file is damaged, {_TRAIN_HINT}"
        )
    return network
