"""Dense matchers over descriptor maps: ``nearest``, ``mutual`` and ``soft-argmax``.

All use cosine similarity (``mutual`` optionally the L2 distance, as DIFT_adm's
HPatches evaluation). Source descriptors are read at the exact source
point by bilinear sampling (``align_corners=False``), which for integer points
equals upsampling the source map to the image size and indexing it, as DIFT
evaluates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from diffeat.core.components import Matcher, MatchResult, View
from diffeat.core.geometry import (
    Size,
    pixel_centres,
    rescale_points,
    sample_at,
    sample_rows,
)
from diffeat.core.hookspecs import Register, hookimpl
from diffeat.core.options import opt

_CHUNK_ELEMENTS = 1 << 25  # 32M floats (128 MB in float32) of upsampled target per chunk


def _descriptors(view: View) -> torch.Tensor:
    if view.descriptors is None:
        raise ValueError("this matcher needs descriptor maps; the pipeline gave none")
    return view.descriptors.float()


def query_vectors(view: View, points: torch.Tensor) -> torch.Tensor:
    """L2-normalised descriptors ``[N, C]`` at source pixel points ``[N, 2]``."""
    desc = _descriptors(view)
    grid_pts = view.image_to_grid(points.to(desc.device, torch.float32))
    return F.normalize(sample_at(desc, grid_pts), dim=1)


def grid_similarity(queries: torch.Tensor, view: View) -> torch.Tensor:
    """Cosine similarity ``[N, h, w]`` of queries with every cell of the view's grid."""
    desc = F.normalize(_descriptors(view), dim=0)
    c, h, w = desc.shape
    return (queries @ desc.reshape(c, h * w)).reshape(-1, h, w)


def raster_argmax(
    queries: torch.Tensor,
    view: View,
    size: Size,
    to_grid: Callable[[torch.Tensor], torch.Tensor],
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best pixel per query over the descriptor map upsampled to a raster of ``size``.

    ``to_grid`` maps the raster's pixel centres to grid cells. Equal to
    upsampling the whole map (bilinear, align_corners=False) and taking the
    hard argmax of cosine similarity, but computed a block of rows at a time
    so memory stays bounded whatever the size. Returns raster pixels ``[N, 2]``
    and scores ``[N]``.
    """
    desc = _descriptors(view)
    c = desc.shape[0]
    width, height = size
    rows = max(1, chunk_elements // max(1, c * width))
    best = torch.full((queries.shape[0],), -torch.inf, device=desc.device)
    best_idx = torch.zeros(queries.shape[0], dtype=torch.long, device=desc.device)
    for start in range(0, height, rows):
        pix = pixel_centres((width, height), slice(start, start + rows)).to(desc.device)
        r = pix.shape[0]
        cells = to_grid(pix.reshape(-1, 2)).reshape(r, width, 2)
        block = F.normalize(sample_rows(desc, cells), dim=0).reshape(c, -1)
        sims = queries @ block
        value, idx = sims.max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        best_idx = torch.where(better, idx + start * width, best_idx)
    xs = (best_idx % width).float()
    ys = torch.div(best_idx, width, rounding_mode="floor").float()
    return torch.stack([xs, ys], dim=1), best


def image_argmax(
    queries: torch.Tensor, view: View, chunk_elements: int = _CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best target image pixel per query over the map upsampled to the image size (DIFT)."""
    return raster_argmax(queries, view, view.image_size, view.image_to_grid, chunk_elements)


def input_raster(view: View, size: Sequence[int] = ()) -> Size:
    """The raster of ``resolution = "input"``: ``size`` when given, else the model input."""
    return (int(size[0]), int(size[1])) if size else view.transform.model_size


def input_argmax(
    queries: torch.Tensor, view: View, size: Size, chunk_elements: int = _CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best pixel per query over the map upsampled to a raster ``size`` covering the model input."""
    return raster_argmax(
        queries, view, size, lambda p: rescale_points(p, size, view.grid_size), chunk_elements
    )


def canvas_of(view: View) -> tuple[tuple[float, float], tuple[float, float], float]:
    """The whole model input behind a view's transform: ``(size, padding offset, shift)``.

    A ViT with overlapping patches (``stride`` < patch) records the region its
    tokens cover evenly, ``(patch - stride) / 2`` inside the input on every side
    (:meth:`ViTExtractorBase.transform_for`); the official codes' arithmetic
    works on the whole input. Fitted and resized inputs have offsets >= 0, so a
    negative offset is that shift.
    """
    t = view.transform
    shift = max(0.0, -min(t.offset))
    size = (t.model_size[0] + 2 * shift, t.model_size[1] + 2 * shift)
    return size, (t.offset[0] + shift, t.offset[1] + shift), shift


def _raster_scale(view: View, size: Size) -> tuple[list[float], list[float]]:
    """Per axis, image -> factor and offset onto a raster of ``size`` over the whole model
    input. For a plain resize the factor is ``raster / image`` exactly, as the official
    ``rescale_points`` computes it; for a fitted (padded) image it is the one fitting
    factor (that of the axis the image fills) on both axes plus the padding, as
    SD-DINO's ``preprocess_kps_pad``."""
    t = view.transform
    model, offset, _ = canvas_of(view)
    if offset == (0.0, 0.0) and t.scale == (model[0] / t.image_size[0], model[1] / t.image_size[1]):
        return [size[0] / t.image_size[0], size[1] / t.image_size[1]], [0.0, 0.0]
    ratio = [size[0] / model[0], size[1] / model[1]]
    fit = t.scale[0] if offset[0] <= offset[1] else t.scale[1]
    return [fit * ratio[0], fit * ratio[1]], [offset[0] * ratio[0], offset[1] * ratio[1]]


def scaled_points(view: View, points: torch.Tensor, size: Size) -> torch.Tensor:
    """Image points to raster coordinates the official codes' way, float64, unrounded:
    ``x * (raster_w / image_w)`` plus any padding offset, no half-pixel shift."""
    scale, offset = _raster_scale(view, size)
    pts = points.double()
    return pts * pts.new_tensor(scale) + pts.new_tensor(offset)


def scaled_raster_pixels(view: View, points: torch.Tensor, size: Size) -> torch.Tensor:
    """Image points to raster pixels the Diffusion Hyperfeatures way: :func:`scaled_points`
    rounded half to even as ``np.round``, clipped to the raster."""
    scaled = scaled_points(view, points, size)
    limit = scaled.new_tensor([size[0] - 1, size[1] - 1])
    return torch.minimum(torch.clamp(torch.round(scaled), min=0), limit).to(points.dtype)


def scaled_cells(view: View, points: torch.Tensor) -> torch.Tensor:
    """Image points to the grid cells ``[N, 2]`` (long) that contain them the SD-DINO way:
    ``int(x_model * grid / model)`` with ``x_model`` from :func:`scaled_points` and
    ``model`` the whole input (so with overlapping patches, SD-DINO's approximate map)."""
    (mw, mh), _, _ = canvas_of(view)
    grid = view.grid_size
    canvas = scaled_points(view, points, (mw, mh))  # type: ignore[arg-type]
    cells = torch.floor(canvas * canvas.new_tensor([grid[0] / mw, grid[1] / mh]))
    limit = canvas.new_tensor([grid[0] - 1, grid[1] - 1])
    return torch.minimum(torch.clamp(cells, min=0), limit).long()


def cell_centre_points(view: View, cells: torch.Tensor) -> torch.Tensor:
    """Grid cells ``[N, 2]`` back to image points the SD-DINO way: the token's centre in
    model pixels (``(j - 1) * stride + stride + patch // 2 - 0.5``) mapped back by
    :func:`scaled_image_points`."""
    t, grid = view.transform, view.grid_size
    model, _, shift = canvas_of(view)
    c = cells.double()
    step = c.new_tensor([t.model_size[0] / grid[0], t.model_size[1] / grid[1]])
    centre = c * step + step / 2 + shift - 0.5
    return scaled_image_points(view, centre, model).float()  # type: ignore[arg-type]


def scaled_image_points(view: View, pixels: torch.Tensor, size: Size) -> torch.Tensor:
    """Raster pixels back to image points the Diffusion Hyperfeatures way (``x * W / w``)."""
    scale, offset = _raster_scale(view, size)
    px = pixels.double()
    back = [1.0 / scale[0], 1.0 / scale[1]]
    if offset == [0.0, 0.0]:  # the official rescale_points: x * (W / w)
        back = [view.transform.image_size[0] / size[0], view.transform.image_size[1] / size[1]]
    return ((px - px.new_tensor(offset)) * px.new_tensor(back)).to(pixels.dtype)


def _cell_points(flat_idx: torch.Tensor, w: int) -> torch.Tensor:
    return torch.stack(
        [(flat_idx % w).float(), torch.div(flat_idx, w, rounding_mode="floor").float()], 1
    )


@dataclass
class NearestOptions:
    resolution: Literal["image", "grid", "input"] = opt(
        "image",
        "argmax over the target map upsampled to the image size (DIFT), over grid cells, or "
        "over the map upsampled to the model-input size (Diffusion Hyperfeatures)",
    )
    points: Literal["centres", "scale"] = opt(
        "centres",
        "centres: points map through pixel centres and source descriptors are sampled "
        "bilinearly (the library convention); scale: the official codes' arithmetic (x * w / W, "
        "no half-pixel shift; with padding one fitting factor plus the offset). With resolution "
        "= input (Diffusion Hyperfeatures): rounded to a model-input pixel, the match scaled "
        "back; with resolution = grid (SD-DINO): the source cell int(x_model * n / size), the "
        "match the target cell's centre scaled back",
    )

    input_size: list[int] = opt(
        [],
        "with resolution = input: the raster [width, height] (empty: the model input size); "
        "[224, 224] is the hyperfeatures paper's test setting (use_paper_size)",
    )

    def validate(self) -> None:
        if self.points == "scale" and self.resolution == "image":
            raise ValueError('points = "scale" needs resolution = "input" or "grid"')
        if self.input_size and (
            self.resolution != "input"
            or len(self.input_size) != 2
            or any(v < 1 for v in self.input_size)
        ):
            raise ValueError('input_size is [width, height] > 0 and needs resolution = "input"')


class Nearest(Matcher):
    """Cosine nearest neighbour with hard argmax."""

    Options = NearestOptions

    def __init__(self, options: NearestOptions | None = None) -> None:
        self.options = options or NearestOptions()

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        if self.options.resolution == "input":
            return self._match_input(source, target, points)
        if self.options.points == "scale":
            return self._match_cells(source, target, points)
        q = query_vectors(source, points)
        if self.options.resolution == "image":
            pts, scores = image_argmax(q, target)
        else:
            sims = grid_similarity(q, target)
            scores, idx = sims.flatten(1).max(dim=1)
            pts = target.grid_to_image(_cell_points(idx, sims.shape[-1]))
        return MatchResult(pts.cpu(), scores.cpu(), torch.ones(len(pts), dtype=torch.bool))

    def _match_cells(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        """SD-DINO's grid matching: the query is the cell holding the point, the answer
        the centre of the most similar target cell."""
        desc = _descriptors(source)
        cells = scaled_cells(source, points.to(desc.device)).to(desc.device)
        q = F.normalize(desc[:, cells[:, 1], cells[:, 0]].T, dim=1)
        sims = grid_similarity(q, target)
        scores, idx = sims.flatten(1).max(dim=1)
        best = _cell_points(idx, sims.shape[-1])
        pts = cell_centre_points(target, best)
        return MatchResult(pts.cpu(), scores.cpu(), torch.ones(len(pts), dtype=torch.bool))

    def _match_input(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        size = self.options.input_size
        if self.options.points == "scale":
            desc = _descriptors(source)
            raster = input_raster(source, size)
            pixels = scaled_raster_pixels(source, points.to(desc.device, torch.float32), raster)
            cells = rescale_points(pixels, raster, source.grid_size)
            q = F.normalize(sample_at(desc, cells), dim=1)
        else:
            q = query_vectors(source, points)
        raster = input_raster(target, size)
        pixels, scores = input_argmax(q, target, raster)
        if self.options.points == "scale":
            pts = scaled_image_points(target, pixels, raster)
        else:
            model = rescale_points(pixels, raster, target.transform.model_size)
            pts = target.transform.model_to_image(model)
        return MatchResult(pts.cpu(), scores.cpu(), torch.ones(len(pts), dtype=torch.bool))


@dataclass
class MutualOptions:
    tolerance: float = opt(
        1.0, "a match is mutual if the reverse match lands within this many source grid cells"
    )
    metric: Literal["cosine", "l2"] = opt(
        "cosine",
        "cosine: highest cosine similarity (DIFT on SD); l2: smallest Euclidean distance of "
        "the raw descriptors (DIFT_adm's HPatches evaluation), scores are minus the distance",
        cache="if-set",
    )


def l2_scores(queries: torch.Tensor, view: View) -> torch.Tensor:
    """Minus the Euclidean distance ``[N, h, w]`` of raw query vectors to every grid cell."""
    desc = _descriptors(view)
    c, h, w = desc.shape
    return -torch.cdist(queries, desc.reshape(c, h * w).T).reshape(-1, h, w)


def mutual_nearest(
    src: torch.Tensor, tgt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All mutual nearest neighbours between two maps ``[C, h, w]`` (cosine).

    Returns source cells ``[M, 2]``, target cells ``[M, 2]`` (x, y grid
    coordinates) and similarities ``[M]``.
    """
    s = F.normalize(src.float(), dim=0).flatten(1)
    t = F.normalize(tgt.float(), dim=0).flatten(1)
    sims = s.T @ t
    fwd = sims.argmax(dim=1)
    bwd = sims.argmax(dim=0)
    idx = torch.arange(s.shape[1], device=s.device)
    keep = bwd[fwd] == idx
    src_idx, tgt_idx = idx[keep], fwd[keep]
    return (
        _cell_points(src_idx, src.shape[-1]),
        _cell_points(tgt_idx, tgt.shape[-1]),
        sims[src_idx, tgt_idx],
    )


class Mutual(Matcher):
    """Nearest neighbour on the grid, marked valid only when the reverse match comes back."""

    Options = MutualOptions

    def __init__(self, options: MutualOptions | None = None) -> None:
        self.options = options or MutualOptions()

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        l2 = self.options.metric == "l2"
        if l2:
            grid_pts = source.image_to_grid(points.to(_descriptors(source).device, torch.float32))
            sims = l2_scores(sample_at(_descriptors(source), grid_pts), target)
        else:
            sims = grid_similarity(query_vectors(source, points), target)
        scores, idx = sims.flatten(1).max(dim=1)
        t_cells = _cell_points(idx, sims.shape[-1])
        back_q = sample_at(_descriptors(target), t_cells)
        if l2:
            back = l2_scores(back_q, source)
        else:
            back = grid_similarity(F.normalize(back_q, dim=1), source)
        _, back_idx = back.flatten(1).max(dim=1)
        back_cells = _cell_points(back_idx, back.shape[-1])
        src_cells = source.image_to_grid(points.to(back_cells.device))
        valid = (back_cells - src_cells).norm(dim=1) <= self.options.tolerance
        pts = target.grid_to_image(t_cells)
        return MatchResult(
            pts.cpu(),
            scores.cpu(),
            valid.cpu(),
            {"reverse": source.grid_to_image(back_cells).cpu(), "reason": "not mutual"},
        )


@dataclass
class SoftArgmaxOptions:
    window: int = opt(15, "side of the square window (grid cells) around the argmax; odd")
    temperature: float = opt(0.02, "softmax temperature on cosine similarity")

    def validate(self) -> None:
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be a positive odd number, got {self.window}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class SoftArgmax(Matcher):
    """Window soft-argmax (GeoAware-SC): softmax-weighted mean position near the argmax cell."""

    Options = SoftArgmaxOptions

    def __init__(self, options: SoftArgmaxOptions | None = None) -> None:
        self.options = options or SoftArgmaxOptions()

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        q = query_vectors(source, points)
        sims = grid_similarity(q, target)
        n, h, w = sims.shape
        scores, idx = sims.flatten(1).max(dim=1)
        cy = torch.div(idx, w, rounding_mode="floor")
        cx = idx % w
        r = self.options.window // 2
        offsets = torch.arange(-r, r + 1, device=sims.device)
        ys = cy[:, None] + offsets[None, :]  # [N, k]
        xs = cx[:, None] + offsets[None, :]
        inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
        yc, xc = ys.clamp(0, h - 1), xs.clamp(0, w - 1)
        rows = torch.arange(n, device=sims.device)[:, None, None]
        window = sims[rows, yc[:, :, None], xc[:, None, :]]  # [N, k, k]
        logits = (window / self.options.temperature).masked_fill(~inside, -torch.inf)
        weights = torch.softmax(logits.flatten(1), dim=1).view_as(window)
        y = (weights * ys[:, :, None].float()).sum(dim=(1, 2))
        x = (weights * xs[:, None, :].float()).sum(dim=(1, 2))
        pts = target.grid_to_image(torch.stack([x, y], dim=1))
        return MatchResult(pts.cpu(), scores.cpu(), torch.ones(n, dtype=torch.bool))


@hookimpl
def register_matchers(register: Register) -> None:
    register("nearest", Nearest)
    register("mutual", Mutual)
    register("soft-argmax", SoftArgmax)
