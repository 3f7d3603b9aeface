"""What the ViT extractors (``dino``, ``dinov2``, ``openclip``) share.

Each returns dense patch-token maps, one layer per requested transformer block:
``[1, C, H/p, W/p]`` (one "timestep", 0) for a model input of ``W x H`` and
patch size ``p``; the CLS and register tokens are dropped. A layer is named
``blocks.<i>`` (facet ``token``: the block's output) or ``blocks.<i>.<facet>``
(``key``, ``query``, ``value``: the outputs of the block's self-attention
projections, all heads concatenated head after head, so ``C`` is the
attention width). Block indices in the options may be negative (from the end);
layer names always carry the resolved, non-negative index.

As in the Stable Diffusion extractor, the model is never re-implemented:
forward hooks sit on its public submodules and a private exception stops the
forward once the deepest requested output is in (``stop_early``).

Images are resized with PIL (``size_rule``: ``resize`` squashes to
``image_size``; ``pad`` scales the image to fit inside ``image_size`` keeping
its aspect ratio and centres it on black, as SD-DINO does), scaled to [0, 1]
and normalised with the model's own mean and std.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from diffeat.core.components import Extractor
from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size
from diffeat.core.images import ImageInput, fit_image, fit_transform
from diffeat.core.options import opt
from diffeat.core.speed import compile_around
from diffeat.plugins.module_capture import HookTarget, ModuleCapture

FACETS = ("token", "key", "query", "value")
Facet = Literal["token", "key", "query", "value"]
SizeRule = Literal["resize", "pad"]
Resample = Literal["bicubic", "bilinear", "lanczos", "nearest"]
DType = Literal["float32", "float16", "bfloat16"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: torchvision's ImageNet statistics, which DINO and DINOv2 were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -- option fields shared by the three Options dataclasses -------------------------------------
# (each plugin declares its own dataclass so that its table in docs/config.md reads in order)


def revision_field() -> Any:
    return opt("", "hub revision (branch, tag or commit); empty: the default branch")


def blocks_field(default: list[int]) -> Any:
    return opt(
        default,
        "transformer blocks to read, 0-based; negative counts from the end (-1: the last "
        "block); one layer per block, named blocks.<i> or blocks.<i>.<facet>",
    )


def facet_field() -> Any:
    return opt(
        "token",
        "what is read from each block: token (the block's output tokens) or key, query, "
        "value (the block's self-attention projections, heads concatenated)",
    )


def final_norm_field() -> Any:
    return opt(
        False,
        "apply the model's final LayerNorm to the token features (DINO's "
        "get_intermediate_layers does); facet token only",
    )


def image_size_field(default: list[int], interpolation: str = "bicubic") -> Any:
    return opt(
        default,
        "model input [width, height], multiples of the patch size; position embeddings are "
        f"interpolated ({interpolation}) for sizes other than the training size",
    )


PositionInterpolation = Literal["official", "transformers"]


def stride_field() -> Any:
    return opt(
        0,
        "step of the patch embedding in pixels, a divisor of the patch size; smaller than the "
        "patch: overlapping patches and a denser grid of 1 + (side - patch) / stride tokens "
        "(Amir et al.'s dense ViT descriptors, SD-DINO's DINOv1 option: 4 for ViT-S/8); "
        "0: the patch size",
        cache="if-set",
    )


def position_interpolation_field() -> Any:
    return opt(
        "official",
        "how position embeddings are resized for other input sizes: official: as the DINO / "
        "DINOv2 repositories (torch.hub models, which DIFT's and SD-DINO's baselines run): "
        "bicubic with scale factor (n + 0.1) / N; transformers: its own bicubic resize to "
        "exactly n (size=), which samples slightly differently",
    )


def size_rule_field() -> Any:
    return opt(
        "resize",
        "resize: squash the image to image_size; pad: fit it inside image_size keeping its "
        "aspect ratio, centred on black (SD-DINO)",
    )


def resample_field() -> Any:
    return opt("bicubic", "PIL resize filter")


def dtype_field() -> Any:
    return opt("float32", "model dtype")


def device_field() -> Any:
    return opt("auto", "torch device; auto: cuda if available, else cpu", cache=False)


def batch_size_field() -> Any:
    return opt(1, "images per forward pass", cache=False)


def compile_field() -> Any:
    return opt(
        False,
        "torch.compile the transformer blocks that hold no captured layer (the first batch "
        "compiles, later ones run faster; results equal up to float rounding)",
        cache=False,
    )


def stop_early_field() -> Any:
    return opt(True, "stop the forward once the deepest requested block ran", cache=False)


def validate_common(options: Any) -> None:
    """Checks that need no model (the patch-size check comes when the model config is read)."""
    if not options.blocks:
        raise ValueError("blocks: give at least one block index, e.g. [-1] for the last block")
    if len(set(options.blocks)) != len(options.blocks):
        raise ValueError(f"blocks: {options.blocks} lists a block twice")
    if len(options.image_size) != 2 or any(v < 1 for v in options.image_size):
        raise ValueError(
            f"image_size must be [width, height] with positive values, got {options.image_size}"
        )
    if options.final_norm and options.facet != "token":
        raise ValueError(
            f"final_norm applies to facet 'token' only (facet is {options.facet!r}); "
            f"set final_norm = false"
        )
    if options.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {options.batch_size}")
    if getattr(options, "stride", 0) < 0:
        raise ValueError(f"stride must be >= 0 (0: the patch size), got {options.stride}")


# -- model facts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What an extractor needs to know about a model before loading its weights."""

    patch_size: int
    num_blocks: int
    width: int  # channels of the block output tokens
    attn_width: int  # channels of the key/query/value projections (heads x head dim)
    prefix_tokens: int  # CLS (+ registers) before the patch tokens


def resolve_blocks(blocks: Sequence[int], num_blocks: int, where: str) -> list[int]:
    """Non-negative, sorted block indices; an index out of range names the valid range."""
    out = []
    for b in blocks:
        i = b + num_blocks if b < 0 else b
        if not 0 <= i < num_blocks:
            raise ConfigError(
                f"{where}: block {b} does not exist; the model has {num_blocks} blocks "
                f"(0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)"
            )
        if i in out:
            raise ConfigError(f"{where}: {list(blocks)} names block {i} twice")
        out.append(i)
    return sorted(out)


def layer_name(block: int, facet: str) -> str:
    return f"blocks.{block}" if facet == "token" else f"blocks.{block}.{facet}"


def check_patch_multiple(size: Size, patch: int, model: str) -> None:
    """A :class:`ConfigError` suggesting the nearest valid sizes when ``size`` is not a multiple."""
    w, h = size
    if w % patch == 0 and h % patch == 0:
        return

    def near(v: int) -> str:
        down, up = max(patch, v // patch * patch), math.ceil(v / patch) * patch
        return f"{down} or {up}" if down != up else str(up)

    raise ConfigError(
        f"[extractor] image_size [{w}, {h}] is not a multiple of the patch size {patch} of "
        f"{model}: every side must be divisible by {patch} (width {near(w)}, height {near(h)})"
    )


# -- images --------------------------------------------------------------------------------------


def preprocess(
    image: Image.Image,
    model_size: Size,
    rule: str,
    resample: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """``[3, H, W]`` float32: resized (or fitted and padded with black), scaled to [0, 1], normalised."""
    img = fit_image(image, model_size, rule, resample)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def preprocess_input(
    image: ImageInput,
    model_size: Size,
    rule: str,
    resample: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """:func:`preprocess` of an :class:`ImageInput` (module level: picklable for workers)."""
    return preprocess(image.image, model_size, rule, resample, mean, std)


def tokens_to_map(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, N, C]`` tokens (prefix tokens first) to a ``[B, C, gh, gw]`` patch map."""
    gh, gw = grid
    patches = tokens[:, prefix:]
    if patches.shape[1] != gh * gw:
        raise RuntimeError(
            f"expected {gh}x{gw} = {gh * gw} patch tokens after {prefix} prefix tokens, "
            f"got {patches.shape[1]}"
        )
    return patches.reshape(tokens.shape[0], gh, gw, tokens.shape[-1]).permute(0, 3, 1, 2)


# -- hooks ---------------------------------------------------------------------------------------


class ViTExtractorBase(Extractor):
    """Patch-token maps from chosen blocks of a ViT; subclasses bind a model family.

    Subclasses implement :meth:`read_spec` (from the model's config, without
    loading weights), :meth:`load_model`, :meth:`hook_targets`,
    :meth:`forward`, :meth:`final_norm`, :meth:`normalisation`,
    :meth:`model_identity` and :attr:`model_label`.
    """

    Options: Any = None

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.options.validate()
        self.device = pick_device(self.options.device)
        self.dtype = DTYPES[self.options.dtype]
        self.batch_size = self.options.batch_size
        self._model: nn.Module | None = None
        self._spec: ModelSpec | None = None

    # -- per family ----------------------------------------------------------------------------

    @property
    def model_label(self) -> str:
        return self.options.model

    def read_spec(self) -> ModelSpec:
        raise NotImplementedError

    def load_model(self) -> nn.Module:
        raise NotImplementedError

    def hook_targets(self, model: nn.Module, blocks: list[int], facet: str) -> list[HookTarget]:
        raise NotImplementedError

    def forward(self, model: nn.Module, pixels: torch.Tensor) -> Any:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            spec = self.read_spec()
            check_patch_multiple(self.model_size, spec.patch_size, self.model_label)
            stride = getattr(self.options, "stride", 0)
            if stride and spec.patch_size % stride:
                raise ConfigError(
                    f"[extractor] stride {stride} does not divide the patch size "
                    f"{spec.patch_size} of {self.model_label}"
                )
            self._spec = spec
        return self._spec

    @property
    def stride(self) -> int:
        """The patch embedding's step: the ``stride`` option, or the patch size."""
        return int(getattr(self.options, "stride", 0) or self.spec.patch_size)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            _ = self.spec  # config checks before the (slow) weight loading
            model = self.load_model()
            if getattr(self.options, "compile", False):
                names = {module: name for name, module in model.named_modules()}
                targets = self.hook_targets(model, self.blocks, self.options.facet)
                compile_around(model, [names[t.module] for t in targets])
            self._model = model
        return self._model

    @property
    def model_size(self) -> Size:
        w, h = self.options.image_size
        return (int(w), int(h))

    @property
    def blocks(self) -> list[int]:
        return resolve_blocks(self.options.blocks, self.spec.num_blocks, "[extractor] blocks")

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, columns)`` of patch tokens: ``1 + (side - patch) // stride``."""
        w, h = self.model_size
        p, s = self.spec.patch_size, self.stride
        return (1 + (h - p) // s, 1 + (w - p) // s)

    def layer_names(self) -> list[str]:
        return [layer_name(b, self.options.facet) for b in self.blocks]

    def layers(self) -> list[LayerInfo]:
        spec = self.spec
        channels = spec.width if self.options.facet == "token" else spec.attn_width
        return [LayerInfo(n, channels, float(self.stride)) for n in self.layer_names()]

    def timesteps(self) -> tuple[int, ...]:
        return (0,)

    def transform_for(self, image_size: Size) -> ImageTransform:
        """The image -> model-input transform; with overlapping patches its frame is the
        region the token grid covers evenly: ``columns * stride`` wide, starting
        ``(patch - stride) / 2`` in, so token ``j``'s centre is ``j * stride + patch / 2``."""
        t = fit_transform(image_size, self.model_size, self.options.size_rule)
        p, s = self.spec.patch_size, self.stride
        if s == p:
            return t
        rows, cols = self.grid
        shift = (p - s) / 2
        return ImageTransform(
            t.image_size, (cols * s, rows * s), t.scale, (t.offset[0] - shift, t.offset[1] - shift)
        )

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        return self.preprocessor()(image)

    def preprocessor(self) -> Callable[[ImageInput], torch.Tensor]:
        """:meth:`preprocess` as a picklable function (it runs in DataLoader workers)."""
        mean, std = self.normalisation()
        return functools.partial(
            preprocess_input,
            model_size=self.model_size,
            rule=self.options.size_rule,
            resample=self.options.resample,
            mean=tuple(mean),
            std=tuple(std),
        )

    def extract(self, images: Sequence[ImageInput]) -> list[FeatureSet]:
        """Features of each image, ``batch_size`` images per forward pass."""
        out: list[FeatureSet] = []
        images = list(images)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(im) for im in chunk])
            out.extend(self.extract_preprocessed(chunk, pixels))
        return out

    def extract_preprocessed(
        self, images: Sequence[ImageInput], pixels: torch.Tensor
    ) -> list[FeatureSet]:
        """Features of ``images`` from their preprocessed ``pixels`` ``[B, 3, H, W]`` (CPU or
        device), all in one forward pass."""
        maps = self.features_from_pixels(pixels)
        out = []
        for i, im in enumerate(images):
            layers = {name: maps[name][i : i + 1] for name in maps}
            meta = {"transform": self.transform_for(im.size).to_dict()}
            out.append(FeatureSet(layers, self.timesteps(), meta))
        return out

    def features_from_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer ``[B, C, gh, gw]`` float32 maps for normalised pixels ``[B, 3, H, W]``."""
        model = self.model
        spec = self.spec
        facet = self.options.facet
        targets = self.hook_targets(model, self.blocks, facet)
        x = pixels.to(self.device, self.dtype, non_blocking=True)
        with torch.no_grad():
            with ModuleCapture(targets, stop_early=self.options.stop_early) as cap:
                outs = cap.run(lambda: self.forward(model, x))
            norm = self.final_norm(model) if self.options.final_norm else None
            maps = {}
            for t in targets:
                tokens = outs[t.name]
                if norm is not None:
                    tokens = norm(tokens)
                maps[t.name] = tokens_to_map(tokens, spec.prefix_tokens, self.grid).float()
        return maps
