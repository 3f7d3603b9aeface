"""The ``fuse`` aggregator: several extractors' features combined into one descriptor map.

Per part (extractor): each layer is averaged over timesteps, optionally reduced
by PCA (fitted on both images of a pair, as SD-DINO does, or per image),
brought onto a common grid, concatenated, L2-normalised over channels and
weighted; the parts are then concatenated. The common grid is that of a
reference part. By default every layer is resampled through image coordinates,
so parts with different preprocessing (squash-resize, padding, other sizes)
stay aligned; SD-DINO's own arithmetic is available as switches: the coarser
layers of a part upsampled step by step through the finer layers' grids
(``upsample = "cascade"``), cells paired by index (``alignment = "cells"``) and
randomised PCA (``pca_solver = "lowrank"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from diffeat.core.components import Aggregator
from diffeat.core.errors import ConfigError
from diffeat.core.features import FeatureSet
from diffeat.core.geometry import (
    ImageTransform,
    Size,
    grid_size_of,
    pixel_centres,
    resize_map,
    sample_rows,
)
from diffeat.core.hookspecs import Register, hookimpl
from diffeat.core.options import opt

Parts = dict[str, FeatureSet]


@dataclass
class FuseOptions:
    parts: list[str] = opt(
        [], "extractor names to combine, in order; empty: all, in pipeline order"
    )
    weights: list[float] = opt([], "one weight per part, applied after normalisation; empty: 1")
    normalize: bool = opt(True, "L2-normalise each part over its channels before weighting")
    pca_dim: int = opt(0, "reduce each layer of the PCA parts to this many channels; 0: no PCA")
    pca_parts: list[str] = opt([], "parts whose layers are PCA-reduced; empty: every part")
    pca: Literal["pair", "image"] = opt(
        "pair", "fit PCA on both images of a pair (SD-DINO) or on each image alone"
    )
    pca_solver: Literal["exact", "lowrank"] = opt(
        "exact",
        "exact: SVD of the centred cells (deterministic); lowrank: torch.pca_lowrank (randomised, "
        "as SD-DINO; seeded with 0 here)",
    )
    upsample: Literal["direct", "cascade"] = opt(
        "direct",
        "direct: each layer resampled to the common grid on its own; cascade: a part's layers "
        "from coarse to fine, the running concatenation upsampled (bilinear) to each finer "
        "layer's grid and put after it, then to the common grid (SD-DINO: 15 -> 30 -> 60)",
    )
    alignment: Literal["image", "cells"] = opt(
        "image",
        "image: parts meet through image coordinates (their transforms); cells: a part's map "
        "is interpolated to the common grid and cells are paired by index, as SD-DINO pairs "
        "its 960 px SD and 840 px DINO canvases (right only when the parts cover the same "
        "region of the image, e.g. both padded to squares)",
    )
    reference: str = opt("", "part whose grid and transform are the common frame; empty: the first")
    size: list[int] = opt(
        [], "common grid [width, height]; empty: the reference part's finest grid"
    )

    def validate(self) -> None:
        if self.weights and self.parts and len(self.weights) != len(self.parts):
            raise ValueError(f"weights has {len(self.weights)} values for {len(self.parts)} parts")
        if self.pca_dim < 0:
            raise ValueError(f"pca_dim must be >= 0, got {self.pca_dim}")


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the default generator of ``device`` (and only it); restore its state afterwards."""
    cuda = device.type == "cuda"
    index = (
        device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)
    )
    with torch.random.fork_rng(devices=[index] if cuda else []):
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        yield


def pca_project(maps: list[torch.Tensor], dim: int, solver: str = "exact") -> list[torch.Tensor]:
    """Project ``[C, h_i, w_i]`` maps onto the top ``dim`` principal components of all their cells.

    ``exact``: SVD of the centred cells, deterministic. ``lowrank``:
    ``torch.pca_lowrank(centred, q=dim)`` as SD-DINO calls it (randomised; the
    maps' device's generator seeded with 0 and restored afterwards, so runs
    repeat on one device, while a CPU and a GPU draw differently). Maps with
    ``C <= dim`` are returned as is; fewer cells than ``dim`` is an error.
    """
    c = maps[0].shape[0]
    if dim <= 0 or c <= dim:
        return maps
    cells = torch.cat([m.reshape(c, -1).T for m in maps]).double()
    if cells.shape[0] < dim:
        raise ConfigError(
            f"fuse aggregator: pca_dim = {dim} needs at least {dim} cells, but a layer has "
            f"{cells.shape[0]} ({' + '.join(f'{m.shape[-1]}x{m.shape[-2]}' for m in maps)}): "
            f"lower pca_dim or raise the extractor's image_size"
        )
    centred = cells - cells.mean(dim=0, keepdim=True)
    if solver == "lowrank":
        with seeded(centred.device, 0):
            _, _, v = torch.pca_lowrank(centred, q=dim)
        basis = v[:, :dim]
    else:
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        basis = vh[:dim].T  # [C, dim]
    out, start = [], 0
    for m in maps:
        n = m.shape[-1] * m.shape[-2]
        proj = (centred[start : start + n] @ basis).float()
        out.append(proj.T.reshape(dim, *m.shape[-2:]))
        start += n
    return out


def cascade(maps: list[torch.Tensor]) -> torch.Tensor:
    """SD-DINO's multi-resolution concatenation of one part's ``[C_i, h_i, w_i]`` layers.

    From the coarsest grid to the finest: the running concatenation is
    upsampled to the next finer layer's grid and put after that layer, so the
    result lies on the finest grid with the finest layer's channels first
    (SD-DINO: ``[s3, up([s4, up(s5)])]``).
    """
    order = sorted(maps, key=lambda m: m.shape[-1] * m.shape[-2])
    acc = order[0].float()
    for finer in order[1:]:
        acc = torch.cat([finer.float(), resize_map(acc, grid_size_of(finer))])
    return acc


def resample(
    fmap: torch.Tensor, transform: ImageTransform, ref: ImageTransform, ref_grid: Size
) -> torch.Tensor:
    """Sample ``fmap`` (a grid over ``transform``'s model input) at the reference grid's cells."""
    cells = pixel_centres(ref_grid).to(fmap.device)
    image_pts = ref.grid_to_image(cells.reshape(-1, 2), ref_grid)
    own = transform.image_to_grid(image_pts, grid_size_of(fmap))
    return sample_rows(fmap.float(), own.reshape(ref_grid[1], ref_grid[0], 2))


class Fuse(Aggregator):
    """Combine several extractors (SD + DINOv2 as in SD-DINO, or any others)."""

    Options = FuseOptions

    def __init__(self, options: FuseOptions | None = None) -> None:
        self.options = options or FuseOptions()

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        return self.fuse({"features": features})[0]

    def _names(self, parts: Parts) -> list[str]:
        names = self.options.parts or list(parts)
        missing = [n for n in names + [self.options.reference] if n and n not in parts]
        if missing:
            raise ConfigError(
                f"fuse aggregator: no extractor named {missing[0]!r}; the pipeline has "
                f"{', '.join(parts)}"
            )
        return names

    def _layers(self, name: str, images: list[Parts]) -> list[list[torch.Tensor]]:
        """Per image, the part's layers averaged over timesteps, PCA-reduced if asked."""
        per_image = [[m.mean(dim=0).float() for m in p[name].layers.values()] for p in images]
        o = self.options
        if not o.pca_dim or (o.pca_parts and name not in o.pca_parts):
            return per_image
        for li in range(len(per_image[0])):
            maps = [layers[li] for layers in per_image]
            groups = [maps] if o.pca == "pair" else [[m] for m in maps]
            reduced = [r for group in groups for r in pca_project(group, o.pca_dim, o.pca_solver)]
            for layers, r in zip(per_image, reduced):
                layers[li] = r
        return per_image

    def _combine(self, images: list[Parts]) -> list[tuple[torch.Tensor, ImageTransform]]:
        names = self._names(images[0])
        ref_name = self.options.reference or names[0]
        weights = self.options.weights or [1.0] * len(names)
        layers = {name: self._layers(name, images) for name in names}
        out = []
        for i, parts in enumerate(images):
            ref = parts[ref_name].transform
            if self.options.size:
                grid = (int(self.options.size[0]), int(self.options.size[1]))
            else:
                grid = max(
                    (grid_size_of(m) for m in layers[ref_name][i]), key=lambda s: s[0] * s[1]
                )
            chunks = []
            for name, weight in zip(names, weights):
                own = parts[name].transform
                maps = layers[name][i]
                if self.options.upsample == "cascade":
                    maps = [cascade(maps)]
                if self.options.alignment == "cells":
                    part = torch.cat([resize_map(m.float(), grid) for m in maps])
                else:
                    part = torch.cat([resample(m, own, ref, grid) for m in maps])
                if self.options.normalize:
                    part = F.normalize(part, dim=0)
                chunks.append(part * weight)
            out.append((torch.cat(chunks), ref))
        return out

    def fuse(self, parts: Parts) -> tuple[torch.Tensor, ImageTransform]:
        """One image's descriptor map and the transform of its frame (PCA per image if asked)."""
        return self._combine([parts])[0]

    def fuse_pair(
        self, source: Parts, target: Parts
    ) -> tuple[tuple[torch.Tensor, ImageTransform], tuple[torch.Tensor, ImageTransform]]:
        """Both images of a pair; with ``pca = "pair"`` the PCA is fitted on both together."""
        src, tgt = self._combine([source, target])
        return src, tgt


@hookimpl
def register_aggregators(register: Register) -> None:
    """The ``fuse`` plugin: the ``fuse`` aggregator."""
    register("fuse", Fuse)
