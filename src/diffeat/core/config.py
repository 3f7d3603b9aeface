"""TOML pipeline files: parse, validate per plugin, resolve every default, hash.

A pipeline file has ``[extractor]``, ``[aggregator]`` and ``[matcher]`` tables;
each names its ``plugin`` and gives that plugin's options. An optional
``[train]`` table holds the options of ``diffeat train``; it is kept raw here
and validated by :mod:`diffeat.train.options`. Optional task tables
(``[homography]``, ``[propagation]``) hold the options of ``diffeat eval``'s
non-pair tasks (:mod:`diffeat.eval.tasks`); they are kept raw too and
validated by the task that reads them. Config files are data: nothing
in them is executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffeat.core.errors import ConfigError
from diffeat.core.options import build_options, options_class, options_dict
from diffeat.core.plugins import PluginManager, get_plugin_manager

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STAGES = ("extractor", "aggregator", "matcher")
DEFAULT_PLUGIN = {"aggregator": "select", "matcher": "nearest"}
TOP_LEVEL_KEYS = {"name", "description", "protocol"}
TRAIN_TABLE = "train"  # options of `diffeat train`, validated by diffeat.train.options
#: raw option tables of the evaluation tasks other than PCK pairs (see diffeat.eval.tasks)
TASK_TABLES = ("homography", "propagation")
OVERRIDE_TABLES = (*STAGES, TRAIN_TABLE, *TASK_TABLES)
_PART_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class StageConfig:
    """One stage of a pipeline: the plugin's registered name and its validated options."""

    kind: str
    plugin: str
    factory: Any
    options: Any
    name: str = ""  # set for each extractor of a multi-extractor pipeline

    def resolved(self) -> dict[str, Any]:
        head = {"name": self.name} if self.name else {}
        return {**head, "plugin": self.plugin, **options_dict(self.options)}

    def build(self) -> Any:
        """Instantiate the component."""
        return self.factory(self.options) if self.options is not None else self.factory()


@dataclass
class PipelineConfig:
    """A validated pipeline: extractor(s) -> aggregator -> matcher.

    Several extractors (``[[extractor]]`` tables, each with a ``name``) feed an
    aggregator that combines them, such as ``fuse``.
    """

    extractors: list[StageConfig]
    aggregator: StageConfig
    matcher: StageConfig
    name: str = ""
    source: str = "<memory>"
    train: dict[str, Any] | None = None  # the raw [train] table, when the file has one
    protocol: str = ""  # the PCK protocol `diffeat eval` uses by default (else the dataset's)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # raw [homography] etc.

    @property
    def extractor(self) -> StageConfig:
        """The (first) extractor."""
        if not self.extractors:
            raise ConfigError(
                f"{self.source}: this pipeline has no [extractor]: its matcher "
                f"({self.matcher.plugin}) works on the images with its own model and keeps no "
                "features; add an [extractor] table to extract or store features"
            )
        return self.extractors[0]

    def resolved(self) -> dict[str, Any]:
        """Every option with its default filled in."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        if self.protocol:
            out["protocol"] = self.protocol
        extractors = [e.resolved() for e in self.extractors]
        if extractors:  # none: a query-conditioned matcher that works on images
            out["extractor"] = extractors[0] if len(extractors) == 1 else extractors
        out["aggregator"] = self.aggregator.resolved()
        out["matcher"] = self.matcher.resolved()
        if self.train is not None:
            out[TRAIN_TABLE] = dict(self.train)
        for task, table in self.tasks.items():
            out[task] = dict(table)
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
    """Apply ``stage.option=value`` overrides (from ``--set``) to raw config data.

    ``train.option=value`` sets an option of the ``[train]`` table.
    """
    data = {
        k: dict(v) if isinstance(v, dict) else [dict(t) for t in v] if isinstance(v, list) else v
        for k, v in data.items()
    }
    for item in overrides:
        key, sep, value = item.partition("=")
        stage, dot, option = key.strip().partition(".")
        if not sep or not dot or stage not in OVERRIDE_TABLES or not option:
            raise ConfigError(
                f"{where}: bad override {item!r}; use STAGE.OPTION=VALUE with STAGE one of "
                f"{', '.join(OVERRIDE_TABLES)}, e.g. extractor.timesteps=[261]"
            )
        target = data.setdefault(stage, {})
        if isinstance(target, list):  # several extractors: extractor.NAME.OPTION=VALUE
            part, _, option = option.partition(".")
            named = [t for t in target if isinstance(t, dict) and t.get("name") == part]
            if not named or not option:
                names = ", ".join(str(t.get("name")) for t in target if isinstance(t, dict))
                raise ConfigError(
                    f"{where}: bad override {item!r}; this pipeline has several extractors "
                    f"({names}): use extractor.NAME.OPTION=VALUE"
                )
            target = named[0]
        target[option] = parse_value(value.strip())
    return data


def parse_config(
    data: dict[str, Any], *, source: str = "<memory>", manager: PluginManager | None = None
) -> PipelineConfig:
    """Validate raw config data (as read from TOML) into a :class:`PipelineConfig`."""
    manager = manager or get_plugin_manager()
    for key in data:
        if key not in (*STAGES, TRAIN_TABLE, *TASK_TABLES) and key not in TOP_LEVEL_KEYS:
            optional = ", ".join(f"[{t}]" for t in (TRAIN_TABLE, *TASK_TABLES))
            raise ConfigError(
                f"{source}: unknown top-level key {key!r}; expected tables "
                f"{', '.join(f'[{s}]' for s in STAGES)} (and optional {optional}, name, "
                "description, protocol)"
            )
    tasks: dict[str, dict[str, Any]] = {}
    for task in TASK_TABLES:
        if task in data:
            if not isinstance(data[task], dict):
                raise ConfigError(
                    f"{source}: [{task}] must be a table of the {task} task's options "
                    "(see docs/evaluation.md)"
                )
            tasks[task] = dict(data[task])
    train = data.get(TRAIN_TABLE)
    if train is not None and not isinstance(train, dict):
        raise ConfigError(
            f"{source}: [{TRAIN_TABLE}] must be a table of `diffeat train` options, "
            f"e.g. [{TRAIN_TABLE}] steps = 5000"
        )
    protocol = data.get("protocol", "")
    if not isinstance(protocol, str):
        raise ConfigError(
            f'{source}: protocol must be the name of a PCK protocol, e.g. protocol = "dift" '
            "(see docs/evaluation.md)"
        )
    matcher = _stage(manager, "matcher", data.get("matcher", {}), source, "[matcher]")
    tables = data.get("extractor")
    if tables is None:
        if _needs_descriptors(matcher.factory):
            raise ConfigError(f'{source}: missing [extractor] table (with plugin = "...")')
        extractors: list[StageConfig] = []  # a query-conditioned matcher works on images
    elif isinstance(tables, dict):
        extractors = [_stage(manager, "extractor", tables, source, "[extractor]")]
    elif isinstance(tables, list) and tables and all(isinstance(t, dict) for t in tables):
        extractors = []
        for i, table in enumerate(tables):
            table = dict(table)
            name = table.pop("name", None)
            where = f"[[extractor]] #{i + 1}"
            if not isinstance(name, str) or not _PART_NAME.match(name):
                raise ConfigError(
                    f'{source}: {where} needs name = "..." (letters, digits, "_", "-") '
                    f"when a pipeline has several extractors"
                )
            if name in {e.name for e in extractors}:
                raise ConfigError(f"{source}: {where}: the extractor name {name!r} is used twice")
            stage = _stage(manager, "extractor", table, source, where)
            stage.name = name
            extractors.append(stage)
    else:
        raise ConfigError(
            f"{source}: [extractor] must be a table or a list of [[extractor]] tables"
        )
    aggregator = _stage(manager, "aggregator", data.get("aggregator", {}), source, "[aggregator]")
    return PipelineConfig(
        extractors,
        aggregator,
        matcher,
        name=str(data.get("name", "")),
        source=source,
        train=dict(train) if train is not None else None,
        protocol=protocol,
        tasks=tasks,
    )


def _stage(manager: PluginManager, kind: str, table: Any, source: str, where: str) -> StageConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} must be a table")
    table = dict(table)
    plugin = table.pop("plugin", DEFAULT_PLUGIN.get(kind))
    if not isinstance(plugin, str):
        raise ConfigError(f'{source}: {where} needs plugin = "NAME"')
    try:
        reg = manager.get(kind, plugin)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {where} {exc}") from None
    options = build_options(reg.factory, table, f"{source}: {where} ({plugin})")
    return StageConfig(kind, plugin, reg.factory, options)


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


#: prefix of an override that goes to every stage that has the option (``--model``, ``--device``)
ROUTED = "*."


def _needs_descriptors(factory: Any) -> bool:
    return bool(getattr(factory, "needs_descriptors", True))


def _has_option(manager: PluginManager, kind: str, table: Any, option: str) -> bool:
    if not isinstance(table, dict):
        return False
    plugin = table.get("plugin", DEFAULT_PLUGIN.get(kind))
    try:
        factory = manager.get(kind, str(plugin)).factory
    except ConfigError:
        return False  # parse_config reports the unknown plugin
    cls = options_class(factory)
    return cls is not None and option in {f.name for f in dataclasses.fields(cls)}


def route_overrides(
    data: dict[str, Any], overrides: list[str], manager: PluginManager
) -> list[str]:
    """Expand ``*.OPTION=VALUE`` (what ``--model`` and ``--device`` give) into the stages
    that take it: the extractor (``model``: only a single one; ``device``: each one), and a
    query-conditioned matcher (one that owns its model, e.g. ``cross-attention``) that has
    the option. Other overrides pass unchanged."""
    out: list[str] = []
    for item in overrides:
        if not item.startswith(ROUTED):
            out.append(item)
            continue
        key, _, value = item[len(ROUTED) :].partition("=")
        option = key.strip()
        routed: list[str] = []
        tables = data.get("extractor")
        if isinstance(tables, list) and option == "device":
            routed += [
                f"extractor.{t['name']}.{option}={value}"
                for t in tables
                if isinstance(t, dict) and "name" in t
            ]
        elif tables is not None:
            routed.append(f"extractor.{option}={value}")
        matcher = data.get("matcher", {})
        if _has_option(manager, "matcher", matcher, option):
            plugin = matcher.get("plugin", DEFAULT_PLUGIN["matcher"])
            if not _needs_descriptors(manager.get("matcher", str(plugin)).factory):
                routed.append(f"matcher.{option}={value}")
        out += routed or [f"extractor.{option}={value}"]
    return out


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    manager: PluginManager | None = None,
) -> PipelineConfig:
    """Read, override and validate a pipeline file.

    An override ``*.OPTION=VALUE`` goes to each stage that takes it (:func:`route_overrides`).
    """
    manager = manager or get_plugin_manager()
    data = read_toml(path)
    data = apply_overrides(data, route_overrides(data, list(overrides), manager), str(path))
    return parse_config(data, source=str(path), manager=manager)


def to_toml(data: dict[str, Any]) -> str:
    """Write resolved config data (tables of scalars and lists) as TOML."""
    lines: list[str] = []

    def is_tables(v: Any) -> bool:
        return isinstance(v, dict) or (isinstance(v, list) and bool(v) and isinstance(v[0], dict))

    for key, value in data.items():
        if not is_tables(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in data.items():
        if not is_tables(value):
            continue
        for table in [value] if isinstance(value, dict) else value:
            if lines:
                lines.append("")
            lines.append(
                f"[{_toml_key(key)}]" if isinstance(value, dict) else f"[[{_toml_key(key)}]]"
            )
            for k, v in table.items():
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    """A TOML basic string that reads back as ``text``: every character as itself (emoji
    included, not as JSON's surrogate-pair escapes, which TOML refuses), only quotes,
    backslashes and control characters escaped."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ConfigError(
                f"the string {text!r} holds a lone surrogate (U+{code:04X}), which is not a "
                "character and cannot be written as TOML; fix the value"
            )
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")
