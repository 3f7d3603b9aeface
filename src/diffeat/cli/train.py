"""``diffeat train``: fit a trainable aggregator (Diffusion Hyperfeatures) on a dataset's pairs."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from typing import TYPE_CHECKING

import click

from diffeat.cli.common import (
    collect_overrides,
    config_options,
    emit_json,
    is_quiet,
    open_store,
    store_dtype,
    store_dtype_option,
)
from diffeat.cli.datasets_common import dataset_option
from diffeat.core.errors import ConfigError

if TYPE_CHECKING:
    from diffeat.train.loop import TrainReport
    from diffeat.train.progress import Bar, ProgressFactory

NO_VALIDATION = ("none", "")


def _bars(quiet: bool) -> ProgressFactory:
    from tqdm import tqdm

    def make(*, total: int, desc: str, unit: str = "it", initial: int = 0) -> Bar:
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            disable=quiet,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    return make


def _summary(report: TrainReport) -> str:
    done = f"{report.steps} steps"
    if report.resumed:
        done += f" (resumed from step {report.start_step})"
    text = f"trained {done} on {report.pairs} pairs in {report.seconds:.1f} s"
    loss = report.final_loss()
    if loss is not None:
        text += f"; loss {loss:.4f}"
    best = report.best or {}
    if report.metric and best.get("value") is not None:
        kind = report.metric.removeprefix("pck_")
        text += (
            f"; best validation PCK@{best.get('alpha', '')} ({kind}) {100 * best['value']:.2f}% "
            f"at step {best['step']}"
        )
    return text + f" -> {report.out} (resume state: {report.last})"


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--dataset", "dataset_name", required=True, help="Dataset plugin (see `diffeat datasets`)."
)
@click.option("--root", required=True, type=click.Path(), help="The dataset's folder.")
@click.option("--split", default="trn", show_default=True, help="Split of the training pairs.")
@click.option(
    "--val-split",
    default="val",
    show_default=True,
    help="Split of the validation pairs ('none': no validation; the last step is kept).",
)
@dataset_option("A dataset option for both splits, e.g. -o categories=[cat] (repeatable).")
@click.option(
    "--store",
    "store_path",
    required=True,
    type=click.Path(),
    help="Feature store folder: features are read from it (and extracted into it).",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Best checkpoint (e.g. aggnet.safetensors); the resume state goes next to it "
    "(aggnet.last.safetensors).",
)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override [train] steps.")
@click.option("--restart", is_flag=True, help="Start over, replacing an existing resume state.")
@click.option(
    "--no-extract",
    is_flag=True,
    help="Fail (listing them) instead of extracting images whose features are not stored.",
)
@store_dtype_option
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def train_cmd(
    ctx: click.Context,
    config: str,
    dataset_name: str,
    root: str,
    split: str,
    val_split: str,
    dataset_options: tuple[str, ...],
    store_path: str,
    out_path: str,
    steps: int | None,
    restart: bool,
    no_extract: bool,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Train the aggregator of CONFIG (plugin "hyperfeatures") on a dataset's keypoint pairs.

    Options come from the pipeline's [train] table (override with --set train.OPTION=VALUE).
    A killed run resumes from OUT.last.safetensors when rerun with the same arguments.
    """
    from diffeat.cli.datasets_common import dataset_from_cli, extract_command
    from diffeat.core.config import load_config
    from diffeat.core.pipeline import Pipeline
    from diffeat.train.loop import train, trainable_aggregator, training_stage
    from diffeat.train.options import train_options

    quiet = is_quiet(ctx)
    all_overrides = collect_overrides(overrides, model, device)
    if device:
        all_overrides.append(f"train.device={json.dumps(device)}")
    cfg = load_config(config, all_overrides)
    options = train_options(cfg.train, config)
    if steps is not None:
        options = dataclasses.replace(options, steps=steps)
    pipe = Pipeline(cfg, store=open_store(store_path))
    aggregator = trainable_aggregator(pipe)  # refuse an untrainable pipeline before any dataset

    train_pairs = list(dataset_from_cli(dataset_name, root, split, dataset_options).pairs())
    if not train_pairs:
        raise ConfigError(
            f"the {dataset_name} dataset has no pairs in split {split!r} (check --split, -o)"
        )
    validating = val_split.lower() not in NO_VALIDATION
    val_pairs = (
        list(dataset_from_cli(dataset_name, root, val_split, dataset_options).pairs())
        if validating
        else []
    )
    extractor_overrides = [o for o in all_overrides if o.strip().startswith("extractor.")]
    commands = [
        extract_command(
            config,
            dataset=dataset_name,
            root=root,
            split=s,
            options=dataset_options,
            store=store_path,
            overrides=extractor_overrides,
            store_dtype=store_dtype(),
        )
        for s in ([split, val_split] if validating and val_split != split else [split])
    ]
    hint = "Extract them first with: " + " ; ".join(commands) + " (or drop --no-extract)"

    report = train(
        pipe,
        train_pairs,
        val_pairs,
        options,
        out_path,
        progress=_bars(quiet),
        restart=restart,
        extract=not no_extract,
        missing_hint=hint,
        log=lambda msg: click.echo(msg, err=True),
    )
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(_summary(report))
    if not training_stage(cfg.aggregator, report.out, aggregator)[
        1
    ]:  # the config does not name OUT yet
        click.echo(
            f"use it: diffeat eval {shlex.quote(config)} "
            f"--set aggregator.{aggregator.checkpoint_option}={shlex.quote(str(report.out))} ...",
            err=True,
        )


def add_to(cli: click.Group) -> None:
    cli.add_command(train_cmd)
