"""A diffeat plugin template: one extractor and one matcher, registered by entry point.

diffeat imports this module through the ``diffeat`` entry point of ``pyproject.toml``
and calls the ``@hookimpl`` functions below; each registers components under the names
a pipeline file uses (``plugin = "template-resnet"``).
"""

from __future__ import annotations

from diffeat import hookimpl
from diffeat_plugin_template.extractor import ResNetExtractor, ResNetOptions
from diffeat_plugin_template.matcher import RatioMatcher, RatioOptions

__version__ = "0.1.0"

__all__ = ["RatioMatcher", "RatioOptions", "ResNetExtractor", "ResNetOptions"]


@hookimpl
def register_extractors(register):
    register("template-resnet", ResNetExtractor)


@hookimpl
def register_matchers(register):
    register("template-ratio", RatioMatcher)
