"""Plugin options: declared as a dataclass, validated from TOML data.

A component factory declares ``Options``, a dataclass whose fields are its
options with defaults. ``field(metadata={"help": ..., "cache": False})`` marks
an option that does not change results (device, batch size), so it is left out
of the store's cache key. Supported types: ``str``, ``int``, ``float``,
``bool``, ``list[...]`` of those, and ``Literal[...]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, get_args, get_origin

from diffeat.core.errors import ConfigError


def options_class(factory: Any) -> type | None:
    opts = getattr(factory, "Options", None)
    if opts is not None and not dataclasses.is_dataclass(opts):
        raise ConfigError(f"{factory!r}.Options must be a dataclass")
    return opts


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{where}: unsupported option type {tp!r}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build_options(factory: Any, values: dict[str, Any], where: str) -> Any:
    """Validate ``values`` against ``factory.Options``; unknown keys name the valid ones."""
    cls = options_class(factory)
    if cls is None:
        if values:
            raise ConfigError(f"{where}: this plugin takes no options, got {sorted(values)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown option {key!r}{hint}; valid options: {', '.join(fields)}"
            )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        options = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return options


def options_dict(options: Any, *, cache_only: bool = False) -> dict[str, Any]:
    """The options as plain data; ``cache_only`` drops fields marked ``cache=False``."""
    if options is None:
        return {}
    out = {}
    for f in dataclasses.fields(options):
        rule = f.metadata.get("cache", True)
        if cache_only and not rule:
            continue
        value = getattr(options, f.name)
        if cache_only and rule == "if-set" and value == _default_of(f):
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def describe_options(factory: Any) -> list[dict[str, Any]]:
    """Name, type, default and help of every option, for docs and ``diffeat plugins``."""
    cls = options_class(factory)
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = _default_of(f)
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": default,
                "help": f.metadata.get("help", ""),
            }
        )
    return rows


CacheRule = bool | Literal["if-set"]


def opt(default: Any, help: str, *, cache: CacheRule = True) -> Any:
    """Shorthand for a documented option field.

    ``cache``: ``True`` (the value is part of the store's cache key), ``False``
    (it does not change results: device, batch size), or ``"if-set"``: part of
    the key only when it differs from the default. Use ``"if-set"`` for an
    option added to a released plugin whose default reproduces the earlier
    behaviour exactly, so stores written before keep their keys; such a
    default must never change.
    """
    if isinstance(default, list):
        return dataclasses.field(
            default_factory=lambda d=default: list(d), metadata={"help": help, "cache": cache}
        )
    return dataclasses.field(default=default, metadata={"help": help, "cache": cache})
