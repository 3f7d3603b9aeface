"""Torch device choice shared by every component with a ``device`` option."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
