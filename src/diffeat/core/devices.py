"""Torch device choice shared by every component with a ``device`` option.

:func:`pick_device` is the one place a device name from a config, an option or
``--device`` becomes a :class:`torch.device`: a name torch cannot parse, or a
device this machine does not have (``cuda`` without a GPU, ``cuda:7`` on a
one-GPU machine, ``mps`` off Apple silicon), is a :class:`ConfigError` that
names the value and the devices that exist, not a traceback at the first
``.to(device)``.
"""

from __future__ import annotations

import torch

from diffeat.core.errors import ConfigError

__all__ = ["available_devices", "pick_device"]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The device names this machine can use: ``cpu``, then ``cuda:N`` per GPU, then ``mps``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    if _mps_available():
        names.append("mps")
    return names


def _unavailable(name: str, why: str) -> ConfigError:
    return ConfigError(
        f"device {name!r} {why}; this machine has: {', '.join(available_devices())}. "
        "Choose one of these with --device (or the component's 'device' option), "
        "or 'auto' (CUDA when available, else the CPU)"
    )


def _probe(device: torch.device) -> bool:
    """Whether a tensor can be made on a device of a type this module has no check for."""
    try:
        torch.empty(0, device=device)
    except Exception:  # any failure means "not usable here"
        return False
    return True


def pick_device(name: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as torch spells it,
    checked to exist on this machine (:class:`ConfigError` naming the devices that do)."""
    if isinstance(name, torch.device):
        device = name
        name = str(name)
    else:
        name = str(name).strip()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            raise _unavailable(name, "is not a torch device name") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _unavailable(name, "needs a CUDA GPU, and torch sees none here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise _unavailable(
                name, f"is not here: torch sees {count} CUDA GPU{'s' if count != 1 else ''}"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise _unavailable(name, "needs Apple's Metal (MPS) backend, which is not available")
        return device
    if not _probe(device):
        raise _unavailable(name, "cannot be used on this machine")
    return device
