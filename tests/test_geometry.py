from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffeat.core.errors import DiffeatError
from diffeat.core.geometry import (
    ImageTransform,
    check_points,
    pixel_centres,
    rescale_points,
    resize_map,
    sample_at,
    sample_rows,
)


def test_resize_transform_maps_pixel_centres():
    t = ImageTransform.resize((100, 50), (200, 200))
    pts = torch.tensor([[0.0, 0.0], [99.0, 49.0], [-0.5, -0.5]])
    model = t.image_to_model(pts)
    # pixel 0 covers [-0.5, 0.5] -> [-0.5, 1.5] in the 2x model: centre 0.5
    torch.testing.assert_close(model[0], torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(model[1], torch.tensor([198.5, 197.5]))
    torch.testing.assert_close(model[2], torch.tensor([-0.5, -0.5]))
    torch.testing.assert_close(t.model_to_image(model), pts)


def test_offset_and_roundtrip_through_grid():
    t = ImageTransform((64, 32), (80, 40), (1.25, 1.25), (0.0, 0.0))
    pts = torch.rand(20, 2) * torch.tensor([63.0, 31.0])
    grid = t.image_to_grid(pts, (10, 5))
    torch.testing.assert_close(t.grid_to_image(grid, (10, 5)), pts)
    t2 = ImageTransform((64, 32), (64, 48), (1.0, 1.0), (0.0, 8.0))  # 8 px padding on top
    torch.testing.assert_close(
        t2.image_to_model(torch.tensor([[3.0, 0.0]])), torch.tensor([[3.0, 8.0]])
    )
    assert ImageTransform.from_dict(t2.to_dict()) == t2


def test_rescale_points_is_align_corners_false():
    # cell 0 of a 4-wide grid covers model pixels 0..7 of a 32-wide input: centre 3.5
    assert rescale_points(torch.tensor([[0.0, 0.0]]), (4, 4), (32, 32)).tolist() == [[3.5, 3.5]]


def test_sample_at_equals_interpolate_then_index():
    torch.manual_seed(0)
    fmap = torch.randn(5, 6, 7)
    h, w = 23, 31
    up = F.interpolate(fmap[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    pix = pixel_centres((w, h)).reshape(-1, 2)
    cells = rescale_points(pix, (w, h), (7, 6))
    sampled = sample_at(fmap, cells)
    torch.testing.assert_close(sampled.T.reshape(5, h, w), up, atol=1e-5, rtol=1e-5)
    rows = sample_rows(fmap, cells.reshape(h, w, 2))
    torch.testing.assert_close(rows, up, atol=1e-5, rtol=1e-5)


def test_resize_map_batched_and_unbatched():
    x = torch.randn(2, 3, 4, 5)
    assert resize_map(x, (10, 8)).shape == (2, 3, 8, 10)
    assert resize_map(x[0], (10, 8)).shape == (3, 8, 10)
    assert resize_map(x, (5, 4)) is x


def test_check_points_names_the_point():
    check_points(torch.tensor([[0.0, 0.0], [9.0, 4.0]]), (10, 5))
    with pytest.raises(DiffeatError, match=r"\(10, 2\).*10x5"):
        check_points(torch.tensor([[10.0, 2.0]]), (10, 5))
