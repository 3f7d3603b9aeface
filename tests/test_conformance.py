"""Every registered built-in component under its conformance suite, on tiny models.

As timm tests every registered model: each built-in extractor (the
``stable-diffusion`` extractor in every mode) has a tiny-model builder here,
and a registered built-in without one fails the suite, so a new extractor
cannot escape conformance. Aggregators and matchers are checked the same way;
datasets on data written here. The meta-tests at the end tie the hookspecs to
the test plugin that implements all of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from diffeat.core import hookspecs
from diffeat.core.components import (
    Extractor,
    is_fusing,
    is_generating,
    is_pair_fusing,
    is_trainable,
)
from diffeat.core.options import build_options
from diffeat.core.pipeline import Pipeline
from diffeat.core.plugins import PluginManager, reset_plugin_manager
from diffeat.testing import AllHooksPlugin, smooth_texture
from diffeat.testing.conformance import (
    AggregatorConformance,
    DatasetConformance,
    MatcherConformance,
    check_aggregator,
    check_dataset,
    check_extractor,
    check_matcher,
    default_images,
)
from diffeat.testing.plugins import ALL_HOOKS_NAMES, FirstLayerMean, ScaledPointsMatcher, TinyPairs

BUILTINS = PluginManager(entry_points=False)


def builtin_names(kind: str) -> list[str]:
    """Names of ``kind`` registered by diffeat's built-in plugins."""
    return sorted(
        name
        for name, reg in BUILTINS.registry[kind].items()
        if BUILTINS.records[reg.plugin].origin == "builtin"
    )


def build(kind: str, name: str, values: dict[str, Any]) -> Any:
    """The registered component ``name`` with validated options (as a pipeline file builds it)."""
    factory = BUILTINS.get(kind, name).factory
    return factory(build_options(factory, values, f"{kind} {name}"))


# -- extractors: one tiny builder per registered extractor and mode ---------------------------


@dataclass
class TinyExtractor:
    """How to build one registered extractor on a tiny model: the session fixture holding
    the model, the options (given the fixture's value) and what to check."""

    fixture: str
    options: Callable[[Any], dict[str, Any]]
    extracts: bool = True
    generates: bool = False
    #: how many of the default images (two: 80 x 60 and 48 x 64) to extract
    images: int = 2
    marks: list[Any] = field(default_factory=list)


SD = {"image_size": [64, 64], "device": "cpu", "layers": ["up_blocks.1", "up_blocks.2"]}

TINY_EXTRACTORS: dict[str, dict[str, TinyExtractor]] = {
    "diffusion-transformer": {
        "flux": TinyExtractor(
            "tiny_flux_model",
            lambda m: {
                "model": str(m),
                "device": "cpu",
                "layers": ["transformer_blocks.1", "single_transformer_blocks.0"],
                "timesteps": [260],
                "ensemble_size": 2,
                "image_size": [64, 48],
            },
            images=1,
        ),
    },
    "adm": {
        "dift": TinyExtractor(
            "tiny_adm_model",
            lambda m: {
                "model": str(m),
                "device": "cpu",
                "layers": ["output_blocks.4", "output_blocks.11"],
                "timesteps": [101, 41],
                "ensemble_size": 2,
                "image_size": [64, 64],
            },
            images=1,
        ),
    },
    "stable-diffusion": {
        "add-noise": TinyExtractor(
            "tiny_sd",
            lambda m: {**SD, "model": str(m), "timesteps": [261, 501], "ensemble_size": 2},
            images=1,
        ),
        "inversion": TinyExtractor(
            "tiny_sd",
            lambda m: {
                **SD,
                "model": str(m),
                "mode": "inversion",
                "timesteps": [-1, 0],
                "inversion_steps": 2,
                "ensemble_size": 1,
                "latent": "mean",
            },
            images=1,
        ),
        "generation": TinyExtractor(
            "tiny_sd",
            lambda m: {
                **SD,
                "model": str(m),
                "mode": "generation",
                "timesteps": [500],
                "inversion_steps": 2,
                "ensemble_size": 1,
            },
            extracts=False,
            generates=True,
        ),
        "clean": TinyExtractor(
            "tiny_sd",
            lambda m: {**SD, "model": str(m), "mode": "clean", "ensemble_size": 1},
            images=1,
        ),
    },
    "dino": {
        "blocks": TinyExtractor(
            "tiny_dino_model",
            lambda m: {"model": str(m), "device": "cpu", "blocks": [0, -1], "image_size": [48, 40]},
        ),
    },
    "dinov2": {
        "query": TinyExtractor(
            "tiny_dinov2_model",
            lambda m: {"model": str(m), "device": "cpu", "facet": "query", "image_size": [42, 56]},
        ),
    },
    "openclip": {
        "pad": TinyExtractor(
            "tiny_openclip_model",
            lambda files: {
                "model": files[0],
                "pretrained": files[1],
                "device": "cpu",
                "size_rule": "pad",
                "image_size": [40, 32],
            },
        ),
    },
}


def _extractor_cases() -> list[Any]:
    cases = []
    for name in builtin_names("extractor"):
        variants = TINY_EXTRACTORS.get(name) or {"<missing>": None}
        for variant, spec in variants.items():
            marks = spec.marks if spec is not None else []
            cases.append(pytest.param(name, variant, id=f"{name}[{variant}]", marks=marks))
    return cases


def test_every_builtin_extractor_has_a_tiny_builder() -> None:
    missing = sorted(set(builtin_names("extractor")) - set(TINY_EXTRACTORS))
    assert not missing, f"registered extractors without a tiny builder in this file: {missing}"
    stale = sorted(set(TINY_EXTRACTORS) - set(builtin_names("extractor")))
    assert not stale, f"tiny builders for extractors no longer registered: {stale}"


def test_every_stable_diffusion_mode_is_under_conformance() -> None:
    from typing import get_args, get_type_hints

    factory = BUILTINS.get("extractor", "stable-diffusion").factory
    modes = set(get_args(get_type_hints(factory.Options)["mode"]))
    assert modes == set(TINY_EXTRACTORS["stable-diffusion"])


@pytest.mark.parametrize(("name", "variant"), _extractor_cases())
def test_extractor_conformance(name: str, variant: str, request: pytest.FixtureRequest) -> None:
    spec = TINY_EXTRACTORS.get(name, {}).get(variant)
    if spec is None:
        pytest.fail(f"extractor {name!r} is registered but has no tiny builder in {__file__}")
    model = request.getfixturevalue(spec.fixture)
    values = spec.options(model)

    def make() -> Extractor:
        return build("extractor", name, values)

    images = default_images()[: spec.images]
    check_extractor(make, images, extracts=spec.extracts, generates=spec.generates)
    assert is_generating(make()) == spec.generates  # the capability is declared truthfully


def test_generation_mode_refuses_given_images(tiny_sd: Path) -> None:
    """The one mode that does not extract says so (a user error, not a crash)."""
    from diffeat.core.errors import DiffeatError

    spec = TINY_EXTRACTORS["stable-diffusion"]["generation"]
    ex = build("extractor", "stable-diffusion", spec.options(tiny_sd))
    with pytest.raises(DiffeatError, match="generate"):
        ex.extract(default_images()[:1])


# -- aggregators and matchers: every registered one, on ColorBlur features --------------------

AGGREGATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "select": {},
    "mean": {},
    "concat": {},
    "fuse": {"pca_dim": 2},
    "hyperfeatures": {"projection_dim": 8, "norm_groups": 2, "size": [16, 16], "device": "cpu"},
}
#: capabilities a built-in must declare (checked with the core's capability checks)
AGGREGATOR_CAPABILITIES: dict[str, Callable[[object], bool]] = {
    "fuse": is_pair_fusing,
    "hyperfeatures": is_trainable,
}


@pytest.mark.parametrize("name", builtin_names("aggregator"))
def test_aggregator_conformance(name: str, tmp_path: Path) -> None:
    assert name in AGGREGATOR_OPTIONS, f"aggregator {name!r} has no test options in {__file__}"
    check_aggregator(lambda: build("aggregator", name, AGGREGATOR_OPTIONS[name]), tmp=tmp_path)


@pytest.mark.parametrize("name", sorted(AGGREGATOR_CAPABILITIES))
def test_aggregator_declares_its_capability(name: str) -> None:
    aggregator = build("aggregator", name, AGGREGATOR_OPTIONS[name])
    assert AGGREGATOR_CAPABILITIES[name](aggregator)
    assert is_fusing(aggregator) == (name == "fuse")


MATCHER_OPTIONS: dict[str, dict[str, Any]] = {
    "nearest": {},
    "mutual": {},
    "soft-argmax": {"window": 3},
    "cross-attention": {},
}
#: matchers that own a model: their conformance check runs where the model fixture is used
MATCHER_CHECKED_ELSEWHERE = {
    "cross-attention": "needs the tiny SD model; checked in tests/test_cross_attention.py",
}


@pytest.mark.parametrize("name", builtin_names("matcher"))
def test_matcher_conformance(name: str) -> None:
    assert name in MATCHER_OPTIONS, f"matcher {name!r} has no test options in {__file__}"
    if name in MATCHER_CHECKED_ELSEWHERE:
        pytest.skip(MATCHER_CHECKED_ELSEWHERE[name])
    check_matcher(lambda: build("matcher", name, MATCHER_OPTIONS[name]))


# -- datasets: the SPair-layout loaders on a synthetic benchmark written here ------------------


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffeat.plugins.datasets.synthetic import make_synthetic

    src = tmp_path_factory.mktemp("photos")
    for i in range(2):
        smooth_texture((64 + 16 * i, 48), seed=i).save(src / f"p{i}.png")
    out = tmp_path_factory.mktemp("synthetic") / "bench"
    make_synthetic(out, [src], pairs=3, points=5, kinds=["identity", "flip", "homography"])
    return out


@pytest.mark.parametrize("name", ["synthetic", "spair"])
def test_dataset_conformance(name: str, synthetic_root: Path) -> None:
    check_dataset(build("dataset", name, {"root": str(synthetic_root)}))


# -- the mixins, as a plugin author uses them ----------------------------------------------------


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    for i, size in enumerate([(64, 48), (48, 64), (56, 56)]):
        smooth_texture(size, seed=i).save(root / f"im{i}.png")
    return root


class TestFirstLayerMeanConformance(AggregatorConformance):
    def make_aggregator(self) -> FirstLayerMean:
        return FirstLayerMean()


class TestScaledPointsConformance(MatcherConformance):
    def make_matcher(self) -> ScaledPointsMatcher:
        return ScaledPointsMatcher()


class TestTinyPairsConformance(DatasetConformance):
    @pytest.fixture(autouse=True)
    def _root(self, pair_folder: Path) -> None:
        self.root = pair_folder

    def make_dataset(self) -> TinyPairs:
        return TinyPairs(TinyPairs.Options(root=str(self.root)))


# -- meta-tests: every hookspec documented and exercised ------------------------------------------


def hookspec_names() -> set[str]:
    """The hooks of the plugin API: every function marked with ``@hookspec``."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {name for name, obj in vars(hookspecs).items() if hasattr(obj, marker)}


def test_hookspecs_found() -> None:
    assert {"register_extractors", "register_commands"} <= hookspec_names()


def test_all_hooks_plugin_implements_every_hookspec() -> None:
    marker = f"{hookspecs.PROJECT}_impl"
    implemented = {
        name for name in dir(AllHooksPlugin) if hasattr(getattr(AllHooksPlugin, name), marker)
    }
    missing = hookspec_names() - implemented
    assert not missing, f"diffeat.testing.AllHooksPlugin implements no {sorted(missing)}"


@pytest.fixture
def all_hooks() -> PluginManager:
    """The built-ins plus :class:`AllHooksPlugin`, as the process-wide manager."""
    pm = PluginManager(entry_points=False)
    record = pm.add_plugin(AllHooksPlugin(), "all-hooks")
    assert record.ok, record.error
    reset_plugin_manager(pm)
    yield pm
    reset_plugin_manager(None)


@pytest.fixture
def root_cli(all_hooks: PluginManager) -> click.Group:
    """The real ``diffeat`` group with every command, as ``main()`` assembles it (plugin
    commands from the process-wide manager, here with :class:`AllHooksPlugin`)."""
    from diffeat.cli import main

    main._add_commands()
    yield main.cli
    main.cli.commands.pop(ALL_HOOKS_NAMES["command"], None)


def test_all_hooks_plugin_registers_every_kind(all_hooks: PluginManager) -> None:
    provides = set(all_hooks.records["all-hooks"].provides)
    for kind in ("extractor", "aggregator", "matcher", "dataset"):
        assert f"{kind}:{ALL_HOOKS_NAMES[kind]}" in provides
        assert all_hooks.get(kind, ALL_HOOKS_NAMES[kind]).plugin == "all-hooks"


def test_registered_dataset_is_listed_and_readable(
    root_cli: click.Group, pair_folder: Path
) -> None:
    from diffeat.cli.datasets_common import dataset_from_cli

    name = ALL_HOOKS_NAMES["dataset"]
    result = CliRunner().invoke(root_cli, ["datasets", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)["datasets"]}
    assert rows[name]["plugin"] == "all-hooks"
    assert [o["name"] for o in rows[name]["options"]] == ["root", "split"]
    pairs = check_dataset(dataset_from_cli(name, str(pair_folder), None, ()))
    assert len(pairs) == 2


def test_registered_components_build_from_a_toml_pipeline(
    all_hooks: PluginManager, tmp_path: Path
) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(
        f"""
[extractor]
plugin = "{ALL_HOOKS_NAMES["extractor"]}"
image_size = [32, 24]
stride = 2

[aggregator]
plugin = "{ALL_HOOKS_NAMES["aggregator"]}"

[matcher]
plugin = "nearest"
"""
    )
    pipe = Pipeline.from_file(config, manager=all_hooks)
    assert isinstance(pipe.aggregator, FirstLayerMean)
    a, b = smooth_texture((64, 48), seed=0), smooth_texture((64, 48), seed=0)
    result = pipe.match(a, b, [(10, 10), (40, 30)])
    assert result.points.shape == (2, 2)
    assert (result.points - result.points.new_tensor([[10, 10], [40, 30]])).abs().max() <= 2


def test_registered_query_conditioned_matcher_skips_extraction(
    all_hooks: PluginManager, tmp_path: Path
) -> None:
    from diffeat.testing import ColorBlurExtractor

    config = tmp_path / "pipeline.toml"
    config.write_text(
        f'[extractor]\nplugin = "{ALL_HOOKS_NAMES["extractor"]}"\n\n'
        f'[aggregator]\nplugin = "{ALL_HOOKS_NAMES["aggregator"]}"\n\n'
        f'[matcher]\nplugin = "{ALL_HOOKS_NAMES["matcher"]}"\n'
    )
    pipe = Pipeline.from_file(config, manager=all_hooks)
    before = ColorBlurExtractor.calls
    result = pipe.match(smooth_texture((40, 20)), smooth_texture((80, 40)), [(9.5, 4.5)])
    assert ColorBlurExtractor.calls == before
    assert result.points.tolist() == [[19.5, 9.5]]


def test_registered_command_runs_on_the_root_group(root_cli: click.Group) -> None:
    name = ALL_HOOKS_NAMES["command"]
    assert name in root_cli.commands
    result = CliRunner().invoke(root_cli, [name, "--name", "plugin"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"hello": "plugin"}
