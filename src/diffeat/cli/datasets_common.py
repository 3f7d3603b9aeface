"""Dataset options shared by ``diffeat eval``, ``train`` and ``extract --dataset``."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from diffeat.core.errors import DiffeatError

if TYPE_CHECKING:
    from diffeat.core.datasets import Dataset


def dataset_option(help_text: str) -> Any:
    """The repeatable ``-o/--dataset-option KEY=VALUE`` of a dataset, with this command's help.

    A dataset option is not a pipeline option (those are ``--set STAGE.OPTION=VALUE``);
    ``--option``, its first long name, is still accepted.
    """
    return click.option(
        "-o",
        "--dataset-option",
        "--option",
        "dataset_options",
        multiple=True,
        metavar="KEY=VALUE",
        help=help_text + " Pipeline options are --set.",
    )


def parse_dataset_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``("pairs_per_class=20",)`` -> ``{"pairs_per_class": 20}`` (values read as TOML)."""
    from diffeat.core.config import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DiffeatError(
                f"bad dataset option {item!r}: use KEY=VALUE, e.g. -o pairs_per_class=20"
            )
        out[key.strip()] = parse_value(value.strip())
    return out


def build_dataset(name: str, values: dict[str, Any]) -> Dataset:
    """The dataset plugin ``name`` with validated options."""
    from diffeat.core.options import build_options
    from diffeat.core.plugins import get_plugin_manager

    reg = get_plugin_manager().get("dataset", name)
    options = build_options(reg.factory, values, f"dataset {name}")
    return reg.factory(options) if options is not None else reg.factory()


def dataset_from_cli(name: str, root: str, split: str | None, options: tuple[str, ...]) -> Dataset:
    """The dataset of ``--dataset NAME --root DIR [--split S] [-o KEY=VALUE ...]``."""
    values = {"root": root, **parse_dataset_options(options)}
    if split is not None:
        values["split"] = split
    return build_dataset(name, values)


def extract_command(
    config: str,
    *,
    dataset: str,
    root: str,
    split: str | None,
    options: Sequence[str],
    store: str,
    overrides: Sequence[str] = (),
    store_dtype: str = "float16",
) -> str:
    """The ``diffeat extract --dataset ...`` command line that stores a split's images."""
    args = ["diffeat", "extract", config, "--dataset", dataset, "--root", root]
    if split is not None:
        args += ["--split", split]
    for item in options:
        args += ["-o", item]
    args += ["--store", store]
    if store_dtype != "float16":
        args += ["--store-dtype", store_dtype]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)
