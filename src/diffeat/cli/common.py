"""Shared CLI pieces: options, output, point parsing."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from diffeat.core.errors import DiffeatError


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def parse_point(text: str) -> tuple[float, float]:
    """``"120,88"`` -> ``(120.0, 88.0)`` with a clear error otherwise."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise DiffeatError(
            f"bad --point {text!r}: expected X,Y in pixels, e.g. --point 120,88"
        ) from None
    return x, y


store_option = click.option(
    "--store",
    "store_path",
    default=None,
    type=click.Path(),
    help="Reuse and keep features in this store.",
)


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--set``, ``--model`` and ``--device`` overrides shared by pipeline commands."""
    fn = click.option(
        "--device", default=None, help="Torch device for the extractor (cpu, cuda, cuda:1, ...)."
    )(fn)
    fn = click.option(
        "--model", default=None, help="Override the extractor's model (hub id or local folder)."
    )(fn)
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="STAGE.OPTION=VALUE",
        help="Override an option, e.g. --set extractor.timesteps=[261]. Repeatable.",
    )(fn)
    return fn


def collect_overrides(
    overrides: tuple[str, ...], model: str | None, device: str | None
) -> list[str]:
    out = list(overrides)
    if model:
        out.append(f"extractor.model={json.dumps(model)}")
    if device:
        out.append(f"extractor.device={json.dumps(device)}")
    return out


def progress_bar(total: int, desc: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr, leave=False)
