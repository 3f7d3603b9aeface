"""Offline builders for tiny random-weight Stable Diffusion pipelines.

Everything here is constructed from configs in code: nothing is downloaded from the model hub.
The resulting folders are in the ordinary diffusers layout (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) and load with
``StableDiffusionPipeline.from_pretrained`` or component by component, so tests can run the
same code paths as with a real checkpoint, only with tiny channels.

The UNet keeps the exact block structure of SD 1.5 / 2.1 (three ``CrossAttnDownBlock2D`` and a
``DownBlock2D``, a ``UNetMidBlock2DCrossAttn``, an ``UpBlock2D`` and three ``CrossAttnUpBlock2D``,
``layers_per_block=2``), so code that hooks e.g. ``unet.up_blocks[i].resnets[j].conv2`` sees the
same module names and the same spatial resolutions as in real SD; only the channel counts differ
(``TINY_UNET_BLOCK_OUT_CHANNELS`` is SD's ``(320, 640, 1280, 1280)`` divided by 40).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "TINY_TEXT_HIDDEN_SIZE",
    "TINY_UNET_BLOCK_OUT_CHANNELS",
    "TINY_VAE_BLOCK_OUT_CHANNELS",
    "build_tiny_captioner",
    "build_tiny_stable_diffusion",
    "clip_bpe_path",
    "tiny_scheduler_config",
    "tiny_text_encoder_config",
    "tiny_unet_config",
    "tiny_vae_config",
    "write_clip_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: Pad token of SD 2.x tokenizers (SD 1.x pads with ``EOS_TOKEN``).
SD2_PAD_TOKEN = "!"
#: Number of BPE merges in the real CLIP vocabulary (49408 = 2 * 256 + 48894 + 2).
_CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_MODEL_MAX_LENGTH = 77

#: SD's UNet ``(320, 640, 1280, 1280)`` divided by 40.
TINY_UNET_BLOCK_OUT_CHANNELS: tuple[int, ...] = (8, 16, 32, 32)
#: Divides every UNet channel count, including the concatenated skip inputs of the up blocks
#: (SD: 32 groups of 10 channels at the first level; here 4 groups of 2).
TINY_UNET_NORM_NUM_GROUPS = 4
#: SD 1.x uses 8 heads everywhere; tiny SD 1.x uses 2 (head dims 4, 8, 16, 16).
TINY_UNET_SD1_HEADS = 2
#: SD 2.x uses a constant head dim of 64 (``attention_head_dim=[5, 10, 20, 20]``, which diffusers
#: reads as numbers of heads); tiny SD 2.x uses a constant head dim of 8.
TINY_UNET_SD2_HEADS: tuple[int, ...] = (1, 2, 4, 4)
#: Tiny version of SD's VAE ``(128, 256, 512, 512)``; 4 blocks -> 3 downsamplings (factor 8).
TINY_VAE_BLOCK_OUT_CHANNELS: tuple[int, ...] = (8, 16, 16, 16)
TINY_VAE_NORM_NUM_GROUPS = 4
TINY_TEXT_HIDDEN_SIZE = 32

#: Words whose letters get merged into single tokens by the tiny fallback vocabulary.
_TINY_WORDS = (
    "a", "an", "the", "of", "and", "in", "on", "with", "photo", "picture", "image", "cat",
    "cats", "dog", "dogs", "bird", "car", "horse", "person", "face", "sitting", "standing",
    "red", "blue", "green", "white", "black",
)  # fmt: skip


def clip_bpe_path() -> Path | None:
    """Return the path of the BPE merges file that ``open_clip`` ships, or None if unavailable.

    The package is located without importing it (``open_clip`` imports torch and more).
    """
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """Read the merges exactly as open_clip's ``SimpleTokenizer`` does."""
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    lines = lines[1 : _CLIP_NUM_MERGES + 1]
    return [(a, b) for a, b in (line.split() for line in lines)]


def _tiny_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that turn each of ``words`` into one ``word</w>`` token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
    return merges


def _vocab_and_merges(
    vocabulary: Literal["auto", "clip", "tiny"],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build the CLIP-style vocabulary (token -> id) and the ordered list of merges."""
    bpe_path = clip_bpe_path() if vocabulary in ("auto", "clip") else None
    if vocabulary == "clip" and bpe_path is None:
        raise RuntimeError(
            "vocabulary='clip' needs open_clip's bpe_simple_vocab_16e6.txt.gz "
            "(pip install open_clip_torch); use vocabulary='tiny' instead"
        )
    merges = _clip_merges(bpe_path) if bpe_path is not None else _tiny_merges(_TINY_WORDS)
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise AssertionError("duplicate tokens in the generated CLIP vocabulary")
    return vocab, merges


def _write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    text = json.dumps(obj, indent=indent, sort_keys=indent is not None, ensure_ascii=False)
    path.write_text(text + "\n", "utf-8")


def write_clip_tokenizer(
    path: str | Path,
    *,
    pad_token: str = EOS_TOKEN,
    vocabulary: Literal["auto", "clip", "tiny"] = "auto",
    model_max_length: int = _CLIP_MODEL_MAX_LENGTH,
) -> Path:
    """Write a working CLIP BPE tokenizer into ``path`` without touching the network.

    The folder holds ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` in the layout of the SD checkpoints on the hub, and loads with
    ``transformers.CLIPTokenizer.from_pretrained(path)`` (in transformers 5 ``CLIPTokenizerFast``
    is an alias of the same class; in transformers 4 both the slow and fast classes read these
    files).

    Args:
        path: Target folder; created if needed.
        pad_token: ``"<|endoftext|>"`` like SD 1.x (default) or ``"!"`` like SD 2.x.
        vocabulary: ``"clip"``: the real 49408-token CLIP vocabulary, rebuilt from the BPE file that
            ``open_clip`` ships exactly as open_clip's ``SimpleTokenizer`` builds it (prompts then
            tokenise as in real SD). ``"tiny"``: 256 byte symbols, the same with ``</w>``, merges
            for a few common caption words, and the two special tokens. ``"auto"``: ``"clip"`` if
            open_clip is installed, else ``"tiny"``.
        model_max_length: Maximum sequence length (77 like CLIP).

    Returns:
        The folder, as a ``Path``.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges(vocabulary)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary")
    _write_json(out / "vocab.json", vocab, indent=None)  # one line, in id order, like the hub's
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, "utf-8")
    special_tokens = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": pad_token,
        "unk_token": EOS_TOKEN,
    }
    _write_json(out / "special_tokens_map.json", special_tokens)
    _write_json(
        out / "tokenizer_config.json",
        {
            **special_tokens,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": model_max_length,
            "tokenizer_class": "CLIPTokenizer",
        },
    )
    return out


def sd_unet_config(
    *,
    block_out_channels: Sequence[int],
    norm_num_groups: int,
    cross_attention_dim: int,
    attention_head_dim: int | Sequence[int],
    use_linear_projection: bool,
    sample_size: int,
) -> dict[str, Any]:
    """UNet2DConditionModel config with SD 1.x / 2.x's block structure and the given widths."""
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": norm_num_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": attention_head_dim,
        "use_linear_projection": use_linear_projection,
        "upcast_attention": False,
    }


def tiny_unet_config(
    *,
    sample_size: int = 32,
    cross_attention_dim: int = TINY_TEXT_HIDDEN_SIZE,
    sd2_style: bool = False,
) -> dict[str, Any]:
    """UNet2DConditionModel config with SD 1.5 / 2.1's block structure and tiny channels."""
    return sd_unet_config(
        block_out_channels=TINY_UNET_BLOCK_OUT_CHANNELS,
        norm_num_groups=TINY_UNET_NORM_NUM_GROUPS,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=list(TINY_UNET_SD2_HEADS) if sd2_style else TINY_UNET_SD1_HEADS,
        use_linear_projection=sd2_style,
        sample_size=sample_size,
    )


def tiny_vae_config(*, sample_size: int = 32) -> dict[str, Any]:
    """AutoencoderKL config like SD's (4 latent channels, factor 8) with tiny channels.

    ``sample_size`` is the latent size; the VAE's ``sample_size`` is the image size (x8).
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": TINY_VAE_BLOCK_OUT_CHANNELS,
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": TINY_VAE_NORM_NUM_GROUPS,
        "sample_size": sample_size * 8,
        "scaling_factor": 0.18215,
    }


def tiny_text_encoder_config(
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    hidden_size: int = TINY_TEXT_HIDDEN_SIZE,
    sd2_style: bool = False,
) -> dict[str, Any]:
    """CLIPTextConfig kwargs for a tiny text encoder (2 layers, 2 heads)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": _CLIP_MODEL_MAX_LENGTH,
        "projection_dim": hidden_size,
        # SD 1.x's OpenAI CLIP uses quick_gelu, SD 2.x's OpenCLIP ViT-H uses gelu.
        "hidden_act": "gelu" if sd2_style else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """The DDIM scheduler config Stable Diffusion uses."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
        "timestep_spacing": "leading",
    }


def _check_divisible(channels: Sequence[int], groups: int, what: str) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise AssertionError(f"{what}: norm_num_groups={groups} does not divide {bad}")


def build_tiny_stable_diffusion(
    path: str | Path,
    *,
    prediction_type: str = "epsilon",
    sample_size: int = 32,
    seed: int = 0,
    cross_attention_dim: int = TINY_TEXT_HIDDEN_SIZE,
    sd2_style: bool = False,
    vocabulary: Literal["auto", "clip", "tiny"] = "auto",
) -> Path:
    """Build a tiny random-weight Stable Diffusion pipeline in diffusers format into ``path``.

    The folder loads with ``StableDiffusionPipeline.from_pretrained(path)`` and by component
    (``UNet2DConditionModel``/``AutoencoderKL``/``CLIPTextModel``/``CLIPTokenizer``/
    ``DDIMScheduler`` with ``subfolder=...``). Weights are saved as safetensors in float32.

    Args:
        path: Target folder; created if needed.
        prediction_type: ``"epsilon"`` (SD 1.x, SD 2.1-base) or ``"v_prediction"`` (SD 2.x 768).
        sample_size: Latent size; the UNet's ``sample_size``. The pipeline's default image is
            ``sample_size * 8`` pixels square.
        seed: Weight seed. The same seed gives byte-identical safetensors files. The caller's
            global torch RNG state is left untouched.
        cross_attention_dim: UNet cross-attention dim, equal to the text encoder's hidden size.
        sd2_style: Mirror SD 2.x: per-block ``attention_head_dim`` list with
            ``use_linear_projection=True``, ``"!"`` as pad token and a gelu text encoder.
        vocabulary: Tokenizer vocabulary, see :func:`write_clip_tokenizer`. With the real CLIP
            vocabulary (49408 tokens) the text encoder's embedding table is most of the folder
            (6.4 of about 10.5 MB); ``"tiny"`` gives a folder of about 4 MB.

    Returns:
        The folder, as a ``Path``.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if cross_attention_dim % 2:
        raise ValueError("cross_attention_dim must be even (the text encoder has 2 heads)")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_dir = write_clip_tokenizer(
        out / "tokenizer",
        pad_token=SD2_PAD_TOKEN if sd2_style else EOS_TOKEN,
        vocabulary=vocabulary,
    )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    unet_config = tiny_unet_config(
        sample_size=sample_size, cross_attention_dim=cross_attention_dim, sd2_style=sd2_style
    )
    channels = list(TINY_UNET_BLOCK_OUT_CHANNELS)
    skip_sums = [a + b for a in channels for b in channels]
    _check_divisible(channels + skip_sums, TINY_UNET_NORM_NUM_GROUPS, "unet")
    _check_divisible(TINY_VAE_BLOCK_OUT_CHANNELS, TINY_VAE_NORM_NUM_GROUPS, "vae")

    text_config = CLIPTextConfig(
        **tiny_text_encoder_config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=cross_attention_dim,
            sd2_style=sd2_style,
        )
    )

    with torch.random.fork_rng(devices=[]):
        # Separate, fixed sub-seeds so each component's weights depend only on `seed`.
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**tiny_vae_config(sample_size=sample_size))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config)

    unet.eval()
    vae.eval()
    text_encoder.eval()
    scheduler = DDIMScheduler(**tiny_scheduler_config(prediction_type))

    save_stable_diffusion(out, unet, vae, text_encoder, tokenizer, scheduler)
    return out


def save_stable_diffusion(
    folder: Path, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any
) -> None:
    """Save components as a diffusers Stable Diffusion folder (safetensors, no safety checker).

    The tokenizer folder must already be written (by :func:`write_clip_tokenizer`, the
    vocab.json/merges.txt layout of the hub checkpoints). ``model_index.json`` is written as
    ``StableDiffusionPipeline.save_config`` writes it; importing that pipeline class only to
    write a JSON file costs seconds and prints transformers' torchvision warnings.
    """
    import diffusers
    from transformers.utils import logging as transformers_logging

    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Writing model shards" bar for one file
    try:
        for name, component in components.items():
            component.save_pretrained(folder / name, safe_serialization=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    components["tokenizer"] = tokenizer
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False,
    }
    for name in ("feature_extractor", "image_encoder", "safety_checker"):
        index[name] = [None, None]
    for name, component in components.items():
        library = type(component).__module__.split(".")[0]
        index[name] = [library, type(component).__name__]
    (folder / "model_index.json").write_text(
        json.dumps(dict(sorted(index.items())), indent=2) + "\n"
    )


def build_tiny_captioner(
    path: str | Path,
    *,
    clip_dim: int,
    prompt_width: int = TINY_TEXT_HIDDEN_SIZE,
    time_dim: int = TINY_UNET_BLOCK_OUT_CHANNELS[0] * 4,
    time_slots: int = 1,
    odise_prefix: bool = True,
    seed: int = 0,
) -> Path:
    """Write random implicit-captioner weights in ODISE's layout (a safetensors file).

    The tensors have ODISE's names (``clip_project.*``, ``alpha_cond``,
    ``time_embed_project.*``, ``alpha_cond_time_embed``), under its
    ``backbone.feature_extractor.`` prefix when ``odise_prefix``, shaped for the
    tiny Stable Diffusion model (77 x ``prompt_width`` prompt states, a UNet
    time embedding of ``time_dim``) and a CLIP tower embedding ``clip_dim``.
    The gates (``alpha_*``) are random, not ODISE's initial zeros, so the
    conditioning visibly changes the features.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * scale

    length = _CLIP_MODEL_MAX_LENGTH
    tensors = {
        "clip_project.linear.weight": rand(prompt_width, clip_dim),
        "clip_project.linear.bias": rand(prompt_width),
        "clip_project.positional_embedding": rand(1, length, prompt_width, scale=0.02),
        "alpha_cond": rand(1, length, prompt_width),
        "time_embed_project.linear.weight": rand(time_dim, clip_dim),
        "time_embed_project.linear.bias": rand(time_dim),
        "time_embed_project.positional_embedding": rand(1, time_slots, time_dim, scale=0.02),
        "alpha_cond_time_embed": rand(time_dim),
    }
    prefix = "backbone.feature_extractor." if odise_prefix else ""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(out))
    return out
