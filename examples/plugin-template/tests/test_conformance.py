"""The plugin against diffeat's documented contracts (diffeat.testing.conformance)."""

from __future__ import annotations

import pytest
import torch
from diffeat_plugin_template import RatioMatcher, RatioOptions, ResNetExtractor, ResNetOptions
from diffeat_plugin_template.extractor import build_backbone

from diffeat.core.components import View
from diffeat.core.errors import ConfigError
from diffeat.core.images import as_input
from diffeat.core.plugins import get_plugin_manager
from diffeat.testing import ExtractorConformance, MatcherConformance, smooth_texture


class TestResNetExtractor(ExtractorConformance):
    def make_extractor(self) -> ResNetExtractor:
        return ResNetExtractor(ResNetOptions(image_size=[64, 48], layers=["layer1", "layer2"]))


class TestRatioMatcher(MatcherConformance):
    def make_matcher(self) -> RatioMatcher:
        return RatioMatcher(RatioOptions(ratio=0.95))


def test_registered_through_the_entry_point():
    pm = get_plugin_manager()
    assert "template-resnet" in pm.names("extractor")
    assert "template-ratio" in pm.names("matcher")


def test_a_point_matches_itself_on_the_same_image():
    ex = ResNetExtractor(ResNetOptions(image_size=[64, 64]))
    image = as_input(smooth_texture((64, 64), seed=3))
    (fs,) = ex.extract([image])
    view = View(image.image, fs.transform, fs.layers["layer2"][0])
    points = torch.tensor([[12.0, 20.0], [40.0, 36.0]])
    result = RatioMatcher(RatioOptions(ratio=1.0)).match(view, view, points)
    assert (result.points - points).abs().max() <= 8  # within one cell of the stride-8 grid


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="layers must be some of"):
        ResNetExtractor(ResNetOptions(layers=["layer9"]))
    with pytest.raises(ConfigError, match="no file"):
        build_backbone(ResNetOptions(weights="/nonexistent.safetensors"))
    with pytest.raises(ConfigError, match="no file"):
        ResNetExtractor(ResNetOptions(weights="/nonexistent.safetensors")).model_identity()
