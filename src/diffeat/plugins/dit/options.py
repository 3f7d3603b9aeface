"""Options of the ``diffusion-transformer`` extractor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffeat.core.options import opt

#: the placeholder of a prompt template that each image's category fills in
CATEGORY = "{category}"
#: pixels per token: the VAE's factor 8 times the transformer's 2x2 patches
PATCH_PIXELS = 16


@dataclass
class DiffusionTransformerOptions:
    """Options of the ``diffusion-transformer`` extractor (defaults: FLUX.1-dev, DiTF's block,
    timestep, size and ensemble, with the scheduler's timestep shift and no normalisation;
    ``examples/ditf-flux.toml`` is DiTF's exact setting)."""

    model: str = opt(
        "black-forest-labs/FLUX.1-dev",
        "hub id or local diffusers folder of an SD3/SD3.5, FLUX or PixArt pipeline "
        "(the family is read from its model_index.json)",
    )
    revision: str = opt("", "hub revision (branch, tag or commit); empty: the default branch")
    layers: list[str] = opt(
        ["single_transformer_blocks.8"],
        "transformer blocks whose image-token outputs are captured, by module name or glob: "
        "transformer_blocks.N (SD3, PixArt, FLUX double-stream), single_transformer_blocks.N "
        "(FLUX single-stream). DiTF's FLUX block k (the input of block k, counted from 0) is the output "
        "of single_transformer_blocks.(k-20) for k >= 20, of transformer_blocks.18 for k = 19",
    )
    timesteps: list[int] = opt(
        [260], "timesteps in [0, 1000): one transformer pass each (flow models: sigma = t/1000)"
    )
    timestep_shift: Literal["scheduler", "none"] = opt(
        "scheduler",
        "flow-matching models: scheduler: sigma = t/1000 shifted as the scheduler config says "
        "(SD3's shift; FLUX's resolution-dependent dynamic shift); none: sigma = t/1000 (DiTF)",
    )
    ensemble_size: int = opt(8, "noisy copies per image; their feature maps are averaged")
    image_size: list[int] = opt([640, 640], "model input [width, height], multiples of 16")
    size_rule: Literal["resize", "pad", "longest"] = opt(
        "resize",
        "resize: squash to image_size; pad: fit inside keeping the aspect ratio, centred on "
        "black; longest: keep the aspect ratio, the longer side max(image_size), each side "
        "rounded to a multiple of 16 (DiTF's preprocessing; inputs then differ in size)",
    )
    resample: Literal["bicubic", "bilinear", "lanczos", "nearest"] = opt(
        "bicubic", "PIL resize filter"
    )
    prompt: str = opt(
        "",
        "text prompt through the model's own text encoders (empty: the null prompt); "
        "{category} is replaced by each image's category",
    )
    guidance: float = opt(
        3.5, "FLUX guidance-distilled models (FLUX.1-dev): the guidance embedding's value"
    )
    t5: bool = opt(
        True,
        "SD3/SD3.5: load the T5 encoder (text_encoder_3); false: zeros in its place, as "
        "StableDiffusion3Pipeline(text_encoder_3=None). FLUX and PixArt always need T5",
        cache="if-set",
    )
    max_sequence_length: int = opt(
        0,
        "T5 tokens; 0: the pipeline's default (FLUX 512, SD3 256, PixArt-alpha 120, -Sigma 300)",
        cache="if-set",
    )
    massive_activations: Literal["none", "ditf"] = opt(
        "none",
        "none: raw block outputs; ditf: DiTF's normalisation (after the ensemble mean): zero "
        "massive_channels, LayerNorm over channels (no affine, eps 1e-6), then the AdaLN "
        "modulation (1 + scale) * x + shift of the block that reads this output",
    )
    massive_channels: list[int] = opt(
        [],
        "ditf: channels carrying massive activations, zeroed before the LayerNorm (FLUX.1-dev: "
        "[154, 1446]); empty: the AdaLN step only",
    )
    latent: Literal["sample", "mean"] = opt(
        "sample", "VAE latent: a posterior sample per copy (DiTF) or the posterior mean"
    )
    seed: int = opt(0, "seed of the posterior and timestep noise (per image, from its content)")
    dtype: Literal["float32", "float16", "bfloat16"] = opt(
        "float32", "transformer and text-encoder dtype (the VAE encoder runs in float32)"
    )
    device: str = opt("auto", "torch device; auto: cuda if available, else cpu", cache=False)
    offload_text_encoders: bool = opt(
        False,
        "keep the text encoders on the CPU, moving them to the device only to encode a new "
        "prompt (each prompt is encoded once)",
        cache=False,
    )
    batch_size: int = opt(1, "images per pass (each with ensemble_size copies)", cache=False)
    ensemble_batch: int = opt(
        0,
        "noisy latents per transformer forward (ensemble copies, of all images of a batch "
        "together); 0: all in one forward. Smaller uses less memory and, on a CPU, lets the "
        "progress bar count copies; results equal up to float rounding",
        cache=False,
    )
    stop_early: bool = opt(
        True, "stop the transformer after the deepest requested block", cache=False
    )

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: give at least one transformer block")
        if not self.timesteps:
            raise ValueError("timesteps: give at least one timestep")
        bad = [t for t in self.timesteps if not 0 <= t < 1000]
        if bad:
            raise ValueError(f"timesteps must lie in [0, 1000), got {bad}")
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ensemble_batch < 0:
            raise ValueError(
                f"ensemble_batch must be >= 0 (0: one forward), got {self.ensemble_batch}"
            )
        if len(self.image_size) != 2 or any(v < 16 or v % PATCH_PIXELS for v in self.image_size):
            raise ValueError(
                f"image_size must be [width, height], multiples of {PATCH_PIXELS}, got "
                f"{self.image_size}"
            )
        if self.max_sequence_length < 0:
            raise ValueError(f"max_sequence_length must be >= 0, got {self.max_sequence_length}")
        if any(c < 0 for c in self.massive_channels):
            raise ValueError(f"massive_channels must be >= 0, got {self.massive_channels}")
        if self.massive_channels and self.massive_activations == "none":
            raise ValueError('massive_channels needs massive_activations = "ditf"')
