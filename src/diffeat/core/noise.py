"""The seed of an image's noise: one rule for every diffusion extractor.

An extractor that adds noise draws it on the CPU from a generator seeded by
:func:`image_seed`, so an image's features depend on the config seed and the
image's content only: not on the device, the batch it came in, the order of
images, or which worker of a sharded run computed it.
"""

from __future__ import annotations

import hashlib

__all__ = ["image_seed"]


def image_seed(seed: int, key: str) -> int:
    """The noise seed of the image with content key ``key`` under the config ``seed``."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)
