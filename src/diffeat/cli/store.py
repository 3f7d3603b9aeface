"""``diffeat store info``, ``ls``, ``verify`` and ``delete``."""

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


def _open_existing(path: str, mode: str) -> FeatureStore:
    """Open a store that must exist already (mode "a" would create a missing one)."""
    from diffeat.store import FeatureStore

    FeatureStore(path, mode="r")
    return FeatureStore(path, mode=mode)  # type: ignore[arg-type]


@click.group("store")
def store_group() -> None:
    """Inspect, check and repair a feature store."""


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
        if "damaged" in ex:
            click.echo(f"- {key}: extractor info damaged")
            click.echo(f"    {ex['damaged']}")
        else:
            click.echo(f"- {key}: plugin {ex.get('plugin')}, model {model}")
        layers = ", ".join(layer["name"] for layer in ex.get("layers", []))
        click.echo(f"    layers: {layers}; timesteps: {ex.get('timesteps')}")
        dtype = f" ({ex['dtype']})" if ex.get("dtype") else ""
        click.echo(
            f"    {ex['entries']} complete entries{dtype}, "
            f"{'?' if ex['incomplete'] is None else ex['incomplete']} incomplete, "
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


@store_group.command("verify")
@click.argument("path", type=click.Path())
@click.option("--key", "cache_key", default=None, help="Only this extractor cache key.")
@click.option(
    "--repair",
    is_flag=True,
    help="Remove damaged and incomplete entries and leftovers (the next extract recomputes "
    "them); rewrite a missing root zarr.json.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def store_verify(
    ctx: click.Context, path: str, cache_key: str | None, repair: bool, as_json: bool
) -> None:
    """Read every complete entry and check it (shapes, dtypes, every chunk present, finite
    values); exit 1 when something is damaged (unless --repair removed it)."""
    from diffeat.cli.common import is_quiet, progress_bar
    from diffeat.store import DamagedRootError, restore_root
    from diffeat.store.verify import verify_store

    restored = False
    try:
        store = _open_existing(path, "a" if repair else "r")
    except DamagedRootError:
        if not repair:
            raise
        restored = restore_root(path)
        store = _open_existing(path, "a")
    if cache_key is not None and cache_key not in store.extractors():
        from diffeat.core.errors import StoreError

        raise StoreError(f"no cache key {cache_key!r} in {path}: see `diffeat store info {path}`")
    total = sum(len(store.entries(k)) for k in ([cache_key] if cache_key else store.extractors()))
    with progress_bar(total, "verify", is_quiet(ctx)) as bar:
        report = verify_store(store, cache_key=cache_key, repair=repair, on_entry=bar.update)
    if as_json:
        emit_json({**report.to_dict(), "root_rewritten": restored})
    else:
        if restored:
            click.echo(f"rewrote {path}/zarr.json (the store's root metadata)")
        for damage in report.damaged:
            action = " (removed)" if damage.removed else ""
            click.echo(f"damaged{action}: {damage.cache_key}/{damage.image_key}: {damage.problem}")
        for key, images in report.incomplete.items():
            action = "removed" if repair else "incomplete"
            click.echo(f"{action}: {len(images)} incomplete entries under {key}")
        for problem in report.damaged_info.values():
            click.echo(f"damaged extractor info: {problem}")
        for leftover in report.leftovers:
            click.echo(f"{'removed' if repair else 'leftover'}: {leftover}")
        sound = report.ok and not report.damaged_info
        verdict = "ok" if report.ok else ("repaired" if repair else "damaged")
        if report.damaged_info and not repair:
            verdict = "damaged"
        click.echo(
            f"{path}: {report.checked} entries checked, {len(report.damaged)} damaged: {verdict}"
        )
        if not sound and not repair:
            click.echo(
                f"run `diffeat store verify --repair {path}` to remove what is damaged; "
                "extract again to recompute it",
                err=True,
            )
    if not repair and (not report.ok or report.damaged_info):
        ctx.exit(1)


@store_group.command("delete")
@click.argument("path", type=click.Path())
@click.option("--key", "cache_key", required=True, help="The extractor cache key.")
@click.option("--image", "image_key", default=None, help="Only this image key's entry.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def store_delete(path: str, cache_key: str, image_key: str | None, as_json: bool) -> None:
    """Remove one entry (--key and --image), or everything under a cache key (--key)."""
    from diffeat.core.errors import StoreError

    store = _open_existing(path, "a")
    if image_key is None:
        if not store.has_cache_key(cache_key):
            raise StoreError(
                f"no cache key {cache_key!r} in {path}: see `diffeat store info {path}`"
            )
        removed = store.delete_cache_key(cache_key)
        what = f"cache key {cache_key} ({removed} entries)"
    else:
        if not store.delete(cache_key, image_key):
            raise StoreError(
                f"no entry {image_key!r} under cache key {cache_key!r} in {path}: see "
                f"`diffeat store ls {path} --key {cache_key}`"
            )
        removed = 1
        what = f"entry {cache_key}/{image_key}"
    if as_json:
        emit_json(
            {"path": path, "cache_key": cache_key, "image_key": image_key, "removed": removed}
        )
    else:
        click.echo(f"removed {what} from {path}")


def add_to(cli: click.Group) -> None:
    cli.add_command(store_group)
