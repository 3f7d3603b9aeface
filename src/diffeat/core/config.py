"""TOML pipeline files: parse, validate per plugin, resolve every default, hash.

A pipeline file has ``[extractor]``, ``[aggregator]`` and ``[matcher]`` tables;
each names its ``plugin`` and gives that plugin's options. Config files are
data: nothing in them is executed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffeat.core.errors import ConfigError
from diffeat.core.options import build_options, options_dict
from diffeat.core.plugins import PluginManager, get_plugin_manager

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STAGES = ("extractor", "aggregator", "matcher")
DEFAULT_PLUGIN = {"aggregator": "select", "matcher": "nearest"}
TOP_LEVEL_KEYS = {"name", "description"}


@dataclass
class StageConfig:
    """One stage of a pipeline: the plugin's registered name and its validated options."""

    kind: str
    plugin: str
    factory: Any
    options: Any

    def resolved(self) -> dict[str, Any]:
        return {"plugin": self.plugin, **options_dict(self.options)}

    def build(self) -> Any:
        """Instantiate the component."""
        return self.factory(self.options) if self.options is not None else self.factory()


@dataclass
class PipelineConfig:
    """A validated pipeline: extractor -> aggregator -> matcher."""

    extractor: StageConfig
    aggregator: StageConfig
    matcher: StageConfig
    name: str = ""
    source: str = "<memory>"

    def resolved(self) -> dict[str, Any]:
        """Every option with its default filled in."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        for stage in STAGES:
            out[stage] = getattr(self, stage).resolved()
        return out

    def digest(self) -> str:
        return config_digest(self.resolved())


def config_digest(data: Any) -> str:
    """A stable hash of JSON-able data (sorted keys, no whitespace)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def parse_value(text: str) -> Any:
    """A TOML value (``261``, ``[1, 2]``, ``"x"``, ``true``); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    """Apply ``stage.option=value`` overrides (from ``--set``) to raw config data."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        stage, dot, option = key.strip().partition(".")
        if not sep or not dot or stage not in STAGES or not option:
            raise ConfigError(
                f"{where}: bad override {item!r}; use STAGE.OPTION=VALUE with STAGE one of "
                f"{', '.join(STAGES)}, e.g. extractor.timesteps=[261]"
            )
        data.setdefault(stage, {})[option] = parse_value(value.strip())
    return data


def parse_config(
    data: dict[str, Any], *, source: str = "<memory>", manager: PluginManager | None = None
) -> PipelineConfig:
    """Validate raw config data (as read from TOML) into a :class:`PipelineConfig`."""
    manager = manager or get_plugin_manager()
    for key in data:
        if key not in STAGES and key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{source}: unknown top-level key {key!r}; expected tables "
                f"{', '.join(f'[{s}]' for s in STAGES)} (and optional name, description)"
            )
    if "extractor" not in data:
        raise ConfigError(f'{source}: missing [extractor] table (with plugin = "...")')
    stages = {}
    for stage in STAGES:
        table = data.get(stage, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{stage}] must be a table")
        table = dict(table)
        plugin = table.pop("plugin", DEFAULT_PLUGIN.get(stage))
        if not isinstance(plugin, str):
            raise ConfigError(f'{source}: [{stage}] needs plugin = "NAME"')
        try:
            reg = manager.get(stage, plugin)
        except ConfigError as exc:
            raise ConfigError(f"{source}: [{stage}] {exc}") from None
        options = build_options(reg.factory, table, f"{source}: [{stage}] ({plugin})")
        stages[stage] = StageConfig(stage, plugin, reg.factory, options)
    name = data.get("name", "")
    return PipelineConfig(name=str(name), source=source, **stages)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with errors that name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    manager: PluginManager | None = None,
) -> PipelineConfig:
    """Read, override and validate a pipeline file."""
    data = apply_overrides(read_toml(path), list(overrides), str(path))
    return parse_config(data, source=str(path), manager=manager)


def to_toml(data: dict[str, Any]) -> str:
    """Write resolved config data (tables of scalars and lists) as TOML."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, table in data.items():
        if isinstance(table, dict):
            if lines:
                lines.append("")
            lines.append(f"[{key}]")
            for k, v in table.items():
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
