"""The layer rules of docs/architecture.md, read from the imports of src/diffeat.

Every ``import`` and ``from ... import`` anywhere in a module counts (inside
functions and ``TYPE_CHECKING`` blocks too): a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffeat"

#: what core may not import: every layer above it, and the package root itself
ABOVE_CORE = ("plugins", "store", "cli", "train", "eval", "distributed", "testing", "viz")

#: (importing module, imported module[, name]) triples that break a rule today, being removed
#: in issue 10; the lead empties these sets when the fixes are merged
KNOWN_CORE: set[tuple[str, str]] = set()
KNOWN_PLUGINS: set[tuple[str, str]] = set()
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()

#: modules directly in plugins/ that register nothing and that any plugin may import:
#: shared helpers (a renamed helper module goes here under its new name)
NEUTRAL = {"diffusers_models", "modelfiles", "module_capture", "openclip_models"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # the module imported (for ``from m import n``: m.n if that is a module)
    name: str  # for ``from m import n``: n; else ""
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(name, a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, is_package, node.module, node.level)
            for a in node.names:
                sub = f"{module}.{a.name}"
                target = sub if sub in MODULES else module
                found.append(Import(name, target, a.name, node.lineno))
    return [i for i in found if i.target == "diffeat" or i.target.startswith("diffeat.")]


ALL_IMPORTS = [i for name, path in MODULES.items() for i in imports_of(name, path)]


def _where(i: Import) -> str:
    what = f"from {i.target} import {i.name}" if i.name else f"import {i.target}"
    return f"{MODULES[i.importer].relative_to(SRC)}:{i.line}: {what}"


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def plugin_of(module: str) -> str | None:
    """The plugin a module under diffeat.plugins belongs to: its package, or the module
    itself for a single-module plugin; None for the plugins package and neutral modules."""
    parts = module.split(".")
    if parts[:2] != ["diffeat", "plugins"] or len(parts) < 3 or parts[2] in NEUTRAL:
        return None
    return parts[2]


def test_imports_are_found():
    """The walk sees the package (guards against a path mistake making every test vacuous)."""
    assert "diffeat.core.pipeline" in MODULES
    assert any(i.importer == "diffeat.plugins.vit.openclip" for i in ALL_IMPORTS)


def test_core_imports_nothing_above_core():
    bad = {
        (i.importer, i.target): i
        for i in ALL_IMPORTS
        if _layer(i.importer) == "core"
        and (i.target == "diffeat" or _layer(i.target) in ABOVE_CORE)
    }
    assert [_where(i) for k, i in bad.items() if k not in KNOWN_CORE] == []
    assert KNOWN_CORE <= set(bad), "a known violation is gone: drop it from KNOWN_CORE"


def test_plugins_do_not_import_each_other():
    bad = {}
    for i in ALL_IMPORTS:
        mine, theirs = plugin_of(i.importer), plugin_of(i.target)
        if _layer(i.importer) == "plugins" and theirs is not None and theirs != mine:
            bad[(i.importer, i.target)] = i
    assert [_where(i) for k, i in bad.items() if k not in KNOWN_PLUGINS] == []
    assert KNOWN_PLUGINS <= set(bad), "a known violation is gone: drop it from KNOWN_PLUGINS"


#: what each middle layer may not import (docs/architecture.md, "Layers")
FORBIDDEN = {
    "store": {"plugins", "train", "eval", "cli", "testing"},
    "train": {"plugins", "store", "cli", "testing"},
    "eval": {"plugins", "store", "cli", "testing", "train"},
    "distributed": {"plugins", "store", "cli", "testing", "train", "eval"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_middle_layers_import_only_downwards(layer):
    """store sits on core only; train and eval reach features through core's FeatureSource."""
    bad = [
        _where(i)
        for i in ALL_IMPORTS
        if _layer(i.importer) == layer and _layer(i.target) in FORBIDDEN[layer]
    ]
    assert bad == []


def test_zarr_is_imported_by_the_store_adapter_only():
    users = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n == "zarr" or n.startswith("zarr.") for n in names):
                users.add(name)
    assert users == {"diffeat.store.zarr_io"}


@pytest.mark.parametrize("neutral", sorted(NEUTRAL))
def test_neutral_plugin_modules_import_no_plugin(neutral):
    """A shared helper that imported a plugin would tie every plugin using it to that one."""
    module = f"diffeat.plugins.{neutral}"
    bad = [
        _where(i) for i in ALL_IMPORTS if i.importer == module and plugin_of(i.target) is not None
    ]
    assert bad == []


def test_no_private_name_is_imported_from_another_module():
    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    bad = {
        (i.importer, i.target, i.name): i
        for i in ALL_IMPORTS
        if i.name and private(i.name) and i.target != i.importer
    }
    assert [_where(i) for k, i in bad.items() if k not in KNOWN_PRIVATE] == []
    assert KNOWN_PRIVATE <= set(bad), "a known violation is gone: drop it from KNOWN_PRIVATE"
