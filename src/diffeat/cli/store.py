"""``diffeat store info`` and ``diffeat store ls``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from diffeat.cli.common import emit_json

if TYPE_CHECKING:
    from diffeat.store import FeatureStore


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _open(path: str) -> FeatureStore:
    from diffeat.store import FeatureStore

    return FeatureStore(path, mode="r")


@click.group("store")
def store_group() -> None:
    """Inspect a feature store."""


@store_group.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def store_info(path: str, as_json: bool) -> None:
    """What is stored, under which extractor configs, and how large."""
    info = _open(path).info()
    if as_json:
        emit_json(info)
        return
    click.echo(f"{path}: diffeat store, format version {info['format_version']}")
    for key, ex in info["extractors"].items():
        cfg = ex.get("config", {})
        model = cfg.get("model", ex.get("model", {}).get("model", "?"))
        click.echo(f"- {key}: plugin {ex.get('plugin')}, model {model}")
        layers = ", ".join(layer["name"] for layer in ex.get("layers", []))
        click.echo(f"    layers: {layers}; timesteps: {ex.get('timesteps')}")
        click.echo(
            f"    {ex['entries']} complete entries, {ex['incomplete']} incomplete, "
            f"{_mb(ex['bytes'])} on disk"
        )


@store_group.command("ls")
@click.argument("path", type=click.Path())
@click.option("--key", "cache_key", default=None, help="Only this extractor cache key.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def store_ls(path: str, cache_key: str | None, as_json: bool) -> None:
    """List stored entries: cache key, image key, source, layers."""
    store = _open(path)
    keys = [cache_key] if cache_key else list(store.extractors())
    rows = []
    for key in keys:
        for image_key in store.entries(key):
            rows.append(
                {"cache_key": key, "image_key": image_key, **store.entry_info(key, image_key)}
            )
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        layers = ", ".join(
            f"{name} {'x'.join(map(str, spec['shape']))}"
            for name, spec in row.get("layers", {}).items()
        )
        click.echo(f"{row['cache_key']}/{row['image_key']}  {row.get('source') or '-'}  {layers}")


def add_to(cli: click.Group) -> None:
    cli.add_command(store_group)
