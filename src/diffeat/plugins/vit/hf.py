"""ViTs in transformers format (``dino``: ``ViTModel``; ``dinov2``: ``Dinov2Model`` and
``Dinov2WithRegistersModel``): model resolution, fingerprint, hooks.

Module paths differ between transformers versions (4.x: ``encoder.layer.<i>``
with ``attention.attention.query``; 5.x: ``layers.<i>`` or ``encoder.layer.<i>``
with ``attention.q_proj``), so blocks and projections are looked up among the
known names rather than hard-coded.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffeat.core.errors import ConfigError, ModelLoadError
from diffeat.plugins.modelfiles import (
    files_fingerprint,
    hub_snapshot,
    is_hub_id,
    quiet_transformers,
)
from diffeat.plugins.module_capture import HookTarget, first_tensor
from diffeat.plugins.vit.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    ViTExtractorBase,
    layer_name,
)

_CONFIGS = ["config.json", "preprocessor_config.json"]
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
# transformers reads these with torch.load(weights_only=True); only used when a hub repo has
# no safetensors
_PICKLES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
_WEIGHT_GLOBS = ["*.safetensors", "pytorch_model*.bin"]

_BLOCK_LISTS = ("layers", "encoder.layer", "encoder.layers")
_PROJECTIONS = {
    "query": ("attention.q_proj", "attention.attention.query", "attention.query"),
    "key": ("attention.k_proj", "attention.attention.key", "attention.key"),
    "value": ("attention.v_proj", "attention.attention.value", "attention.value"),
}


def official_position_interpolation(patch: int, stride: int = 0) -> Callable[..., torch.Tensor]:
    """An ``interpolate_pos_encoding`` method computing as the DINO / DINOv2 repositories.

    Bicubic (no antialias) with ``scale_factor = (n + 0.1) / N`` per axis
    (rows, columns), in float32, where transformers resizes to ``size = n``: the
    0.1 changes where the output samples fall. With a ``stride`` below the patch
    size, ``n = 1 + (side - patch) // stride`` (Amir et al.'s ``_fix_pos_enc``).
    """
    step = stride or patch

    def interpolate_pos_encoding(
        self: nn.Module, embeddings: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        pos = self.position_embeddings
        n, trained = embeddings.shape[1] - 1, pos.shape[1] - 1
        if n == trained and height == width:
            return pos
        side, dim = int(math.sqrt(trained)), pos.shape[-1]
        rows, cols = 1 + (height - patch) // step, 1 + (width - patch) // step
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(
            grid,
            scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
            mode="bicubic",
            align_corners=False,
        )
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([pos[:, :1], grid], dim=1)

    return interpolate_pos_encoding


def _submodule(root: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for name in names:
        try:
            return root.get_submodule(name)
        except AttributeError:
            continue
    raise ModelLoadError(
        f"cannot find the {what} in {type(root).__name__} (looked for {', '.join(names)}); "
        f"this transformers version names its modules differently"
    )


class TransformersViTExtractor(ViTExtractorBase):
    """Shared by ``dino`` and ``dinov2``: subclasses set ``model_types`` and :meth:`model_class`."""

    #: accepted ``config.json`` model types
    model_types: ClassVar[tuple[str, ...]] = ()
    #: model type -> the extractor that serves it, for error messages
    other_plugins: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._folder: Path | None = None
        self._config: dict[str, Any] | None = None

    # -- files -------------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        if self._folder is None:
            model = self.options.model
            path = Path(model).expanduser()
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise ModelLoadError(
                        f"{path} is not a transformers model folder (no config.json); expected "
                        f"config.json and model.safetensors as written by save_pretrained"
                    )
                self._folder = path
            elif is_hub_id(model):
                self._folder = hub_snapshot(
                    model,
                    self.options.revision,
                    [_CONFIGS + _SAFETENSORS, _CONFIGS + _PICKLES],
                    _WEIGHT_GLOBS,
                )
            else:
                raise ModelLoadError(
                    f"model {model!r} is neither a folder nor a hub id of the form 'owner/name'"
                )
        return self._folder

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            try:
                self._config = json.loads((self.folder / "config.json").read_text())
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read {self.folder / 'config.json'}: {exc}") from None
            kind = self._config.get("model_type")
            if kind not in self.model_types:
                other = self.other_plugins.get(kind)
                hint = f"; use the {other!r} extractor for it" if other else ""
                raise ModelLoadError(
                    f"{self.options.model} is a {kind!r} model; this extractor takes "
                    f"{', '.join(repr(k) for k in self.model_types)} models{hint}"
                )
        return self._config

    def weight_files(self) -> list[Path]:
        """The files from_pretrained reads: safetensors when present, else PyTorch pickles."""
        safe = sorted(self.folder.glob("*.safetensors"))
        files = safe or sorted(self.folder.glob("pytorch_model*.bin"))
        if not files:
            raise ModelLoadError(
                f"{self.folder} has no weights (model.safetensors or pytorch_model.bin)"
            )
        return files

    def model_identity(self) -> dict[str, Any]:
        extra = [self.folder / n for n in _CONFIGS if (self.folder / n).is_file()]
        return {
            "model": self.options.model,
            "revision": self.options.revision,
            "model_type": self.config["model_type"],
            "fingerprint": files_fingerprint(self.weight_files() + extra, self.folder),
        }

    # -- spec and loading ----------------------------------------------------------------------

    def read_spec(self) -> ModelSpec:
        c = self.config
        patch = c.get("patch_size", 16)
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ModelLoadError(f"non-square patches {patch} are not supported")
            patch = patch[0]
        heads = int(c.get("num_attention_heads", 12))
        width = int(c.get("hidden_size", 768))
        head_dim = int(c.get("head_dim") or width // heads)
        return ModelSpec(
            patch_size=int(patch),
            num_blocks=int(c.get("num_hidden_layers", 12)),
            width=width,
            attn_width=heads * head_dim,
            prefix_tokens=1 + int(c.get("num_register_tokens") or 0),
        )

    def model_class(self) -> tuple[Any, dict[str, Any]]:
        """The transformers class for this config and extra from_pretrained kwargs."""
        raise NotImplementedError

    def load_model(self) -> nn.Module:
        quiet_transformers()
        cls, kwargs = self.model_class()
        try:
            model = cls.from_pretrained(self.folder, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load {self.options.model} ({self.folder}): {type(exc).__name__}: {exc}"
            ) from None
        embeddings = _submodule(model, ("embeddings",), "embeddings")
        if self.stride != self.spec.patch_size:
            if self.options.position_interpolation != "official":
                raise ConfigError(
                    f"[extractor] stride {self.stride} needs position_interpolation = "
                    f'"official" (transformers sizes its position grid by the patch size)'
                )
            projection = _submodule(embeddings, ("patch_embeddings.projection",), "patch conv")
            projection.stride = (self.stride, self.stride)  # type: ignore[assignment]
        if self.options.position_interpolation == "official":
            method = official_position_interpolation(self.spec.patch_size, self.stride)
            embeddings.interpolate_pos_encoding = types.MethodType(method, embeddings)  # type: ignore[method-assign]
        return model.to(self.device, self.dtype).eval().requires_grad_(False)

    def normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        """``image_mean``/``image_std`` of the folder's preprocessor_config.json, else ImageNet's."""
        path = self.folder / "preprocessor_config.json"
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
                mean, std = cfg.get("image_mean"), cfg.get("image_std")
                if mean and std and len(mean) == 3 and len(std) == 3:
                    return tuple(map(float, mean)), tuple(map(float, std))
            except (OSError, ValueError):
                pass
        return IMAGENET_MEAN, IMAGENET_STD

    # -- hooks -----------------------------------------------------------------------------------

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        blocks = _submodule(model, _BLOCK_LISTS, "list of transformer blocks")
        if len(blocks) != self.spec.num_blocks:
            raise ModelLoadError(
                f"{type(model).__name__} has {len(blocks)} blocks, its config says "
                f"{self.spec.num_blocks}"
            )
        return blocks  # type: ignore[return-value]

    def hook_targets(self, model: nn.Module, blocks: list[int], facet: str) -> list[HookTarget]:
        block_list = self.block_list(model)
        targets = []
        for b in blocks:
            block = block_list[b]
            module = (
                block
                if facet == "token"
                else _submodule(block, _PROJECTIONS[facet], f"{facet} projection of block {b}")
            )
            targets.append(HookTarget(layer_name(b, facet), module, "output", first_tensor))
        return targets

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _submodule(model, ("layernorm",), "final LayerNorm")

    def forward(self, model: nn.Module, pixels: torch.Tensor) -> Any:
        return model(pixel_values=pixels)
