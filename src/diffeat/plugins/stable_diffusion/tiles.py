"""Sliding-window tiles of the model input, as ODISE's ``slide_forward`` runs the UNet.

Per axis, ``n = max(L - t + s - 1, 0) // s + 1`` tiles of side ``t`` at
``min(i * s, L - t)``: a 960-pixel input with 512-pixel tiles and stride 512
gives tiles at 0 and 448. Every tile runs through the UNet on its own; each
layer's maps are pasted at the tile's cell offset and overlaps are averaged.
"""

from __future__ import annotations

import torch

from diffeat.core.errors import ConfigError
from diffeat.core.geometry import Size


def axis_positions(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis (the last tile ends at the edge)."""
    n = max(length - tile + stride - 1, 0) // stride + 1
    return [min(i * stride, length - tile) for i in range(n)]


def tile_origins(size: Size, tile: Size, stride: Size) -> list[tuple[int, int]]:
    """Top-left ``(x, y)`` of every tile, row by row."""
    xs = axis_positions(size[0], tile[0], stride[0])
    ys = axis_positions(size[1], tile[1], stride[1])
    return [(x, y) for y in ys for x in xs]


def paste_tiles(
    maps: torch.Tensor, origins: list[tuple[int, int]], size: Size, tile: Size, layer: str
) -> torch.Tensor:
    """Average ``[P, ..., h, w]`` tile maps into one ``[..., H, W]`` map of the whole input.

    A layer whose cell does not divide a tile's offset cannot be pasted
    exactly; that is an error naming the layer.
    """
    h, w = maps.shape[-2:]
    sx, sy = tile[0] // w, tile[1] // h
    if tile[0] % w or tile[1] % h or size[0] % sx or size[1] % sy:
        raise ConfigError(
            f"[extractor] layer {layer}: its {w}x{h} map of a {tile[0]}x{tile[1]} tile does not "
            f"tile an input of {size[0]}x{size[1]} exactly"
        )
    out = maps.new_zeros((*maps.shape[1:-2], size[1] // sy, size[0] // sx))
    count = maps.new_zeros((size[1] // sy, size[0] // sx))
    for m, (x, y) in zip(maps, origins):
        if x % sx or y % sy:
            raise ConfigError(
                f"[extractor] layer {layer} has cells of {sx}x{sy} pixels; the tile at ({x}, "
                f"{y}) does not start on a cell: choose tile_size / tile_stride so that tile "
                f"offsets are multiples of {max(sx, sy)}"
            )
        cy, cx = y // sy, x // sx
        out[..., cy : cy + h, cx : cx + w] += m
        count[cy : cy + h, cx : cx + w] += 1
    return out / count
