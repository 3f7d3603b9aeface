"""The diffeat plugin template (written by ``diffeat plugin new``):

- a ResNet-style extractor (the feature maps after each residual stage)
- a ratio-test matcher (cosine nearest neighbour, valid when clearly the best)

diffeat imports this module through the ``diffeat`` entry point of ``pyproject.toml``
and calls the ``@hookimpl`` functions below; each registers a component under the
name a pipeline file (or ``--dataset``) uses.
"""

from __future__ import annotations

from diffeat import hookimpl

from diffeat_template.extractor import ResNetExtractor, ResNetOptions
from diffeat_template.matcher import RatioMatcher, RatioOptions

__version__ = "0.1.0"

__all__ = ["RatioMatcher", "RatioOptions", "ResNetExtractor", "ResNetOptions"]


@hookimpl
def register_extractors(register):
    register("template-resnet", ResNetExtractor)


@hookimpl
def register_matchers(register):
    register("template-ratio", RatioMatcher)
