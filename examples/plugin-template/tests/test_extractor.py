"""The extractor against diffeat's documented contract (diffeat.testing.conformance)."""

from __future__ import annotations

import pytest
import torch

from diffeat.core.components import View
from diffeat.core.errors import ConfigError
from diffeat.core.images import as_input
from diffeat.core.plugins import get_plugin_manager
from diffeat.testing import ExtractorConformance, smooth_texture

from diffeat_template.extractor import ResNetExtractor, ResNetOptions, build_backbone


class TestResNetExtractor(ExtractorConformance):
    def make_extractor(self) -> ResNetExtractor:
        return ResNetExtractor(ResNetOptions(image_size=[64, 48], layers=["layer1", "layer2"]))


def test_registered_through_the_entry_point():
    assert "template-resnet" in get_plugin_manager().names("extractor")


def test_a_point_has_its_own_cell_as_nearest_neighbour():
    ex = ResNetExtractor(ResNetOptions(image_size=[64, 64]))
    image = as_input(smooth_texture((64, 64), seed=3))
    (fs,) = ex.extract([image])
    view = View(image.image, fs.transform, fs.layers["layer2"][0])
    points = torch.tensor([[12.0, 20.0], [40.0, 36.0]])
    grid = view.image_to_grid(points).round().long()  # the cells of the points
    c, _, w = view.descriptors.shape
    cells = torch.nn.functional.normalize(view.descriptors.reshape(c, -1), dim=0)
    query = cells[:, grid[:, 1] * w + grid[:, 0]]
    best = (query.T @ cells).argmax(dim=1)
    assert best.tolist() == (grid[:, 1] * w + grid[:, 0]).tolist()


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="layers must be some of"):
        ResNetExtractor(ResNetOptions(layers=["layer9"]))
    with pytest.raises(ConfigError, match="no file"):
        build_backbone(ResNetOptions(weights="/nonexistent.safetensors"))
    with pytest.raises(ConfigError, match="no file"):
        ResNetExtractor(ResNetOptions(weights="/nonexistent.safetensors")).model_identity()
