"""Matchers against written-out computations, and whole pipelines on known transforms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffeat.core.components import View
from diffeat.core.geometry import ImageTransform
from diffeat.core.pipeline import Pipeline
from diffeat.plugins.matchers import Mutual, Nearest, SoftArgmax, image_argmax, mutual_nearest
from diffeat.testing import smooth_texture


def _view(desc: torch.Tensor, image_size, model_size=None) -> View:
    model_size = model_size or image_size
    return View(
        Image.new("RGB", image_size),
        ImageTransform.resize(image_size, model_size),
        descriptors=desc,
    )


def test_image_argmax_equals_dift_upsample_then_argmax():
    torch.manual_seed(0)
    src_desc, tgt_desc = torch.randn(16, 6, 8), torch.randn(16, 5, 7)
    src_size, tgt_size = (37, 29), (45, 33)
    points = torch.tensor([[0.0, 0.0], [10.0, 20.0], [36.0, 28.0], [17.0, 3.0]])
    # DIFT: upsample both maps to their image sizes, read the source at the integer point,
    # cosine similarity with every target pixel, hard argmax.
    src_up = F.interpolate(src_desc[None], size=(29, 37), mode="bilinear", align_corners=False)[0]
    tgt_up = F.interpolate(tgt_desc[None], size=(33, 45), mode="bilinear", align_corners=False)[0]
    q = F.normalize(src_up[:, points[:, 1].long(), points[:, 0].long()].T, dim=1)
    sims = q @ F.normalize(tgt_up.flatten(1), dim=0)
    best = sims.max(dim=1).values

    def sim_at(
        pts: torch.Tensor,
    ) -> torch.Tensor:  # ties (the clamped border) make any argmax valid
        return sims[torch.arange(len(pts)), (pts[:, 1] * 45 + pts[:, 0]).long()]

    result = Nearest().match(_view(src_desc, src_size), _view(tgt_desc, tgt_size), points)
    torch.testing.assert_close(sim_at(result.points), best, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.scores, best)
    # chunking (a few rows at a time) gives the same answer
    small_chunks, _ = image_argmax(q, _view(tgt_desc, tgt_size), chunk_elements=16 * 45 * 3)
    torch.testing.assert_close(sim_at(small_chunks), best, atol=1e-6, rtol=0)


def test_soft_argmax_written_out():
    # target descriptors: 2 channels; cosine sim to q=[1,0] is cos(angle) per cell
    h, w = 5, 6
    angles = torch.rand(h, w) * 1.5
    angles[2, 3] = 0.0  # the argmax
    tgt = torch.stack([torch.cos(angles), torch.sin(angles)])
    src = torch.zeros(2, 1, 1)
    src[0] = 1.0
    m = SoftArgmax(SoftArgmax.Options(window=3, temperature=0.1))
    res = m.match(_view(src, (1, 1)), _view(tgt, (w, h)), torch.tensor([[0.0, 0.0]]))
    win = torch.cos(angles[1:4, 2:5]) / 0.1
    wts = torch.softmax(win.flatten(), 0).view(3, 3)
    ys, xs = torch.meshgrid(torch.arange(1, 4.0), torch.arange(2, 5.0), indexing="ij")
    expected = torch.tensor([[(wts * xs).sum(), (wts * ys).sum()]])
    torch.testing.assert_close(res.points, expected)


def test_soft_argmax_window_clipped_at_border():
    tgt = torch.zeros(2, 4, 4)
    tgt[1] = 1.0
    tgt[:, 0, 0] = torch.tensor([1.0, 0.0])
    src = torch.tensor([1.0, 0.0]).view(2, 1, 1)
    res = SoftArgmax(SoftArgmax.Options(window=3, temperature=0.001)).match(
        _view(src, (1, 1)), _view(tgt, (4, 4)), torch.tensor([[0.0, 0.0]])
    )
    torch.testing.assert_close(res.points, torch.tensor([[0.0, 0.0]]), atol=1e-4, rtol=0)


def test_mutual_nearest_all_pairs():
    torch.manual_seed(1)
    a = torch.randn(8, 4, 5)
    perm = torch.randperm(20)
    b = a.flatten(1)[:, perm].reshape(8, 4, 5)  # a permutation: every cell has a mutual partner
    src, tgt, sims = mutual_nearest(a, b)
    assert len(src) == 20
    torch.testing.assert_close(sims, torch.ones(20))
    src_idx = (src[:, 1] * 5 + src[:, 0]).long()
    tgt_idx = (tgt[:, 1] * 5 + tgt[:, 0]).long()
    assert torch.equal(perm[tgt_idx], src_idx)


# -- whole pipelines on known transforms ----------------------------------------------------

MATCHERS = [
    {"plugin": "nearest"},
    {"plugin": "nearest", "resolution": "grid"},
    {"plugin": "soft-argmax", "window": 5, "temperature": 0.01},
    {"plugin": "mutual"},
]


def _grid_points(w: int, h: int, margin: int = 12, step: int = 9) -> torch.Tensor:
    xs, ys = torch.meshgrid(
        torch.arange(margin, w - margin, step),
        torch.arange(margin, h - margin, step),
        indexing="xy",
    )
    return torch.stack([xs.flatten(), ys.flatten()], 1).float()


def _pipeline(manager, matcher: dict, **extractor) -> Pipeline:
    data = {"extractor": {"plugin": "color-blur", **extractor}, "matcher": matcher}
    return Pipeline.from_dict(data, manager=manager)


def _errors(pipe: Pipeline, src, tgt, pts, gt) -> torch.Tensor:
    res = pipe.match(src, tgt, pts)
    return (res.points - gt).norm(dim=1)


@pytest.mark.parametrize("matcher", MATCHERS)
def test_recovers_shift(manager, matcher):
    big = smooth_texture((200, 150), seed=3, cells=7)
    dx, dy = 13, 7
    src = big.crop((20, 20, 180, 130))
    tgt = big.crop((20 + dx, 20 + dy, 180 + dx, 130 + dy))
    pipe = _pipeline(manager, matcher, image_size=[160, 110], sigmas=[0.0, 3.0, 6.0])
    pts = _grid_points(160, 110, margin=20)
    err = _errors(pipe, src, tgt, pts, pts - torch.tensor([dx, dy]))
    assert (err <= 1.0).float().mean() >= 0.9, err


@pytest.mark.parametrize("matcher", MATCHERS)
def test_recovers_horizontal_flip(manager, matcher):
    src = smooth_texture((120, 90), seed=4, cells=6)
    tgt = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pipe = _pipeline(manager, matcher, image_size=[120, 90], sigmas=[0.0, 3.0, 6.0])
    pts = _grid_points(120, 90)
    gt = torch.stack([119 - pts[:, 0], pts[:, 1]], 1)
    err = _errors(pipe, src, tgt, pts, gt)
    assert (err <= 1.0).float().mean() >= 0.9, err


@pytest.mark.parametrize("matcher", MATCHERS)
def test_recovers_scale(manager, matcher):
    # the target is the source at twice the size; both are squash-resized to the model input,
    # so the ground truth is the half-pixel-exact rescale x' = (x + 0.5) * 2 - 0.5.
    src = smooth_texture((96, 72), seed=5, cells=5)
    tgt = src.resize((192, 144), Image.Resampling.BICUBIC)
    pipe = _pipeline(manager, matcher, image_size=[96, 72], sigmas=[0.0, 2.0, 4.0])
    pts = _grid_points(96, 72)
    gt = (pts + 0.5) * 2 - 0.5
    res = pipe.match(src, tgt, pts)
    offset = res.points - gt
    err = offset.norm(dim=1)
    # one source pixel is two target pixels; a half-pixel convention slip would bias the offset
    assert (err <= 2.0).float().mean() >= 0.8, err
    inliers = offset[err <= 2.0]
    assert inliers.median(dim=0).values.abs().max() <= 0.5, inliers


def test_mutual_flags_one_sided_matches(manager):
    src = smooth_texture((64, 64), seed=6)
    tgt = Image.new("RGB", (64, 64), (128, 128, 128))  # flat: everything maps to one cell
    pipe = _pipeline(manager, {"plugin": "mutual"}, image_size=[64, 64])
    res = pipe.match(src, tgt, _grid_points(64, 64, margin=4, step=15))
    assert res.valid.float().mean() < 0.5
    assert Mutual.needs_descriptors is not False


@pytest.mark.parametrize("load", [(64, 64), (40, 40)])
def test_input_resolution_with_scaled_points_equals_the_hyperfeatures_code(load):
    """find_nn_source_correspondences of Diffusion Hyperfeatures, written out in numpy/torch,
    at the model input size (64) and at another load size (the paper's 224-for-512 setting)."""
    import numpy as np

    torch.manual_seed(3)
    src_desc, tgt_desc = torch.randn(16, 8, 8), torch.randn(16, 8, 8)
    src_size, tgt_size, model = (100, 75), (90, 120), (64, 64)
    points = torch.tensor([[0.0, 0.0], [10.0, 20.0], [99.0, 74.0], [51.0, 37.0], [55.0, 5.0]])
    # official: points (y, x) rescaled to the load size, np.round, clip, flat index
    yx = points.numpy()[:, ::-1] * np.array([load[1] / src_size[1], load[0] / src_size[0]])
    py = np.clip(yx[:, 0], 0, load[1] - 1)
    px = np.clip(yx[:, 1], 0, load[0] - 1)
    idx = torch.from_numpy(load[1] * np.round(py) + np.round(px)).long()
    up1 = F.interpolate(src_desc[None], size=load, mode="bilinear")[0].flatten(1).T
    up2 = F.interpolate(tgt_desc[None], size=load, mode="bilinear")[0].flatten(1).T
    sims = F.normalize(up1[idx], dim=1) @ F.normalize(up2, dim=1).T
    best = sims.argmax(dim=1)
    pred_yx = torch.stack([best // load[0], best % load[0]], dim=1).float().numpy()
    pred_yx = pred_yx * np.array([tgt_size[1] / load[1], tgt_size[0] / load[0]])
    expected = torch.from_numpy(pred_yx[:, ::-1].copy()).float()

    size = [] if load == model else list(load)
    nearest = Nearest(Nearest.Options(resolution="input", points="scale", input_size=size))
    result = nearest.match(
        _view(src_desc, src_size, model), _view(tgt_desc, tgt_size, model), points
    )
    torch.testing.assert_close(result.points, expected)
    torch.testing.assert_close(result.scores, sims.max(dim=1).values)
    # the library convention gives the same argmax pixels mapped through pixel centres
    centred = Nearest(Nearest.Options(resolution="input", input_size=size)).match(
        _view(src_desc, src_size, model), _view(tgt_desc, tgt_size, model), points
    )
    assert centred.points.shape == expected.shape


def test_scaled_points_need_input_resolution():
    with pytest.raises(ValueError, match="resolution"):
        Nearest.Options(resolution="image", points="scale").validate()


def test_scaled_points_round_like_numpy_float64():
    """x * (224 / 384) for x = 54 is 31.500000000000004 in float64: pixel 32 (float32 gives 31)."""
    from diffeat.plugins.matchers import scaled_raster_pixels

    view = _view(torch.zeros(1, 4, 4), (384, 384), (512, 512))
    px = scaled_raster_pixels(view, torch.tensor([[54.0, 54.0]]), (224, 224))
    assert px.tolist() == [[32.0, 32.0]]


def test_grid_resolution_with_scaled_points_equals_the_sd_dino_code():
    """compute_pck of SD-DINO written out: keypoints through preprocess_kps_pad (one factor
    size / max(w, h), integer padding), the query cell int(n / size * x), the argmax cell's
    centre (j - 1) * stride + stride + patch // 2 - 0.5 on the canvas."""
    import numpy as np

    from diffeat.core.images import fit_transform

    torch.manual_seed(4)
    canvas, n, patch = 56, 4, 14  # DINOv2 at 840 with 60 cells, scaled down
    src_size, tgt_size = (100, 67), (50, 80)
    src_desc, tgt_desc = torch.randn(8, n, n), torch.randn(8, n, n)
    points = torch.tensor([[0.0, 0.0], [99.0, 66.0], [50.0, 33.0], [13.0, 60.0], [70.0, 2.0]])

    def kps_pad(pts: np.ndarray, w: int, h: int) -> tuple[np.ndarray, float, int, int]:
        scale = canvas / max(w, h)
        out = pts * scale
        ox = oy = 0
        if h < w:
            oy = int((canvas - int(np.around(canvas * h / w))) / 2)
        elif w < h:
            ox = int((canvas - int(np.around(canvas * w / h))) / 2)
        return out + np.array([ox, oy]), scale, ox, oy

    src_kps, _, _, _ = kps_pad(points.numpy().astype(np.float64), *src_size)
    cx = (n / canvas * src_kps[:, 0]).astype(np.int32)
    cy = (n / canvas * src_kps[:, 1]).astype(np.int32)
    q = src_desc.flatten(1).T[torch.from_numpy(n * cy + cx).long()]
    sims = F.normalize(q, dim=1) @ F.normalize(tgt_desc.flatten(1).T, dim=1).T
    best = sims.argmax(dim=1).numpy()
    pred = np.stack([best % n, best // n], 1) * patch + patch // 2 - 0.5  # canvas (x, y)
    _, t_scale, t_ox, t_oy = kps_pad(np.zeros((1, 2)), *tgt_size)
    expected = (pred - np.array([t_ox, t_oy])) / t_scale  # back to target image pixels

    def view(desc: torch.Tensor, size: tuple[int, int]) -> View:
        transform = fit_transform(size, (canvas, canvas), "pad")
        return View(Image.new("RGB", size), transform, descriptors=desc)

    nearest = Nearest(Nearest.Options(resolution="grid", points="scale"))
    result = nearest.match(view(src_desc, src_size), view(tgt_desc, tgt_size), points)
    torch.testing.assert_close(result.points, torch.from_numpy(expected).float())
    torch.testing.assert_close(result.scores, sims.max(dim=1).values)


def test_match_result_json_carries_the_declared_per_point_extras():
    from diffeat.core.components import MatchResult

    result = MatchResult(
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        torch.tensor([0.5, 0.25]),
        torch.tensor([True, False]),
        {"peaks": torch.tensor([[0.1, 0.2], [0.3, 0.4]]), "big": torch.zeros(2, 9, 9)},
        json_extras={"peaks": ["a", "b"]},
    )
    rows = result.to_json()
    assert rows[1] == {"target": [3.0, 4.0], "score": 0.25, "valid": False,
                       "peaks": {"a": pytest.approx(0.3), "b": pytest.approx(0.4)}}  # fmt: skip
    assert "big" not in rows[0]
