from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diffeat.core.config import load_config, parse_config, to_toml
from diffeat.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipe.toml"
    p.write_text(text)
    return p


def test_examples_resolve(manager):
    for path in EXAMPLES.glob("*.toml"):
        cfg = load_config(path, manager=manager)
        assert all(stage.plugin in manager.names("extractor") for stage in cfg.extractors)
        assert len(cfg.digest()) == 64


def test_dift_preset_matches_methods(manager):
    ex = load_config(EXAMPLES / "dift-sd21.toml", manager=manager).resolved()["extractor"]
    assert ex["model"] == "stabilityai/stable-diffusion-2-1"
    assert ex["timesteps"] == [261]
    assert ex["layers"] == ["up_blocks.1"]
    assert ex["ensemble_size"] == 8
    assert ex["image_size"] == [768, 768]
    assert ex["latent"] == "sample"
    assert ex["dtype"] == "float32"
    assert ex["prompt"] == ""
    geo = load_config(EXAMPLES / "dift-sd21-geometric.toml", manager=manager).resolved()
    assert geo["extractor"]["timesteps"] == [0] and geo["extractor"]["layers"] == ["up_blocks.2"]
    assert geo["matcher"]["plugin"] == "mutual"


def test_defaults_filled_and_stable_digest(tmp_path, manager):
    p = write(tmp_path, '[extractor]\nplugin = "color-blur"\n')
    a = load_config(p, manager=manager)
    assert a.resolved() == {
        "extractor": {
            "plugin": "color-blur",
            "image_size": [64, 64],
            "sigmas": [0.0, 2.0, 4.0],
            "stride": 1,
        },
        "aggregator": {"plugin": "select", "layer": "", "timestep_index": 0},
        "matcher": {
            "plugin": "nearest",
            "resolution": "image",
            "points": "centres",
            "input_size": [],
        },
    }
    b = load_config(
        write(tmp_path, '[extractor]\nplugin = "color-blur"\nstride = 1\n'), manager=manager
    )
    assert a.digest() == b.digest()
    c = load_config(p, ["extractor.stride=2"], manager=manager)
    assert c.digest() != a.digest() and c.resolved()["extractor"]["stride"] == 2


def test_unknown_key_names_key_and_valid_ones(tmp_path, manager):
    p = write(tmp_path, '[extractor]\nplugin = "color-blur"\nstrid = 2\n')
    with pytest.raises(ConfigError) as err:
        load_config(p, manager=manager)
    msg = str(err.value)
    assert (
        "'strid'" in msg and "did you mean 'stride'" in msg and "image_size, sigmas, stride" in msg
    )
    assert str(p) in msg


def test_unknown_plugin_lists_installed(tmp_path, manager):
    with pytest.raises(
        ConfigError, match=r"unknown matcher plugin 'nearst'.*Did you mean 'nearest'.*mutual"
    ):
        load_config(
            write(tmp_path, '[extractor]\nplugin = "color-blur"\n[matcher]\nplugin = "nearst"\n'),
            manager=manager,
        )


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('[extractor]\nplugin = "color-blur"\nstride = "two"\n', "expected int"),
        (
            '[extractor]\nplugin = "stable-diffusion"\nlatent = "median"\n',
            "one of 'sample', 'mean'",
        ),
        ('[extractor]\nplugin = "stable-diffusion"\nimage_size = [100, 100]\n', "multiples of 8"),
        (
            '[extractor]\nplugin = "color-blur"\n[matcher]\nplugin = "soft-argmax"\nwindow = 4\n',
            "odd",
        ),
        ('[extractor]\nplugin = "color-blur"\n[extra]\nx = 1\n', "unknown top-level key 'extra'"),
        ('[aggregator]\nplugin = "select"\n', "missing [extractor]"),
        ("[extractor\n", "invalid TOML"),
    ],
)
def test_bad_configs(tmp_path, manager, body, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, body), manager=manager)
    assert fragment in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /nonexistent.toml"):
        load_config("/nonexistent.toml")


def test_bad_override(manager):
    with pytest.raises(ConfigError, match="STAGE.OPTION=VALUE"):
        load_config(EXAMPLES / "dift-sd21.toml", ["timesteps=3"], manager=manager)


def test_override_bare_string_and_toml_roundtrip(manager, tmp_path):
    cfg = load_config(
        EXAMPLES / "dift-sd21.toml", ["extractor.model=/some/folder"], manager=manager
    )
    assert cfg.resolved()["extractor"]["model"] == "/some/folder"
    text = to_toml(cfg.resolved())
    again = load_config(write(tmp_path, text), manager=manager)
    assert again.digest() == cfg.digest()


def test_config_is_data_not_code(manager):
    # a string that looks like code stays a string
    cfg = parse_config(
        {"extractor": {"plugin": "stable-diffusion", "prompt": "__import__('os').system('x')"}},
        manager=manager,
    )
    assert cfg.resolved()["extractor"]["prompt"].startswith("__import__")


def test_config_reference_is_up_to_date():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tools" / "gen_config_docs.py"), "--check"])
    assert proc.returncode == 0, "docs/config.md is stale: run python tools/gen_config_docs.py"


def test_if_set_options_enter_the_cache_key_only_when_set():
    from dataclasses import dataclass

    from diffeat.core.options import opt, options_dict

    @dataclass
    class Options:
        size: int = opt(8, "an original option")
        added: str = opt("old", "added later; the default is the old behaviour", cache="if-set")
        device: str = opt("cpu", "not result-affecting", cache=False)

    assert options_dict(Options(), cache_only=True) == {"size": 8}
    assert options_dict(Options(added="new"), cache_only=True) == {"size": 8, "added": "new"}
    assert options_dict(Options(), cache_only=False) == {"size": 8, "added": "old", "device": "cpu"}


def test_stable_diffusion_cache_fields_at_defaults_are_the_original_ones(manager):
    """Options added after the first release (mode, tiles, ...) keep earlier stores' keys."""
    from diffeat.core.options import options_dict

    cfg = load_config(EXAMPLES / "dift-sd21.toml", manager=manager)
    assert sorted(options_dict(cfg.extractor.options, cache_only=True)) == [
        "dtype",
        "ensemble_size",
        "image_size",
        "latent",
        "layers",
        "model",
        "prompt",
        "resample",
        "revision",
        "seed",
        "timesteps",
    ]
    inv = load_config(EXAMPLES / "hyperfeatures-sd15.toml", manager=manager)
    assert options_dict(inv.extractor.options, cache_only=True)["mode"] == "inversion"


WEIRD_PROMPT = 'a photo of a 🐈‍⬛ "cat" at C:\\temp\\x\ttab\nnew line \x01 ünïcödé'
# as TOML would take it on the command line (JSON escapes all but DEL the TOML way)
PROMPT_OVERRIDE = "extractor.prompt=" + json.dumps(WEIRD_PROMPT, ensure_ascii=False)


def test_toml_writes_emoji_quotes_and_backslashes_that_read_back(tmp_path, manager):
    cfg = load_config(
        EXAMPLES / "dift-sd21.toml",
        [PROMPT_OVERRIDE],
        manager=manager,
    )
    assert cfg.resolved()["extractor"]["prompt"] == WEIRD_PROMPT
    text = to_toml(cfg.resolved())
    assert "🐈" in text and "\\ud83d" not in text  # the character itself, not JSON's surrogates
    assert tomllib.loads(text)["extractor"]["prompt"] == WEIRD_PROMPT
    again = load_config(write(tmp_path, text), manager=manager)
    assert again.resolved() == cfg.resolved() and again.digest() == cfg.digest()


def test_toml_writes_keys_and_inline_tables_toml_can_read():
    data = {"a": {"plain": 1, "odd key é": "x\x7f", "table": {"k": [1.5, "🙂"], "": {}}}}
    assert tomllib.loads(to_toml(data)) == data
    with pytest.raises(ConfigError, match="lone surrogate"):
        to_toml({"a": {"s": "\ud800"}})


def test_config_show_output_loads_as_the_same_pipeline(tmp_path, manager):
    from clihelp import run

    source = tmp_path / "emoji.toml"
    source.write_text((EXAMPLES / "dift-sd21.toml").read_text(), encoding="utf-8")
    proc = run("config", "show", source, "--set", PROMPT_OVERRIDE)
    shown = tmp_path / "shown.toml"
    shown.write_text(proc.stdout, encoding="utf-8")
    again = load_config(shown, manager=manager)
    original = load_config(source, [PROMPT_OVERRIDE], manager=manager)
    assert again.resolved()["extractor"]["prompt"] == WEIRD_PROMPT
    assert again.resolved() == original.resolved() and again.digest() == original.digest()


def test_task_tables_kept_raw_overridable_and_in_the_resolved_config(manager, tmp_path):
    body = (
        '[extractor]\nplugin = "color-blur"\n[propagation]\ntemperature = 0.2\ntopk = 15\n'
        '[homography]\nmethod = "lmeds"\n'
    )
    path = tmp_path / "p.toml"
    path.write_text(body)
    cfg = load_config(path, ["propagation.temperature=0.1"], manager=manager)
    assert cfg.tasks == {
        "propagation": {"temperature": 0.1, "topk": 15},
        "homography": {"method": "lmeds"},
    }
    resolved = cfg.resolved()
    assert resolved["propagation"]["temperature"] == 0.1
    assert resolved["homography"] == {"method": "lmeds"}
    with pytest.raises(ConfigError, match=r"\[propagation\] must be a table"):
        parse_config({"extractor": {"plugin": "color-blur"}, "propagation": 3}, manager=manager)


def test_model_and_device_reach_a_matcher_that_owns_its_model(manager):
    from diffeat.cli.common import collect_overrides

    preset = EXAMPLES / "hedlin-sd14.toml"
    cfg = load_config(preset, collect_overrides((), "/models/sd", "cpu"), manager=manager)
    assert cfg.extractors == []  # the preset has no [extractor]: the matcher works on images
    assert cfg.matcher.options.model == "/models/sd"
    assert cfg.matcher.options.device == "cpu"
    assert "extractor" not in cfg.resolved()
    with pytest.raises(ConfigError, match=r"no \[extractor\].*cross-attention"):
        _ = cfg.extractor
    # a descriptor pipeline: --model goes to the extractor only (nearest has no model option)
    dift = load_config(
        EXAMPLES / "dift-sd21.toml", collect_overrides((), "/m", "cpu"), manager=manager
    )
    assert dift.extractor.options.model == "/m" and dift.extractor.options.device == "cpu"


def test_extractor_still_required_for_a_descriptor_matcher(manager):
    with pytest.raises(ConfigError, match=r"missing \[extractor\] table"):
        parse_config({"matcher": {"plugin": "nearest"}}, manager=manager)


def test_device_goes_to_every_extractor_of_a_multi_extractor_pipeline(manager):
    from diffeat.cli.common import collect_overrides

    cfg = load_config(
        EXAMPLES / "sd-dino.toml", collect_overrides((), None, "cuda"), manager=manager
    )
    assert [e.options.device for e in cfg.extractors] == ["cuda", "cuda"]
    with pytest.raises(ConfigError, match="several extractors"):
        load_config(EXAMPLES / "sd-dino.toml", collect_overrides((), "/m", None), manager=manager)
