"""``diffeat quickstart``: check an install in a minute, with no download.

Builds the tiny random-weight Stable Diffusion model of :mod:`diffeat.testing`
(the real diffusers layout and loading path, tiny channels) into a folder,
writes two test images (a smooth texture and a shifted crop of it) and a
DIFT-style pipeline file next to them, runs a real match between the images
and prints the matched points and the commands to try next. A second run
reuses the model and the feature store in the folder.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import click

from diffeat.cli.common import emit_json, is_quiet, open_store, store_dtype, store_dtype_option
from diffeat.core.errors import DiffeatError

#: Offset of the target image inside the source texture: a source point (x, y) shows the
#: same texture at (x - SHIFT[0], y - SHIFT[1]) in the target.
SHIFT = (16, 8)
SOURCE_SIZE = (128, 96)
TARGET_SIZE = (96, 80)
POINTS = ((40.0, 30.0), (64.0, 48.0), (90.0, 60.0))

PIPELINE_TOML = """\
# A DIFT-style pipeline (examples/dift-sd21.toml) sized for the tiny offline model
# that `diffeat quickstart` builds: {model_dir} has random weights, so matches
# show that everything runs, not what DIFT finds with a real checkpoint.
name = "quickstart-dift"

[extractor]
plugin = "stable-diffusion"
model = {model}
layers = ["up_blocks.1"]
timesteps = [261]
ensemble_size = 2
image_size = [128, 128]
prompt = ""
latent = "sample"
dtype = "float32"
device = "cpu"
seed = 0

[aggregator]
plugin = "select"

[matcher]
plugin = "nearest"
resolution = "image"
"""


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/diffeat/quickstart`` (``~/.cache/...`` without it; ``%LOCALAPPDATA%``
    on Windows)."""
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.environ.get("LOCALAPPDATA") if os.name == "nt" else None
    )
    root = Path(base) if base else Path.home() / ".cache"
    return root / "diffeat" / "quickstart"


@dataclass(frozen=True)
class QuickstartFiles:
    """What the quick start writes into its folder."""

    directory: Path

    @property
    def model(self) -> Path:
        return self.directory / "tiny-sd"

    @property
    def config(self) -> Path:
        return self.directory / "quickstart.toml"

    @property
    def source(self) -> Path:
        return self.directory / "source.png"

    @property
    def target(self) -> Path:
        return self.directory / "target.png"

    @property
    def store(self) -> Path:
        return self.directory / "features.zarr"

    @property
    def plot(self) -> Path:
        return self.directory / "matches.png"


def prepare(files: QuickstartFiles) -> bool:
    """Write the model (unless a complete one is there), the images and the pipeline file.

    Returns whether the model was built now.
    """
    from diffeat.testing import build_tiny_stable_diffusion, smooth_texture

    try:
        files.directory.mkdir(parents=True, exist_ok=True)
        built = not (files.model / "model_index.json").is_file()
        if built:
            build_tiny_stable_diffusion(files.model, vocabulary="tiny")
        w, h = SOURCE_SIZE
        texture = smooth_texture((w, h), seed=7, cells=5)
        texture.save(files.source)
        dx, dy = SHIFT
        tw, th = TARGET_SIZE
        texture.crop((dx, dy, dx + tw, dy + th)).save(files.target)
        # JSON string quoting is valid TOML for any path (backslashes included)
        files.config.write_text(
            PIPELINE_TOML.format(model=json.dumps(str(files.model)), model_dir=files.model.name)
        )
    except OSError as exc:
        raise DiffeatError(
            f"cannot write the quick start into {files.directory}: {exc}; "
            "pass another folder: diffeat quickstart DIR"
        ) from None
    return built


def next_commands(files: QuickstartFiles) -> list[str]:
    """The commands a user can run next, with this folder's paths filled in."""
    q = shlex.quote
    dtype = store_dtype()
    keep = f" --store-dtype {dtype}" if dtype != "float16" else ""
    cfg, src, tgt, model = (
        q(str(files.config)),
        q(str(files.source)),
        q(str(files.target)),
        q(str(files.model)),
    )
    return [
        f"diffeat match {cfg} {src} {tgt} --point 40,30 --plot {q(str(files.plot))}",
        f"diffeat layers {cfg}",
        f"diffeat config show {cfg}",
        f"diffeat extract {cfg} {src} {tgt} --store {q(str(files.store))}{keep} "
        f"&& diffeat store info {q(str(files.store))}",
        "# a real preset with the tiny model (any preset takes --model and --set):",
        f"diffeat match examples/dift-sd21.toml {src} {tgt} --point 40,30 --model {model} "
        "--set 'extractor.image_size=[128,128]' --set extractor.ensemble_size=2",
        "# a real checkpoint (downloads about 5 GB once; a GPU makes it seconds per image):",
        "diffeat match examples/dift-sd21.toml cat.jpg dog.jpg --point 120,88",
    ]


@click.command("quickstart")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@store_dtype_option
@click.pass_context
def quickstart_cmd(ctx: click.Context, directory: str | None, as_json: bool) -> None:
    """Check the install in a minute, offline: build a tiny random-weight Stable Diffusion
    model into DIRECTORY (default: ~/.cache/diffeat/quickstart), write two test images and a
    DIFT-style pipeline file, match points between the images and print the next commands."""
    from diffeat.core.config import load_config
    from diffeat.core.images import as_input
    from diffeat.core.pipeline import Pipeline

    files = QuickstartFiles(Path(directory) if directory else default_directory())
    quiet = is_quiet(ctx) or as_json
    if not quiet:
        click.echo(f"quick start in {files.directory}", err=True)
    built = prepare(files)
    if not quiet:
        what = "built the tiny offline model" if built else "reusing the tiny model"
        click.echo(f"{what}: {files.model}", err=True)
    pipe = Pipeline(load_config(files.config), store=open_store(str(files.store)))
    src, tgt = as_input(files.source), as_input(files.target)
    result = pipe.match(src, tgt, list(POINTS))
    plot: Path | None = files.plot
    try:
        from diffeat.viz import plot_matches

        plot_matches(
            src.image,
            tgt.image,
            list(POINTS),
            result.points.tolist(),
            files.plot,
            valid=result.valid.tolist(),
        )
    except (OSError, ValueError, ImportError):
        plot = None
    rows = []
    for (sx, sy), m in zip(POINTS, result.to_json()):
        rows.append({"source": [sx, sy], "expected": [sx - SHIFT[0], sy - SHIFT[1]], **m})
    commands = next_commands(files)
    if as_json:
        emit_json(
            {
                "directory": str(files.directory),
                "model": str(files.model),
                "config": str(files.config),
                "source": str(files.source),
                "target": str(files.target),
                "store": str(files.store),
                "plot": str(plot) if plot else None,
                "matches": rows,
                "next": [c for c in commands if not c.startswith("#")],
            }
        )
        return
    click.echo(f"matched {files.source.name} -> {files.target.name} with {files.config}:")
    for i, row in enumerate(rows, 1):
        sx, sy = row["source"]
        tx, ty = row["target"]
        ex, ey = row["expected"]
        click.echo(
            f"  {i}: ({sx:g}, {sy:g}) -> ({tx:g}, {ty:g})  score {row['score']:.4f}"
            f"  (same texture at ({ex:g}, {ey:g}))"
        )
    click.echo(
        "the model has random weights: this checks that everything runs, not DIFT's accuracy"
    )
    if plot:
        click.echo(f"plot: {plot}")
    click.echo("next:")
    for command in commands:
        click.echo(f"  {command}")


def add_to(cli: click.Group) -> None:
    cli.add_command(quickstart_cmd)
