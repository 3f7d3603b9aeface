"""The matcher against diffeat's documented contract (diffeat.testing.conformance)."""

from __future__ import annotations

import pytest
import torch

from diffeat.core.components import View
from diffeat.core.geometry import ImageTransform
from diffeat.core.plugins import get_plugin_manager
from diffeat.testing import MatcherConformance, smooth_texture

from diffeat_template.matcher import RatioMatcher, RatioOptions


class TestRatioMatcher(MatcherConformance):
    def make_matcher(self) -> RatioMatcher:
        return RatioMatcher(RatioOptions(ratio=0.95))


def test_registered_through_the_entry_point():
    assert "template-ratio" in get_plugin_manager().names("matcher")


def test_a_shifted_map_matches_the_shift():
    # random 16-channel descriptors at stride 1; the target is the source moved by (5, 3)
    image = smooth_texture((48, 40), seed=5)
    source_map = torch.randn(16, 40, 48, generator=torch.Generator().manual_seed(0))
    target_map = torch.roll(source_map, shifts=(3, 5), dims=(1, 2))
    same = ImageTransform.resize(image.size, image.size)
    source, target = View(image, same, source_map), View(image, same, target_map)
    points = torch.tensor([[10.0, 12.0], [30.0, 20.0]])
    result = RatioMatcher(RatioOptions(ratio=0.9)).match(source, target, points)
    torch.testing.assert_close(result.points, points + torch.tensor([5.0, 3.0]))
    assert result.valid.all()  # an exact copy is far better than any other cell
    torch.testing.assert_close(result.scores, torch.ones(2))


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="ratio must be in"):
        RatioMatcher(RatioOptions(ratio=1.5))
