"""``diffeat generate``: images sampled by a generation-mode pipeline, features kept in the store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from clihelp import run, run_json

from diffeat.core.errors import DiffeatError
from diffeat.core.hookspecs import hookimpl
from diffeat.core.images import as_input
from diffeat.core.options import opt
from diffeat.core.pipeline import Pipeline
from diffeat.plugins.stable_diffusion.commands import generate_cmd
from diffeat.plugins.stable_diffusion.generation import GeneratedImage, generate_images
from diffeat.store import FeatureStore
from diffeat.testing import ColorBlurExtractor, ColorBlurOptions, smooth_texture

pytestmark = pytest.mark.slow


def write_config(path: Path, model: Path) -> Path:
    path.write_text(
        f"""
[extractor]
plugin = "stable-diffusion"
model = "{model}"
mode = "generation"
layers = ["up_blocks.*.resnets.*.conv2"]
timesteps = [800, 0]
inversion_steps = 5
image_size = [64, 64]
prompt = "a photo"
device = "cpu"

[aggregator]
plugin = "hyperfeatures"
projection_dim = 32
norm_groups = 8
size = [16, 16]
"""
    )
    return path


def test_generate_saves_images_and_stores_their_features(tiny_sd, tmp_path):
    cfg = write_config(tmp_path / "gen.toml", tiny_sd)
    store = tmp_path / "s.zarr"
    out = run_json(
        "generate", cfg, "--count", 2, "--seed", 3, "--out", tmp_path / "imgs", "--store", store
    )
    paths = [Path(item["image"]) for item in out["images"]]
    assert [p.name for p in paths] == ["a-photo-3.png", "a-photo-4.png"]
    fs = FeatureStore(store, mode="r")
    keys = fs.entries(out["cache_key"])
    assert sorted(keys) == sorted(as_input(p).key for p in paths)
    stored = fs.get(out["cache_key"], as_input(paths[0]).key)
    assert stored.timesteps == (800, 0)
    assert len(stored.layers) == 12
    # matching the generated images reads the stored maps (the extractor cannot extract them)
    res = run_json("match", cfg, paths[0], paths[1], "--point", "10,20", "--store", store)
    assert len(res["matches"]) == 1
    x, y = res["matches"][0]["target"]
    assert 0 <= x < 64 and 0 <= y < 64
    # different seeds give different images
    a, b = (np.asarray(as_input(p).image) for p in paths)
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)


def test_generate_needs_generation_mode(tiny_sd, tmp_path):
    cfg = write_config(tmp_path / "gen.toml", tiny_sd)
    proc = run(
        "generate", cfg, "--out", tmp_path / "imgs", "--set", 'extractor.mode="inversion"', check=2
    )
    assert "generation" in proc.stderr and "Traceback" not in proc.stderr


@dataclass
class PaintingOptions(ColorBlurOptions):
    prompt: str = opt("A photo, of a cat!", "what to paint")


class PaintingExtractor(ColorBlurExtractor):
    """A generating extractor without a model: a texture per seed, and its features."""

    Options = PaintingOptions

    def generate(self, seed: int):
        image = smooth_texture((64, 64), seed=seed)
        (features,) = self.extract([as_input(image)])
        return image, features


class PaintingPlugin:
    @hookimpl
    def register_extractors(self, register):
        register("painting", PaintingExtractor)


def pipeline_of(extractor: str, manager, store=None) -> Pipeline:
    data = {"extractor": {"plugin": extractor}, "aggregator": {"plugin": "select"}}
    return Pipeline.from_dict(data, store=store, manager=manager)


def test_generate_images_saves_names_and_stores(manager, tmp_path):
    manager.add_plugin(PaintingPlugin(), "painting")
    pipe = pipeline_of("painting", manager, FeatureStore(tmp_path / "s.zarr"))
    seen: list[GeneratedImage] = []
    made = generate_images(pipe, 2, 5, tmp_path / "imgs", on_image=seen.append)
    assert made == seen
    assert [(m.path.name, m.seed) for m in made] == [
        ("a-photo-of-a-cat-5.png", 5),
        ("a-photo-of-a-cat-6.png", 6),
    ]
    assert all(m.path.parent == tmp_path / "imgs" and m.path.is_file() for m in made)
    keys = sorted(as_input(m.path).key for m in made)
    assert sorted(FeatureStore(tmp_path / "s.zarr", mode="r").entries(pipe.cache_key)) == keys
    # without a store the images are saved and nothing else
    plain = generate_images(pipeline_of("painting", manager), 1, 0, tmp_path / "more")
    assert [m.path.name for m in plain] == ["a-photo-of-a-cat-0.png"]


def test_generate_images_needs_a_generating_extractor(manager, tmp_path):
    with pytest.raises(DiffeatError, match="'color-blur' cannot generate images"):
        generate_images(pipeline_of("color-blur", manager), 1, 0, tmp_path / "imgs")
    assert not (tmp_path / "imgs").exists()


def test_generate_command_prints_each_image_unless_quiet(manager, tmp_path):
    manager.add_plugin(PaintingPlugin(), "painting")
    cfg = tmp_path / "paint.toml"
    cfg.write_text('[extractor]\nplugin = "painting"\n[aggregator]\nplugin = "select"\n')

    @click.group()
    @click.option("--quiet", "-q", is_flag=True)
    @click.pass_context
    def root(ctx, quiet):
        ctx.obj = {"quiet": quiet}

    root.add_command(generate_cmd)
    args = ["generate", str(cfg), "--count", "2", "--prompt", "two cats", "--out"]
    out = CliRunner().invoke(root, [*args, str(tmp_path / "a")])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == [str(tmp_path / "a" / f"two-cats-{i}.png") for i in (0, 1)]
    quiet = CliRunner().invoke(root, ["-q", *args, str(tmp_path / "b")])
    assert quiet.exit_code == 0 and quiet.output == ""
    assert (tmp_path / "b" / "two-cats-1.png").is_file()
