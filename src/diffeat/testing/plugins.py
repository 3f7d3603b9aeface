"""Test plugins: plugin objects registered in-process with ``PluginManager.add_plugin``.

- :class:`TestPlugin` registers the deterministic test extractors
  ``color-blur`` and ``color-blur-multi``.
- :class:`AllHooksPlugin` is a third-party-style plugin implementing every
  hook of :mod:`diffeat.core.hookspecs` (an extractor, an aggregator, a
  query-conditioned matcher, a dataset and a command), so tests can check that
  each hook is honoured end to end. A new hookspec must get an implementation
  here (``tests/test_conformance.py`` fails until it has one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import click
import numpy as np
import torch

from diffeat.core.components import Aggregator, Matcher, MatchResult, View
from diffeat.core.datasets import Dataset, Pair
from diffeat.core.features import FeatureSet
from diffeat.core.hookspecs import Register, hookimpl
from diffeat.core.images import list_images, load_image
from diffeat.core.options import opt
from diffeat.testing.extractors import ColorBlurExtractor, MultiColorBlurExtractor

__all__ = [
    "ALL_HOOKS_NAMES",
    "AllHooksPlugin",
    "FirstLayerMean",
    "ScaledPointsMatcher",
    "TestPlugin",
    "TinyPairs",
    "hello_command",
]


class TestPlugin:
    """A plugin object registering :class:`ColorBlurExtractor` as ``color-blur`` and
    :class:`MultiColorBlurExtractor` as ``color-blur-multi``.

    ``PluginManager().add_plugin(TestPlugin(), "testing")`` makes it available
    to pipelines in tests.
    """

    __test__ = False  # not a pytest test class

    @hookimpl
    def register_extractors(self, register: Register) -> None:
        register("color-blur", ColorBlurExtractor)
        register("color-blur-multi", MultiColorBlurExtractor)


# -- the components of AllHooksPlugin --------------------------------------------------------


@dataclass
class FirstLayerMeanOptions:
    layer: str = opt("", "layer to average over timesteps; empty: the first")


class FirstLayerMean(Aggregator):
    """One layer averaged over timesteps: ``[C, H, W]``."""

    Options = FirstLayerMeanOptions

    def __init__(self, options: FirstLayerMeanOptions | None = None) -> None:
        self.options = options or FirstLayerMeanOptions()

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        name = self.options.layer or next(iter(features.layers))
        return features.layers[name].float().mean(dim=0)


class ScaledPointsMatcher(Matcher):
    """A query-conditioned stand-in: each point goes to the same relative place in the target.

    Declares ``needs_descriptors = False``, so a pipeline using it never extracts.
    """

    needs_descriptors = False

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        (sw, sh), (tw, th) = source.image_size, target.image_size
        scale = torch.tensor([tw / sw, th / sh], dtype=torch.float32)
        out = (points.float() + 0.5) * scale - 0.5
        n = len(points)
        return MatchResult(out, torch.ones(n), torch.ones(n, dtype=torch.bool))


@dataclass
class TinyPairsOptions:
    root: str = opt("", "folder of images; consecutive images (sorted) make a pair")
    split: str = opt("test", "ignored: one split")


class TinyPairs(Dataset):
    """Pairs of consecutive images of a folder with a 3 x 3 grid of corresponding points
    at the same relative positions (what :class:`ScaledPointsMatcher` finds)."""

    Options = TinyPairsOptions
    title = "Tiny pairs (diffeat.testing)"
    url = "any folder of images"
    layout = "images, any names, at least two"
    default_protocol = "dift"

    def pairs(self) -> Iterator[Pair]:
        files = list_images([self.root_dir()])
        for i, (src, tgt) in enumerate(pairwise(files)):
            (sw, sh), (tw, th) = load_image(src).size, load_image(tgt).size
            rel = np.array([(x, y) for y in (0.2, 0.5, 0.8) for x in (0.2, 0.5, 0.8)])
            yield Pair(
                id=f"{i:04d}",
                source=src,
                target=tgt,
                category="texture",
                source_points=rel * [sw, sh] - 0.5,
                target_points=rel * [tw, th] - 0.5,
                source_size=(sw, sh),
                target_size=(tw, th),
            )


@click.command("testing-hello")
@click.option("--name", default="world", help="Who to greet.")
def hello_command(name: str) -> None:
    """Print a greeting as JSON (registered by diffeat.testing's AllHooksPlugin)."""
    click.echo(json.dumps({"hello": name}))


#: What :class:`AllHooksPlugin` registers, by kind.
ALL_HOOKS_NAMES = {
    "extractor": "testing-blur",
    "aggregator": "testing-mean",
    "matcher": "testing-scaled",
    "dataset": "testing-pairs",
    "command": "testing-hello",
}


class AllHooksPlugin:
    """A third-party-style plugin implementing every hook (names in :data:`ALL_HOOKS_NAMES`).

    ``PluginManager(entry_points=False).add_plugin(AllHooksPlugin(), "all-hooks")``.
    """

    __test__ = False  # not a pytest test class

    @hookimpl
    def register_extractors(self, register: Register) -> None:
        register(ALL_HOOKS_NAMES["extractor"], ColorBlurExtractor)

    @hookimpl
    def register_aggregators(self, register: Register) -> None:
        register(ALL_HOOKS_NAMES["aggregator"], FirstLayerMean)

    @hookimpl
    def register_matchers(self, register: Register) -> None:
        register(ALL_HOOKS_NAMES["matcher"], ScaledPointsMatcher)

    @hookimpl
    def register_datasets(self, register: Register) -> None:
        register(ALL_HOOKS_NAMES["dataset"], TinyPairs)

    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        cli.add_command(hello_command)
