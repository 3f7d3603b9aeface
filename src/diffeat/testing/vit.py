"""Offline builders for tiny random-weight ViTs: DINO, DINOv2 and an OpenCLIP model.

Nothing is downloaded. The DINO and DINOv2 folders are what ``save_pretrained``
writes (``config.json``, ``model.safetensors``, plus a ``preprocessor_config.json``
with ImageNet statistics, as the hub repositories have) and load with the real
``from_pretrained``. The OpenCLIP model is a JSON model config (the format of
open_clip's ``model_configs/``, registered with ``open_clip.add_model_config``)
and a safetensors checkpoint, loadable with
``open_clip.create_model(name, pretrained=<file>)``; the same folder is also an
open_clip ``local-dir:`` folder (``open_clip_config.json`` +
``open_clip_model.safetensors``).

The block structure is the real one (same module names, CLS and register
tokens, fused or separate q/k/v); only widths and depths are tiny.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_OPENCLIP_NAME",
    "build_tiny_dino",
    "build_tiny_dinov2",
    "build_tiny_openclip",
    "tiny_dino_config",
    "tiny_dinov2_config",
    "tiny_openclip_config",
]

_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
#: Stem of the tiny OpenCLIP model config file, i.e. its open_clip model name.
TINY_OPENCLIP_NAME = "diffeat-tiny-vit-b-8"


def _write_preprocessor(path: Path, size: int, processor: str) -> None:
    cfg = {
        "image_processor_type": processor,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        **_IMAGENET,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def tiny_dino_config(patch_size: int = 8) -> dict[str, Any]:
    """A DINO ViT config (``model_type`` vit) with 3 blocks of width 16 (2 heads), 32 px input."""
    return {
        "image_size": 4 * patch_size,
        "patch_size": patch_size,
        "num_channels": 3,
        "hidden_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
    }


def build_tiny_dino(path: str | Path, patch_size: int = 8, *, seed: int = 0) -> Path:
    """Write a tiny random DINO ``ViTModel`` (no pooler) into ``path``; return the folder."""
    from transformers import ViTConfig, ViTModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**tiny_dino_config(patch_size)), add_pooling_layer=False)
    _randomise(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    _write_preprocessor(path, 4 * patch_size, "ViTImageProcessor")
    return path


def tiny_dinov2_config(registers: bool = False) -> dict[str, Any]:
    """A DINOv2 config: patch 14, 3 blocks of width 16, 56 px (4 x 4) position grid."""
    cfg: dict[str, Any] = {
        "image_size": 56,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "mlp_ratio": 2,
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": True,
    }
    if registers:
        cfg["num_register_tokens"] = 4
    return cfg


def build_tiny_dinov2(path: str | Path, registers: bool = False, *, seed: int = 0) -> Path:
    """Write a tiny random ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if registers:
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        model: Any = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tiny_dinov2_config(True)))
    else:
        from transformers import Dinov2Config, Dinov2Model

        model = Dinov2Model(Dinov2Config(**tiny_dinov2_config(False)))
    _randomise(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    _write_preprocessor(path, 56, "BitImageProcessor")
    return path


def tiny_openclip_config() -> dict[str, Any]:
    """An open_clip model config: ViT with patch 8, 32 px, 3 blocks of width 32 (2 heads)."""
    return {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 3,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }


def build_tiny_openclip(path: str | Path, *, seed: int = 0) -> tuple[str, str]:
    """Write a tiny random OpenCLIP model into ``path``.

    Returns ``(model_config_file, checkpoint_file)``: the extractor's ``model``
    and ``pretrained`` options (``open_clip.create_model(name,
    pretrained=checkpoint)`` after ``open_clip.add_model_config(model_config_file)``).
    The folder itself also works as ``model`` (``open_clip_config.json``).
    """
    import open_clip
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_openclip_config()
    config_file = path / f"{TINY_OPENCLIP_NAME}.json"
    config_file.write_text(json.dumps(cfg, indent=2) + "\n")
    open_clip.add_model_config(config_file)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPENCLIP_NAME, pretrained=None)
    _randomise(model, seed)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    checkpoint = path / "open_clip_model.safetensors"
    save_file(state, str(checkpoint))
    local = {
        "model_cfg": cfg,
        "preprocess_cfg": {
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
        },
    }
    (path / "open_clip_config.json").write_text(json.dumps(local, indent=2) + "\n")
    return str(config_file), str(checkpoint)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a seeded random value (init schemes leave zeros and ones around,
    which would hide bugs such as a missing bias or a skipped LayerNorm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.2
            is_scale = p.ndim == 1 and name.endswith("weight")  # LayerNorm gains around 1
            p.copy_(noise + 1.0 if is_scale else noise)
