"""Random-weight models of the real sizes that several benchmarks share, built offline once.

Random weights cost exactly the same FLOPs as the real ones. Each build goes into its own
folder and writes the ``.bench_complete.json`` marker (:mod:`_common`) last: a folder without
it, or with an older recipe version, is rebuilt.

- Stable Diffusion 1.5 (UNet 860M parameters, VAE, CLIP ViT-L/14 text encoder) in diffusers
  layout: ``bench_dift.py``, ``bench_hyperfeatures.py``, ``bench_sd_dino.py``;
- the ViT baselines (DINO ViT-B/8, DINOv2 ViT-B/14, OpenCLIP ViT-H-14): ``bench_baselines.py``,
  and DINOv2 for ``bench_sd_dino.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import OUT, fresh_folder, marker_complete, write_marker

#: where ``bench_dift.py`` builds SD 1.5 by default (shared with the other SD benchmarks)
SD15_DIR = OUT / "sd15-random"
#: Bump when the built SD 1.5 changes, so old folders are rebuilt.
SD15_RECIPE = 1
#: where ``bench_baselines.py`` builds the ViTs by default, one subfolder per baseline
VIT_DIR = OUT / "vit-random"
#: Bump when the built ViTs change, so old folders are rebuilt.
VIT_RECIPE = 1
VIT_BASELINES = ("dino-vitb8", "dinov2-b14", "openclip-vith14")


# -- Stable Diffusion 1.5 --------------------------------------------------------------------------


def sd15_unet_config() -> dict[str, Any]:
    """``unet/config.json`` of Stable Diffusion 1.5."""
    from diffeat.testing.sd import sd_unet_config

    return sd_unet_config(
        block_out_channels=(320, 640, 1280, 1280),
        norm_num_groups=32,
        cross_attention_dim=768,
        attention_head_dim=8,
        use_linear_projection=False,
        sample_size=64,
    )


def sd_vae_config() -> dict[str, Any]:
    """``vae/config.json`` of Stable Diffusion 1.x / 2.x."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def sd15_text_config(bos: int, eos: int, pad: int) -> dict[str, Any]:
    """``text_encoder/config.json`` of Stable Diffusion 1.5 (OpenAI CLIP ViT-L/14 text tower)."""
    return {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def sd15_is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished SD 1.5 build of the current recipe."""
    return marker_complete(folder, SD15_RECIPE)


def build_sd15_random(folder: Path, seed: int = 0) -> float:
    """Build SD 1.5 with random weights into ``folder`` (offline); return the seconds it took."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffeat.testing.sd import (
        EOS_TOKEN,
        save_stable_diffusion,
        tiny_scheduler_config,
        write_clip_tokenizer,
    )

    start = time.perf_counter()
    fresh_folder(folder)  # half-built (no marker) or an older recipe
    tokenizer = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(folder / "tokenizer", pad_token=EOS_TOKEN)
    )
    text_config = CLIPTextConfig(
        **sd15_text_config(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**sd15_unet_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**sd_vae_config())
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(**tiny_scheduler_config("epsilon"))  # SD's DDIM config
    save_stable_diffusion(folder, unet, vae, text_encoder, tokenizer, scheduler)
    params = {
        n: sum(p.numel() for p in m.parameters())
        for n, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    seconds = time.perf_counter() - start
    write_marker(
        folder,
        SD15_RECIPE,
        seed=seed,
        parameters=params,
        build_s=seconds,
        vocab_size_tokenizer=len(tokenizer),
    )
    return seconds


# -- the ViT baselines ---------------------------------------------------------------------------


def dino_vitb8_config() -> dict[str, Any]:
    """``config.json`` of facebook/dino-vitb8 (ViT-B/8)."""
    return {
        "image_size": 224,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
    }


def dinov2_base_config() -> dict[str, Any]:
    """``config.json`` of facebook/dinov2-base (ViT-B/14, 518 px position grid)."""
    return {
        "image_size": 518,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "mlp_ratio": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "qkv_bias": True,
    }


def vit_is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished ViT build of the current recipe."""
    return marker_complete(folder, VIT_RECIPE)


def build_vit(name: str, folder: Path) -> str:
    """Build baseline ``name``'s architecture (one of :data:`VIT_BASELINES`) with random
    weights into ``folder`` (once); return the extractor's ``model`` value."""
    import torch

    if vit_is_complete(folder):
        return str(folder)
    start = time.perf_counter()
    fresh_folder(folder)
    torch.manual_seed(0)
    if name == "dino-vitb8":
        from transformers import ViTConfig, ViTModel

        model: Any = ViTModel(ViTConfig(**dino_vitb8_config()), add_pooling_layer=False)
        model.save_pretrained(folder, safe_serialization=True)
    elif name == "dinov2-b14":
        from transformers import Dinov2Config, Dinov2Model

        model = Dinov2Model(Dinov2Config(**dinov2_base_config()))
        model.save_pretrained(folder, safe_serialization=True)
    elif name == "openclip-vith14":
        import open_clip
        from safetensors.torch import save_file

        cfg = open_clip.get_model_config("ViT-H-14")
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        local = {
            "model_cfg": cfg,
            "preprocess_cfg": {
                "mean": list(open_clip.OPENAI_DATASET_MEAN),
                "std": list(open_clip.OPENAI_DATASET_STD),
            },
        }
        (folder / "open_clip_config.json").write_text(json.dumps(local, indent=2) + "\n")
    else:
        raise ValueError(name)
    params = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - start
    write_marker(folder, VIT_RECIPE, parameters=params, build_s=seconds)
    print(f"[{name}] built {params / 1e6:.0f}M parameters in {seconds:.0f} s", file=sys.stderr)
    return str(folder)


def hedlin_model(model: str, sd_dir: str | Path) -> Path:
    """The model folder of the Hedlin benchmarks: ``tiny`` (the test model, built once in
    ``out/hedlin-tiny-sd``), ``sd15`` (random weights of SD 1.5's size in ``sd_dir``, built
    once) or a diffusers folder with ``unet/``."""
    if model == "tiny":
        from diffeat.testing import build_tiny_stable_diffusion

        folder = OUT / "hedlin-tiny-sd"
        if not (folder / "model_index.json").exists():
            build_tiny_stable_diffusion(folder)
        return folder
    if model == "sd15":
        folder = Path(sd_dir)
        if not sd15_is_complete(folder):
            print(f"building SD 1.5 with random weights in {folder} ...", flush=True)
            build_sd15_random(folder)
        return folder
    folder = Path(model)
    if not (folder / "unet").is_dir():
        raise SystemExit(f"--model {model}: not tiny, sd15 or a diffusers folder with unet/")
    return folder
