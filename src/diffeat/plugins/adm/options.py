"""Options of the ``adm`` extractor (defaults: DIFT_adm's semantic preset)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffeat.core.options import opt


@dataclass
class AdmOptions:
    """Options of the ``adm`` extractor: DIFT on guided-diffusion's 256x256 unconditional UNet."""

    model: str = opt(
        "",
        "folder written by `diffeat convert adm STATE.safetensors OUT_DIR` (a diffusers "
        "UNet2DModel with adm.json); required",
    )
    layers: list[str] = opt(
        ["output_blocks.4"],
        "guided-diffusion blocks whose outputs are captured, in the paper's numbering: "
        "output_blocks.<i> (DIFT's up_ft_index i), input_blocks.<i>, middle_block; globs "
        "such as output_blocks.* allowed",
    )
    timesteps: list[int] = opt(
        [101], "noise timesteps t (0..999), one UNet pass each (DIFT_adm: 101, 41 or 51)"
    )
    ensemble_size: int = opt(8, "noisy copies per image; their feature maps are averaged")
    image_size: list[int] = opt(
        [512, 512], "model input [width, height] (multiples of 32; DIFT_adm: 512 x 512)"
    )
    size_rule: Literal["resize", "short-side"] = opt(
        "resize",
        "resize: squash the image to image_size (DIFT_adm's SPair and HPatches runs); "
        "short-side: keep the aspect ratio, the short side becomes min(image_size) and the "
        "long side is floored to a multiple of 32 (DIFT's DAVIS/JHMDB protocol)",
    )
    resample: Literal["bicubic", "bilinear", "lanczos", "nearest"] = opt(
        "bicubic", "PIL resize filter (DIFT uses PIL's default, bicubic)"
    )
    seed: int = opt(0, "seed of the timestep noise (per image, from its content)")
    dtype: Literal["float32", "float16", "bfloat16"] = opt(
        "float32", "UNet dtype (DIFT_adm: float32; the noisy input is computed in float32)"
    )
    device: str = opt("auto", "torch device; auto: cuda if available, else cpu", cache=False)
    batch_size: int = opt(1, "images per UNet pass (each with ensemble_size copies)", cache=False)
    ensemble_batch: int = opt(
        0,
        "noisy latents per UNet forward (ensemble copies, of all images of a batch together); "
        "0: all in one forward. Smaller uses less memory and, on a CPU, lets the progress bar "
        "count copies; results equal up to float rounding",
        cache=False,
    )
    stop_early: bool = opt(True, "stop the UNet once the deepest requested block ran", cache=False)

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: give at least one block, e.g. output_blocks.4")
        if not self.timesteps:
            raise ValueError("timesteps: give at least one timestep")
        if any(t < 0 for t in self.timesteps):
            raise ValueError(f"timesteps must be >= 0, got {self.timesteps}")
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ensemble_batch < 0:
            raise ValueError(
                f"ensemble_batch must be >= 0 (0: one forward), got {self.ensemble_batch}"
            )
        if len(self.image_size) != 2 or any(v < 32 or v % 32 for v in self.image_size):
            raise ValueError(
                f"image_size must be [width, height], multiples of 32, got {self.image_size}"
            )
