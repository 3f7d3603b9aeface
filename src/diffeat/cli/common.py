"""Shared CLI pieces: options, output, point parsing, building a pipeline.

The part of this module that plugin commands may rely on is re-exported, and
documented, by :mod:`diffeat.cli.api`; import it from there.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from diffeat.core.errors import DiffeatError, PluginError

if TYPE_CHECKING:
    from tqdm import tqdm

    from diffeat.core.components import FeatureStorage
    from diffeat.core.pipeline import Pipeline
    from diffeat.store import FeatureStore


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (what every ``--json`` flag prints).

    Values JSON cannot hold (paths, numpy scalars) are printed as ``str(value)``.
    """
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def is_quiet(ctx: click.Context) -> bool:
    """Whether ``diffeat --quiet`` was given: no progress bars, no progress lines."""
    root = ctx.find_root()
    return bool(root.obj and root.obj.get("quiet"))


def command_group(cli: click.Group, name: str, help_text: str) -> click.Group:
    """The subgroup ``name`` of ``cli``, created (with ``help_text``) if no plugin made it yet.

    Several plugins can add commands under one group this way, e.g.
    ``command_group(cli, "plot", ...).add_command(my_plot)``. A command (not a
    group) already named ``name`` is a :class:`~diffeat.core.errors.PluginError`.
    """
    existing = cli.commands.get(name)
    if existing is None:
        group = click.Group(name, help=help_text)
        cli.add_command(group)
        return group
    if not isinstance(existing, click.Group):
        raise PluginError(f"`diffeat {name}` is a command, not a group: cannot add commands to it")
    return existing


def parse_point(text: str) -> tuple[float, float]:
    """``"120,88"`` -> ``(120.0, 88.0)`` with a clear error otherwise."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise DiffeatError(
            f"bad --point {text!r}: expected X,Y in pixels, e.g. --point 120,88"
        ) from None
    return x, y


#: the environment variable naming the feature store used when ``--store`` is not given
STORE_ENV = "DIFFEAT_STORE"


def resolve_store(store_path: str | None, no_store: bool = False) -> str | None:
    """The store a command uses: ``--store PATH``, else none with ``--no-store``, else
    ``$DIFFEAT_STORE`` when set (and not empty), else none (features computed, not kept).

    Giving both ``--store`` and ``--no-store`` is a :class:`DiffeatError`.
    """
    if store_path is not None and no_store:
        raise DiffeatError(
            f"--store {store_path} and --no-store contradict each other: give one of them"
        )
    if no_store:
        return None
    if store_path is not None:
        return store_path
    return os.environ.get(STORE_ENV) or None


def required_store(store_path: str | None, command: str) -> str:
    """The store of a command that only writes into one (``diffeat extract``): ``--store``,
    else ``$DIFFEAT_STORE``, else a :class:`DiffeatError` saying how to give one."""
    resolved = resolve_store(store_path)
    if resolved is None:
        raise DiffeatError(
            f"diffeat {command} writes features into a store: pass --store PATH "
            f"(a folder, created if missing) or set {STORE_ENV}=PATH"
        )
    return resolved


#: the environment variable naming the storage dtype when ``--store-dtype`` is not given
STORE_DTYPE_ENV = "DIFFEAT_STORE_DTYPE"
#: the storage dtypes of ``--store-dtype`` (``diffeat.store.format.STORAGE_DTYPES``, named
#: here so that ``--help`` imports no torch); the first is the default
STORE_DTYPES = ("float16", "float32", "bfloat16")
_STORE_DTYPE_META = "diffeat.store_dtype"


def store_dtype_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--store-dtype float16|float32|bfloat16`` (else ``$DIFFEAT_STORE_DTYPE``, else float16):
    the storage dtype of the features the command stores and reuses. The command does not
    receive it: :func:`open_store` and :func:`open_pipeline` open the store with it
    (:func:`store_dtype` says which it is)."""

    @functools.wraps(fn)
    def with_dtype(*args: Any, store_dtype: str, **kwargs: Any) -> Any:
        click.get_current_context().meta[_STORE_DTYPE_META] = store_dtype
        return fn(*args, **kwargs)

    return click.option(
        "--store-dtype",
        "store_dtype",
        type=click.Choice(STORE_DTYPES),
        default=STORE_DTYPES[0],
        show_default=True,
        envvar=STORE_DTYPE_ENV,
        show_envvar=True,
        help=(
            "Storage dtype of the features kept in the store: float16 (half the size; maps "
            "within ~3e-4 relative of float32), float32 (exact) or bfloat16. Part of the "
            "store key: each dtype has entries of its own."
        ),
    )(with_dtype)


def store_dtype() -> str:
    """The ``--store-dtype`` of the command being run (float16 outside a command that has
    the option)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return STORE_DTYPES[0]
    return str(ctx.meta.get(_STORE_DTYPE_META, STORE_DTYPES[0]))


def open_store(store_path: str, mode: str = "a") -> FeatureStore:
    """The feature store at ``store_path`` (a folder or object-store URL) in the command's
    ``--store-dtype`` (:func:`store_dtype`)."""
    from diffeat.store import FeatureStore

    return FeatureStore(store_path, mode, dtype=store_dtype())  # type: ignore[arg-type]


def store_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--store PATH``, ``--no-store`` and ``--store-dtype`` (:func:`store_dtype_option`); the
    command receives ``store_path``, resolved by :func:`resolve_store` (``$DIFFEAT_STORE``
    when neither is given)."""

    @functools.wraps(fn)
    def with_store(*args: Any, store_path: str | None, no_store: bool, **kwargs: Any) -> Any:
        return fn(*args, store_path=resolve_store(store_path, no_store), **kwargs)

    with_store = store_dtype_option(with_store)

    with_store = click.option(
        "--no-store",
        "no_store",
        is_flag=True,
        help=f"Keep no features, even when {STORE_ENV} is set.",
    )(with_store)
    return click.option(
        "--store",
        "store_path",
        default=None,
        type=click.Path(),
        help=(
            "Reuse and keep features in this store (folder or s3:// gs:// az:// URL); "
            f"default: ${STORE_ENV} when set, else none."
        ),
    )(with_store)


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
    """The ``--set``, ``--model`` and ``--device`` values as overrides: ``--model`` and
    ``--device`` as ``*.option=value``, which the config routes to the extractor and to a
    matcher that owns its model (``diffeat.core.config.route_overrides``)."""
    out = list(overrides)
    if model:
        out.append(f"*.model={json.dumps(model)}")
    if device:
        out.append(f"*.device={json.dumps(device)}")
    return out


def open_reuse_store(store_path: str | None) -> FeatureStorage | None:
    """The feature store of a command that reads features and keeps what it computes
    (``match``, ``eval``, ``plot features``, ``propagate``): opened for writing when it can be written,
    else read-only (``mode="r"``: its entries are used, what is missing is computed and not
    kept, one :class:`~diffeat.core.store_writes.StoreWriteWarning` says so). A store that
    does not exist and cannot be created: none, with that warning. ``None``: no store."""
    from diffeat.core.errors import StoreError
    from diffeat.core.store_writes import mark_read_only, write_refusal
    from diffeat.store import LayoutWriteError
    from diffeat.store.zarr_io import is_store_url

    if not store_path:
        return None
    try:
        store = open_store(store_path)
    except LayoutWriteError:
        # a store copied between a disk and object storage: readable here, not writable
        store = open_store(store_path, mode="r")
        made = "a local disk" if is_store_url(store_path) else "object storage"
        mark_read_only(
            store, f"a format {store.format_version} store made on {made}, written only there"
        )
        return store
    except StoreError as exc:
        reason = write_refusal(exc)
        if reason is None:
            raise
        try:
            store = open_store(store_path, mode="r")
        except StoreError:  # nothing there to read: as without a store
            mark_read_only(store_path, f"it cannot be created: {reason}")
            return None
        mark_read_only(store, reason)
        return store
    if not is_store_url(store_path) and not os.access(store.path, os.W_OK):
        # a folder this process cannot write into (permissions, a read-only mount)
        read_only = open_store(store_path, mode="r")
        mark_read_only(read_only, "its folder is not writable by this user or file system")
        return read_only
    return store


def open_pipeline(config: str, overrides: list[str], store_path: str | None = None) -> Pipeline:
    """The pipeline of the TOML file ``config`` with ``overrides``, in front of the feature
    store at ``store_path`` (none: features are computed, not kept; a store that cannot be
    written: read from only, see :func:`open_reuse_store`), opened in the command's
    ``--store-dtype``."""
    from diffeat.core.config import load_config
    from diffeat.core.pipeline import Pipeline

    cfg = load_config(config, overrides)
    return Pipeline(cfg, store=open_reuse_store(store_path))


def progress_bar(total: int, desc: str, quiet: bool) -> tqdm:
    """A progress bar on stderr counting images (hidden when ``quiet``); use it as a context."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr, leave=False)
