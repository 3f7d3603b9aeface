"""Offline test helpers for diffeat and for third-party plugin authors (like ``zarr.testing``).

- :mod:`diffeat.testing.extractors`: :func:`smooth_texture` and :func:`photo_like` test images and the
  deterministic :class:`ColorBlurExtractor` / :class:`MultiColorBlurExtractor`.
- :mod:`diffeat.testing.sd`: a tiny random-weight Stable Diffusion
  (:func:`build_tiny_stable_diffusion`), a CLIP tokenizer written offline and
  tiny implicit-captioner weights; nothing is downloaded.
- :mod:`diffeat.testing.vit`: tiny random DINO, DINOv2 and OpenCLIP models.
- :mod:`diffeat.testing.dit`: tiny random diffusion transformers (SD3, FLUX,
  PixArt) with CLIP and T5 tokenizers written offline.
- :mod:`diffeat.testing.plugins`: :class:`TestPlugin` and :class:`AllHooksPlugin`
  (every hook implemented, third-party style).
- :mod:`diffeat.testing.s3`: :func:`~diffeat.testing.s3.local_s3_server`, a real
  S3-compatible server on localhost (moto) for stores on object storage.
- :mod:`diffeat.testing.conformance`: the conformance mixins a plugin author
  subclasses (:class:`ExtractorConformance`, :class:`AggregatorConformance`,
  :class:`MatcherConformance`, :class:`DatasetConformance`) and their
  ``check_*`` functions.

Everything listed in ``__all__`` is importable from ``diffeat.testing`` itself;
the tiny-model builders import diffusers, transformers or open_clip only when
called.
"""

from __future__ import annotations

from diffeat.testing.conformance import (
    AggregatorConformance,
    DatasetConformance,
    ExtractorConformance,
    MatcherConformance,
)
from diffeat.testing.dit import (
    build_tiny_flux,
    build_tiny_pixart,
    build_tiny_sd3,
    write_t5_tokenizer,
)
from diffeat.testing.extractors import (
    ColorBlurExtractor,
    ColorBlurOptions,
    MultiColorBlurExtractor,
    MultiColorBlurOptions,
    photo_like,
    smooth_texture,
)
from diffeat.testing.plugins import AllHooksPlugin, TestPlugin
from diffeat.testing.sd import (
    build_tiny_captioner,
    build_tiny_stable_diffusion,
    write_clip_tokenizer,
)
from diffeat.testing.vit import (
    TINY_OPENCLIP_NAME,
    build_tiny_dino,
    build_tiny_dinov2,
    build_tiny_openclip,
)

__all__ = [
    "TINY_OPENCLIP_NAME",
    "AggregatorConformance",
    "AllHooksPlugin",
    "ColorBlurExtractor",
    "ColorBlurOptions",
    "DatasetConformance",
    "ExtractorConformance",
    "MatcherConformance",
    "MultiColorBlurExtractor",
    "MultiColorBlurOptions",
    "TestPlugin",
    "build_tiny_captioner",
    "build_tiny_dino",
    "build_tiny_dinov2",
    "build_tiny_flux",
    "build_tiny_openclip",
    "build_tiny_pixart",
    "build_tiny_sd3",
    "build_tiny_stable_diffusion",
    "photo_like",
    "smooth_texture",
    "write_clip_tokenizer",
    "write_t5_tokenizer",
]
