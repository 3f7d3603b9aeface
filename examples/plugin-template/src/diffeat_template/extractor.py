"""A ResNet-style feature extractor: the maps after each residual stage.

The backbone here is a small ResNet (stem, then stages of two basic blocks,
each stage halving the resolution) with seeded random weights, so the template
runs and tests offline. Replace :func:`build_backbone` with your network (e.g.
a torchvision ResNet-50), keep the stage names in :data:`STAGES`, and load its
weights from a safetensors file with ``weights = "..."``: never from a pickle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffeat.core.components import Extractor
from diffeat.core.errors import ConfigError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.geometry import ImageTransform, Size
from diffeat.core.images import ImageInput, resize, to_tensor

#: stage name -> (channels, stride in model-input pixels per cell)
STAGES: dict[str, tuple[int, int]] = {"layer1": (32, 4), "layer2": (64, 8), "layer3": (128, 16)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ResNetOptions:
    """Options of ``[extractor] plugin = "template-resnet"`` (each field is a TOML key)."""

    image_size: list[int] = field(
        default_factory=lambda: [224, 224],
        metadata={"help": "model input [width, height], multiples of 16"},
    )
    layers: list[str] = field(
        default_factory=lambda: ["layer2"], metadata={"help": f"stages to return: {list(STAGES)}"}
    )
    weights: str = field(
        default="", metadata={"help": "safetensors state dict of the backbone; empty: random"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})
    device: str = field(default="cpu", metadata={"help": "torch device"})

    def validate(self) -> None:
        """Raise ValueError naming the option and the way out (diffeat adds the file/key)."""
        if len(self.image_size) != 2 or any(v < 16 or v % 16 for v in self.image_size):
            raise ValueError(
                f"image_size must be [width, height], multiples of 16, got {self.image_size}"
            )
        unknown = [name for name in self.layers if name not in STAGES]
        if not self.layers or unknown:
            raise ValueError(f"layers must be some of {list(STAGES)}, got {self.layers}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a skip connection (ResNet-18's block)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class Backbone(nn.Module):
    """Stem (stride 4), then one stage per :data:`STAGES` entry."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 7, 2, 3, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, c_in = {}, 32
        for i, (name, (c_out, _)) in enumerate(STAGES.items()):
            stride = 1 if i == 0 else 2
            stages[name] = nn.Sequential(
                BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)
            )
            c_in = c_out
        self.stages = nn.ModuleDict(stages)

    def forward(self, x: torch.Tensor, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        out, x = {}, self.stem(x)
        for name, stage in self.stages.items():
            x = stage(x)
            if name in wanted:
                out[name] = x
            if len(out) == len(wanted):  # stop after the deepest wanted stage
                break
        return out


def weights_file(options: ResNetOptions) -> Path:
    """The ``weights`` file, or a :class:`ConfigError` naming the option and the way out."""
    path = Path(options.weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"[extractor] weights: no file {path}; give a safetensors state dict of the "
            'backbone, or weights = "" for random weights'
        )
    return path


def build_backbone(options: ResNetOptions) -> nn.Module:
    """The network, with its weights, in eval mode on the options' device."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state stays untouched
        torch.manual_seed(options.seed)  # random weights that are the same every run
        net = Backbone()
    if options.weights:
        from safetensors.torch import load_file

        path = weights_file(options)
        try:
            net.load_state_dict(load_file(str(path)))
        except (RuntimeError, OSError) as exc:
            raise ConfigError(
                f"[extractor] weights: {path} does not fit the backbone: {exc}"
            ) from None
    return net.eval().to(options.device)


class ResNetExtractor(Extractor):
    """Feature maps of the residual stages named in ``layers``, one timestep (0)."""

    Options = ResNetOptions

    def __init__(self, options: ResNetOptions | None = None) -> None:
        self.options = options or ResNetOptions()
        self.options.validate()
        self.device = torch.device(self.options.device)
        self._net: nn.Module | None = None
        self._identity: dict[str, Any] | None = None

    @property
    def net(self) -> nn.Module:
        """The backbone, built on first use (so declarations need no weights)."""
        if self._net is None:
            self._net = build_backbone(self.options)
        return self._net

    def layers(self) -> list[LayerInfo]:
        return [
            LayerInfo(name, STAGES[name][0], float(STAGES[name][1])) for name in self.options.layers
        ]

    def model_identity(self) -> dict[str, Any]:
        # part of the feature store's key: it must change whenever the weights change
        if self._identity is None:
            if self.options.weights:
                digest = hashlib.sha256()
                with open(weights_file(self.options), "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                self._identity = {"model": "template-resnet", "sha256": digest.hexdigest()}
            else:
                self._identity = {"model": "template-resnet", "seed": self.options.seed}
        return self._identity

    def transform_for(self, image_size: Size) -> ImageTransform:
        w, h = self.options.image_size
        return ImageTransform.resize(image_size, (w, h))

    @torch.no_grad()
    def extract(self, images: Sequence[ImageInput]) -> list[FeatureSet]:
        w, h = self.options.image_size
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        batch = torch.stack([(to_tensor(resize(im.image, (w, h))) - mean) / std for im in images])
        maps = self.net(batch.to(self.device), self.options.layers)
        out = []
        for i, im in enumerate(images):
            layers = {
                name: maps[name][i : i + 1].float().cpu() for name in self.options.layers
            }  # [T=1, C, H, W]
            out.append(
                FeatureSet(layers, (0,), {"transform": self.transform_for(im.size).to_dict()})
            )
        return out
