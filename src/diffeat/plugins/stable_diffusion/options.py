"""Options of the ``stable-diffusion`` extractor; each mode's own checks live in its recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffeat.core.options import opt

#: the placeholder of a prompt template that each image's category fills in
CATEGORY = "{category}"


@dataclass
class StableDiffusionOptions:
    """Options of the ``stable-diffusion`` extractor (defaults: DIFT's semantic preset on SD 2.1)."""

    model: str = opt("stabilityai/stable-diffusion-2-1", "hub id or local diffusers folder")
    revision: str = opt("", "hub revision (branch, tag or commit); empty: the default branch")
    layers: list[str] = opt(
        ["up_blocks.1"],
        "UNet module names or glob patterns whose outputs are captured, e.g. up_blocks.1 "
        "(DIFT up_ft_index 1) or up_blocks.*.resnets.*.conv2 (decoder ResNet residual branches)",
    )
    mode: Literal["add-noise", "inversion", "generation", "clean"] = opt(
        "add-noise",
        "add-noise: noise the latent to each timestep and run the UNet once per timestep (DIFT); "
        "inversion: deterministic DDIM inversion of the clean latent, capturing at the kept "
        "timesteps on the way (Diffusion Hyperfeatures); generation: sample an image from the "
        "prompt and capture while denoising (`diffeat generate`); clean: one UNet pass per "
        "timestep on the clean latent, no noise added (CleanDIFT's fine-tuned UNets, t=261)",
        cache="if-set",
    )
    timesteps: list[int] = opt(
        [261],
        "add-noise: noise timesteps, one UNet pass each; inversion/generation: the UNet "
        "timesteps whose maps are kept (-1 is the clean latent, e.g. [-1, 60, 160, ..., 960])",
    )
    inversion_steps: int = opt(
        50,
        "DDIM steps of the inversion or generation (eta 0); 1 with timesteps [-1]: one-step",
        cache="if-set",
    )
    steps_offset: int = opt(
        0,
        "added to the DDIM timesteps of inversion/generation; 0 as the hyperfeatures code "
        "(SD 1.5's own scheduler config says 1)",
        cache="if-set",
    )
    guidance_scale: float = opt(
        -1.0,
        "generation: classifier-free guidance scale with negative_prompt when > 0 (the "
        "official code guides for any value but -1); <= 0: no guidance; maps come from the "
        "conditional pass",
        cache="if-set",
    )
    negative_prompt: str = opt(
        "", "generation: the unconditional prompt of guidance", cache="if-set"
    )
    ensemble_size: int = opt(8, "noisy copies per image; their feature maps are averaged")
    image_size: list[int] = opt([768, 768], "model input [width, height]")
    size_rule: Literal["resize", "pad", "short-side"] = opt(
        "resize",
        "resize: squash the image to image_size (DIFT, hyperfeatures); pad: fit it inside "
        "image_size keeping its aspect ratio, centred on black (SD-DINO); short-side: keep the "
        "aspect ratio, the short side becomes min(image_size) and the long side is floored to "
        "a multiple of 32 (DIFT's DAVIS protocol: [480, 480] gives 832x480 for 854x480 frames)",
        cache="if-set",
    )
    load_size: list[int] = opt(
        [],
        "resize the image to this [width, height] first (PIL bilinear), then to image_size by "
        "bilinear interpolation of the tensor: the hyperfeatures paper's use_paper_size ([64, "
        "64] for training, [224, 224] for testing); empty: straight to image_size",
        cache="if-set",
    )
    resample: Literal["bicubic", "bilinear", "lanczos", "nearest"] = opt(
        "bicubic", "PIL resize filter (DIFT uses PIL's default, bicubic)"
    )
    prompt: str = opt(
        "",
        "text prompt (empty: the null prompt, as DIFT); {category} is replaced by each "
        "image's category, e.g. \"a photo of a {category}\" (DIFT's SPair protocol)",
    )
    captioner: str = opt(
        "",
        "add-noise: safetensors file of ODISE's implicit captioner (exported from ODISE's "
        "checkpoint, docs/sd-dino.md): the UNet is conditioned on each tile's CLIP image "
        "embedding and its time embedding offset, as ODISE / SD-DINO; a non-empty prompt "
        "replaces the captioner's prompt states (SD-DINO's TEXT_INPUT), the time offset stays; "
        "empty: no captioner. Identified in the store by content",
        cache=False,
    )
    captioner_clip: str = opt(
        "ViT-L-14-336-quickgelu",
        "the captioner's CLIP image tower (open_clip model, as the openclip extractor's model; "
        "runs in float32, as ODISE)",
        cache="if-set",
    )
    captioner_clip_pretrained: str = opt(
        "openai",
        "its weights: an open_clip pretrained tag or a checkpoint file (ODISE: openai)",
        cache="if-set",
    )
    latent: Literal["sample", "mean"] = opt(
        "sample", "VAE latent: a posterior sample (DIFT) or the posterior mean (Hedlin et al.)"
    )
    seed: int = opt(0, "seed of the posterior and timestep noise (per image, from its content)")
    noise: Literal["per-image", "shared"] = opt(
        "per-image",
        "per-image: noise drawn from seed and the image content; shared: one draw from seed "
        "(timestep noise first) used for every image and tile, as ODISE / SD-DINO (seed 42)",
        cache="if-set",
    )
    tile_size: list[int] = opt(
        [],
        "add-noise: run the UNet on tiles [width, height] of the model input and average the "
        "overlapping maps (ODISE's slide_forward: [512, 512] on a 960 input); empty: no tiles",
        cache="if-set",
    )
    tile_stride: list[int] = opt([], "tile step [x, y]; empty: the tile size", cache="if-set")
    dtype: Literal["float32", "float16", "bfloat16"] = opt("float32", "model dtype")
    device: str = opt("auto", "torch device; auto: cuda if available, else cpu", cache=False)
    batch_size: int = opt(1, "images per UNet pass (each with ensemble_size copies)", cache=False)
    ensemble_batch: int = opt(
        0,
        "latents per UNet forward (ensemble copies, of all images of a batch together); 0: "
        "all in one forward. Smaller uses less memory and, on a CPU, lets the progress bar "
        "count copies; results equal up to float rounding",
        cache=False,
    )
    encode_per_copy: bool = opt(
        False,
        "VAE-encode every ensemble copy, as the original code does (slower, same result)",
        cache=False,
    )
    stop_early: bool = opt(True, "stop the UNet once the deepest requested layer ran", cache=False)
    unet_weights: str = opt(
        "",
        "replace the UNet's weights: a safetensors state dict with diffusers key names or a "
        "UNet folder, e.g. CleanDIFT's cleandift_sd21_unet.safetensors on SD 2.1 (with mode = "
        '"clean"); empty: the model\'s own UNet. Identified in the store by content',
        cache=False,
    )
    added_conditioning: Literal["size", "none"] = opt(
        "size",
        "SDXL only: size: the UNet's added embedding of the pooled prompt embedding and the time "
        "ids (original size, crop top-left (0, 0), target size), as StableDiffusionXLPipeline; "
        "none: no added embedding (zeros), as DistillDIFT's copied UNet forward",
        cache="if-set",
    )
    original_size: list[int] = opt(
        [],
        "SDXL only: the original size [width, height] in the time ids; empty: the UNet input "
        "size (the pipeline's default)",
        cache="if-set",
    )
    channels_last: bool = opt(
        False,
        "UNet and VAE weights in channels-last memory format (faster convolutions on recent "
        "GPUs; results equal up to float rounding)",
        cache=False,
    )
    compile: bool = opt(
        False,
        "torch.compile the VAE encoder and the UNet blocks that hold no captured layer (the "
        "first batch compiles, later ones run faster; results equal up to float rounding)",
        cache=False,
    )

    def validate(self) -> None:
        """Checks every mode shares, then the mode's recipe's own (:meth:`Recipe.validate`)."""
        # imported here: the recipes import this module (for CATEGORY)
        from diffeat.plugins.stable_diffusion.recipes import recipe_for

        if not self.layers:
            raise ValueError("layers: give at least one UNet module name")
        if not self.timesteps:
            raise ValueError("timesteps: give at least one timestep")
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ensemble_batch < 0:
            raise ValueError(
                f"ensemble_batch must be >= 0 (0: one forward), got {self.ensemble_batch}"
            )
        if len(self.image_size) != 2 or any(v < 8 or v % 8 for v in self.image_size):
            raise ValueError(
                f"image_size must be [width, height], multiples of 8, got {self.image_size}"
            )
        if self.load_size and (len(self.load_size) != 2 or any(v < 1 for v in self.load_size)):
            raise ValueError(f"load_size must be [width, height] > 0, got {self.load_size}")
        if self.load_size and self.size_rule != "resize":
            raise ValueError('load_size works with size_rule = "resize" only')
        if self.size_rule == "short-side" and self.tile_size:
            raise ValueError('tile_size works with size_rule = "resize" or "pad", not "short-side"')
        if self.original_size and (
            len(self.original_size) != 2 or any(v < 1 for v in self.original_size)
        ):
            raise ValueError(f"original_size must be [width, height] > 0, got {self.original_size}")
        if self.tile_stride and not self.tile_size:
            raise ValueError("tile_stride needs tile_size")
        recipe_for(self.mode).validate(self)
