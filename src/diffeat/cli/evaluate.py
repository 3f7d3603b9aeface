"""``diffeat eval`` (PCK on a benchmark) and ``diffeat datasets`` (list, make-synthetic)."""

from __future__ import annotations

import itertools
import sys
from typing import Any

import click

from diffeat.cli.common import (
    collect_overrides,
    config_options,
    emit_json,
    is_quiet,
    open_reuse_store,
    store_option,
)
from diffeat.cli.datasets_common import (  # noqa: F401  (build_dataset: imported from here before)
    build_dataset,
    dataset_from_cli,
    dataset_option,
    parse_dataset_options,
)
from diffeat.core.errors import DiffeatError

THRESHOLD_CHOICES = (
    "bbox-target",
    "bbox-source",
    "img",
    "kps-target",
    "kps-source",
    "kps-target-padded",
    "bbox-target-wscale",
)


def parse_alphas(values: tuple[str, ...]) -> tuple[float, ...]:
    """``("0.05,0.1", "0.2")`` -> ``(0.05, 0.1, 0.2)``, with a clear error otherwise."""
    out: list[float] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                alpha = float(part)
            except ValueError:
                raise DiffeatError(f"bad --alpha {part!r}: expected a number such as 0.1") from None
            if not alpha > 0:
                raise DiffeatError(f"bad --alpha {part!r}: alpha must be positive")
            out.append(alpha)
    return tuple(out)


@click.command("eval")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--dataset", "dataset_name", required=True, help="Dataset plugin (see `diffeat datasets`)."
)
@click.option("--root", required=True, type=click.Path(), help="The benchmark's folder.")
@click.option("--split", default=None, help="Split (default: the dataset's, usually test).")
@dataset_option(
    "A dataset option, e.g. -o pairs_per_class=20 (repeatable; see `diffeat datasets`)."
)
@store_option
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Write results.json, results.md and plots here.",
)
@click.option(
    "--protocol",
    "protocol_name",
    default=None,
    help="PCK protocol preset (default: the config's `protocol`, else the dataset's).",
)
@click.option(
    "--alpha",
    "alphas",
    multiple=True,
    metavar="A[,A...]",
    help="PCK alpha(s), replacing the protocol's (repeatable).",
)
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    type=click.Choice(THRESHOLD_CHOICES),
    help="Reference length(s), replacing the protocol's (repeatable).",
)
@click.option(
    "--comparison",
    type=click.Choice(["<=", "<"]),
    default=None,
    help="Correct if distance <= or < alpha * T.",
)
@click.option(
    "--frame",
    type=click.IntRange(min=0),
    default=None,
    metavar="S",
    help="Measure distances and thresholds in each image squashed to S x S (0: its own pixels).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")
@click.option("--no-plots", is_flag=True, help="Do not draw plots into --out.")
@config_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print the results (without per-pair records) as JSON."
)
@click.pass_context
def eval_cmd(
    ctx: click.Context,
    config: str,
    dataset_name: str,
    root: str,
    split: str | None,
    dataset_options: tuple[str, ...],
    store_path: str | None,
    out_dir: str | None,
    protocol_name: str | None,
    alphas: tuple[str, ...],
    thresholds: tuple[str, ...],
    comparison: str | None,
    frame: int | None,
    limit: int | None,
    no_plots: bool,
    overrides: tuple[str, ...],
    model: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Evaluate the pipeline in CONFIG on a benchmark: PCK per category, results, plots."""
    from tqdm import tqdm

    from diffeat.core.config import load_config
    from diffeat.core.datasets import card_of
    from diffeat.core.pipeline import Pipeline
    from diffeat.eval.protocols import get_protocol
    from diffeat.eval.report import results_dict, terminal_report, write_outputs
    from diffeat.eval.runner import evaluate

    dataset = dataset_from_cli(dataset_name, root, split, dataset_options)
    cfg = load_config(config, collect_overrides(overrides, model, device))
    task = card_of(dataset).task
    if task != "pairs":
        _eval_task(
            ctx,
            task,
            cfg,
            dataset,
            dataset_name,
            store_path,
            out_dir,
            limit,
            no_plots,
            config,
            as_json,
        )
        return
    default = cfg.protocol or card_of(dataset).default_protocol
    protocol = get_protocol(protocol_name or default)
    protocol = protocol.with_changes(
        alphas=parse_alphas(alphas), thresholds=thresholds, comparison=comparison, frame=frame
    )
    pipe = Pipeline(cfg, store=open_reuse_store(store_path))
    pairs = list(itertools.islice(dataset.pairs(), limit))
    quiet = is_quiet(ctx)
    with tqdm(
        total=len(pairs), desc="eval", unit="pair", disable=quiet, file=sys.stderr, leave=False
    ) as bar:
        ev = evaluate(
            pipe, dataset, dataset_name=dataset_name, protocol=protocol, pairs=pairs, progress=bar
        )
    extra = {"config_file": config, "command": ["diffeat", *sys.argv[1:]]}
    written = write_outputs(ev, out_dir, plots=not no_plots, extra=extra) if out_dir else {}
    if as_json:
        emit_json({**results_dict(ev, pairs=False, extra=extra), "outputs": written})
        return
    click.echo(terminal_report(ev), nl=False)
    if written:
        click.echo(f"results: {written['json']}, {written['markdown']}")
    if store_path is None and ev.stats.computed > 0:
        click.echo(
            "hint: without --store every pair extracts both images anew; "
            "--store PATH (or DIFFEAT_STORE=PATH) extracts each image once and lets later "
            "runs reuse it",
            err=True,
        )


def _eval_task(
    ctx: click.Context,
    task: str,
    cfg: Any,
    dataset: Any,
    dataset_name: str,
    store_path: str | None,
    out_dir: str | None,
    limit: int | None,
    no_plots: bool,
    config: str,
    as_json: bool,
) -> None:
    """``diffeat eval`` on a dataset whose task is not PCK pairs (see diffeat.eval.tasks)."""
    from tqdm import tqdm

    from diffeat.core.pipeline import Pipeline
    from diffeat.eval.tasks import TaskContext, task_runner, write_task_outputs

    runner = task_runner(task)
    pipe = Pipeline(cfg, store=open_reuse_store(store_path))
    with tqdm(desc=f"eval {task}", disable=is_quiet(ctx), file=sys.stderr, leave=False) as bar:
        ev = runner(
            TaskContext(
                pipeline=pipe,
                dataset=dataset,
                dataset_name=dataset_name,
                options=dict(cfg.tasks.get(task, {})),
                limit=limit,
                progress=bar,
            )
        )
    extra = {"config_file": config, "command": ["diffeat", *sys.argv[1:]]}
    written = write_task_outputs(ev, out_dir, plots=not no_plots, extra=extra) if out_dir else {}
    if as_json:
        emit_json({**ev.results_dict(records=False), **extra, "outputs": written})
        return
    click.echo(ev.terminal_report(), nl=False)
    if written:
        click.echo(f"results: {written['json']}, {written['markdown']}")


@click.group("datasets", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def datasets_group(ctx: click.Context, as_json: bool) -> None:
    """Installed dataset plugins and what each expects on disk."""
    if ctx.invoked_subcommand is not None:
        return
    from diffeat.core.datasets import card_of
    from diffeat.core.options import describe_options
    from diffeat.core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    rows = []
    for name in pm.names("dataset"):
        reg = pm.get("dataset", name)
        card = card_of(reg.factory)
        rows.append(
            {
                "name": name,
                "plugin": reg.plugin,
                "title": card.title,
                "url": card.url,
                "layout": card.layout,
                "default_protocol": card.default_protocol,
                "task": card.task,
                "options": describe_options(reg.factory),
            }
        )
    if as_json:
        emit_json({"datasets": rows})
        return
    if not rows:
        click.echo("no dataset plugins installed")
    for row in rows:
        scoring = (
            f"protocol {row['default_protocol']}"
            if row["task"] == "pairs"
            else f"task {row['task']}"
        )
        click.echo(f"{row['name']}  {row['title']}  [plugin {row['plugin']}; {scoring}]")
        click.echo(f"    expects: {row['layout']}")
        click.echo(f"    get it:  {row['url']}")
        opts = ", ".join(f"{o['name']}={o['default']!r}" for o in row["options"])
        if opts:
            click.echo(f"    options: {opts}")


@datasets_group.command("make-synthetic")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--from",
    "sources",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="Image file or folder (recursive; repeatable).",
)
@click.option(
    "--pairs",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Number of pairs (--layout hpatches: of sequences, 5 pairs each).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of every random choice.")
@click.option(
    "--kinds",
    default="homography,flip",
    show_default=True,
    help="Comma list of identity, translate, flip, homography (pair k: image k mod n, kind (k + k // n) mod len(kinds)).",
)
@click.option(
    "--points",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Keypoints per source image.",
)
@click.option(
    "--ext",
    type=click.Choice(["jpg", "png"]),
    default="jpg",
    show_default=True,
    help="Image format (png is lossless).",
)
@click.option(
    "--category",
    default="synthetic",
    show_default=True,
    help="Category of images not in a subfolder of --from.",
)
@click.option(
    "--max-side",
    default=0,
    type=click.IntRange(min=0),
    help="Downscale source images to this longest side (0: keep).",
)
@click.option(
    "--layout",
    type=click.Choice(["spair", "hpatches"]),
    default="spair",
    show_default=True,
    help="spair: keypoint pairs (dataset synthetic); hpatches: i_*/v_* sequences with "
    "H_1_k files (dataset hpatches; --kinds, --points, --ext, --category do not apply).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def make_synthetic_cmd(
    out: str,
    sources: tuple[str, ...],
    pairs: int,
    seed: int,
    kinds: str,
    points: int,
    ext: str,
    category: str,
    max_side: int,
    layout: str,
    as_json: bool,
) -> None:
    """Write pairs made by random known transforms of your images, in the SPair-71k layout
    (or, with --layout hpatches, HPatches sequences)."""
    if layout == "hpatches":
        from diffeat.plugins.datasets.hpatches_synthetic import make_hpatches_synthetic

        made = make_hpatches_synthetic(
            out, list(sources), sequences=pairs, seed=seed, max_side=max_side
        )
        if as_json:
            emit_json(made.to_dict())
            return
        kinds_text = ", ".join(f"{k} {n}" for k, n in sorted(made.kinds.items()))
        click.echo(
            f"{made.sequences} sequences ({kinds_text}), {made.pairs} pairs -> {out}; "
            f"evaluate with: diffeat eval CONFIG --dataset hpatches --root {out}"
        )
        return
    from diffeat.plugins.datasets.synthetic import make_synthetic

    report = make_synthetic(
        out,
        list(sources),
        pairs=pairs,
        seed=seed,
        kinds=kinds.split(","),
        points=points,
        ext=ext,
        category=category,
        max_side=max_side,
    )
    if as_json:
        emit_json(report.to_dict())
        return
    kinds_text = ", ".join(f"{k} {n}" for k, n in sorted(report.kinds.items()))
    click.echo(
        f"{report.pairs} pairs ({kinds_text}) from {report.images} images -> {out}; "
        f"evaluate with: diffeat eval CONFIG --dataset synthetic --root {out}"
    )


def add_to(cli: click.Group) -> None:
    cli.add_command(eval_cmd)
    cli.add_command(datasets_group)
