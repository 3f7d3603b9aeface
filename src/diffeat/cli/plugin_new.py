"""``diffeat plugin new``: write a pip-installable plugin package to start from.

The package is rendered from the template files in ``diffeat/cli/plugin_template/``
(shipped with diffeat): ``{{placeholder}}`` marks are replaced, nothing else is
generated in code. ``kinds.toml`` there says, per component kind, which module
and test to copy, the class its hook registers and the pipeline table that uses
it. What a package of ``NAME`` with ``--kind extractor`` holds::

    diffeat-NAME/
      pyproject.toml               entry point ``NAME = "diffeat_NAME"`` (group ``diffeat``)
      README.md
      NAME.toml                    a pipeline file using the component
      src/diffeat_NAME/__init__.py the ``@hookimpl`` registering ``NAME-resnet``
      src/diffeat_NAME/extractor.py
      tests/test_extractor.py      diffeat.testing's conformance suite and own tests
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import click

from diffeat.cli.common import emit_json
from diffeat.core.errors import DiffeatError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the component kinds a package can hold (``--kind``), in the order they are written
KINDS = ("extractor", "aggregator", "matcher", "dataset")
#: a plugin name: lowercase letters and digits, single hyphens between words
NAME_RULE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
NAME_RULE_TEXT = (
    "lowercase letters and digits, words joined by single hyphens, starting with a letter "
    "(e.g. my-resnet), at most 40 characters"
)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def template_dir() -> Path:
    """The folder of the template files (shipped inside the ``diffeat.cli`` package)."""
    return Path(str(resources.files("diffeat.cli") / "plugin_template"))


def render(text: str, values: dict[str, str], what: str = "template") -> str:
    """``text`` with every ``{{key}}`` replaced by ``values[key]`` (an unknown key is a bug)."""

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"{what}: no value for the placeholder {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(value, text)


def check_name(name: str) -> None:
    """Refuse a plugin name that is not ``NAME_RULE`` or that a built-in plugin has."""
    from diffeat.core.plugins import BUILTIN_MODULES

    if len(name) > 40 or not NAME_RULE.fullmatch(name):
        raise DiffeatError(f"bad plugin name {name!r}: use {NAME_RULE_TEXT}")
    if name == "diffeat" or name.startswith("diffeat-"):
        raise DiffeatError(
            f"bad plugin name {name!r}: leave out the 'diffeat-' prefix (the package is "
            f"called diffeat-NAME already), e.g. {name.removeprefix('diffeat-') or 'my-plugin'}"
        )
    if name in BUILTIN_MODULES:
        raise DiffeatError(
            f"bad plugin name {name!r}: a built-in plugin has that name "
            f"({', '.join(sorted(BUILTIN_MODULES))} are taken); choose another"
        )


@dataclass(frozen=True)
class PluginPackage:
    """What ``diffeat plugin new`` writes: relative path -> file text."""

    name: str
    kinds: tuple[str, ...]
    files: dict[str, str]

    @property
    def project(self) -> str:
        return f"diffeat-{self.name}"

    @property
    def package(self) -> str:
        return f"diffeat_{self.name.replace('-', '_')}"

    def components(self) -> dict[str, str]:
        """Kind -> registered component name."""
        spec = _kinds_spec()
        return {kind: f"{self.name}-{spec[kind]['suffix']}" for kind in self.kinds}


def _kinds_spec() -> dict[str, Any]:
    return tomllib.loads((template_dir() / "kinds.toml").read_text(encoding="utf-8"))


def _read(name: str) -> str:
    return (template_dir() / name).read_text(encoding="utf-8")


def plugin_package(name: str, kinds: tuple[str, ...] | list[str]) -> PluginPackage:
    """Render the package of plugin ``name`` with one component of each of ``kinds``."""
    from diffeat.core.version import __version__

    check_name(name)
    kinds = tuple(k for k in KINDS if k in set(kinds)) or ("extractor",)
    spec = _kinds_spec()
    package = f"diffeat_{name.replace('-', '_')}"
    describe = "; ".join(spec[k]["describe"] for k in kinds)
    values = {
        "name": name,
        "project": f"diffeat-{name}",
        "package": package,
        "describe": describe,
        "describe_list": "\n".join(f"- {spec[k]['describe']}" for k in kinds),
        "diffeat_version": __version__,
        "extra_dependencies": ', "safetensors>=0.4"' if "extractor" in kinds else "",
    }
    imports = "\n".join(  # sorted by module, as isort does
        f"from {package}.{k} import {spec[k]['class']}, {spec[k]['options']}" for k in sorted(kinds)
    )
    exported = sorted(e for k in kinds for e in (spec[k]["class"], spec[k]["options"]))
    hooks = "".join(
        f"\n\n\n@hookimpl\ndef {spec[k]['hook']}(register):\n"
        f'    register("{name}-{spec[k]["suffix"]}", {spec[k]["class"]})'
        for k in kinds
    )
    all_names = ", ".join(f'"{e}"' for e in exported)
    if len(all_names) > 85:  # one name a line, as ruff format writes a long list
        all_names = "\n" + "".join(f'    "{e}",\n' for e in exported)
    files: dict[str, str] = {}
    src = f"src/{package}"
    files[f"{src}/__init__.py"] = render(
        _read("__init__.py.tmpl"),
        {**values, "imports": imports, "all": all_names, "hooks": hooks},
        "__init__.py.tmpl",
    )
    for k in kinds:
        files[f"{src}/{k}.py"] = render(_read(f"{k}.py.tmpl"), values, f"{k}.py.tmpl")
        files[f"tests/test_{k}.py"] = render(
            _read(f"tests/test_{k}.py.tmpl"), values, f"tests/test_{k}.py.tmpl"
        )
    listing = [(f"{src}/__init__.py", "the @hookimpl functions: names -> classes")]
    listing += [(f"{src}/{k}.py", f"{spec[k]['class']} + {spec[k]['options']}") for k in kinds]
    listing += [(f"tests/test_{k}.py", "conformance suite + own tests") for k in kinds]
    usage = []
    pipeline_kinds = [k for k in kinds if k != "dataset"]
    if pipeline_kinds:
        tables = "\n".join(
            render(spec[k]["table"] if k in kinds else spec["defaults"][k], values)
            for k in ("extractor", "aggregator", "matcher")
        )
        files[f"{name}.toml"] = render(_read("pipeline.toml.tmpl"), {**values, "tables": tables})
        listing.insert(0, (f"{name}.toml", "a pipeline file using the plugin"))
        usage.append(f"diffeat match {name}.toml a.jpg b.jpg --point 40,30")
    if "dataset" in kinds:
        pipeline = f"{name}.toml" if pipeline_kinds else "PIPELINE.toml"
        usage.append(
            f"diffeat eval {pipeline} --dataset {name}-pairs --root DATA  # DATA/test.json"
        )
    listing.insert(0, ("pyproject.toml", f"the package, its `diffeat` entry point ({name})"))
    width = max(len(path) for path, _ in listing) + 2
    files["pyproject.toml"] = render(_read("pyproject.toml.tmpl"), values, "pyproject.toml.tmpl")
    files["README.md"] = render(
        _read("README.md.tmpl"),
        {
            **values,
            "files": "\n".join(p.ljust(width) + w for p, w in listing),
            "usage": "\n".join(usage),
        },
        "README.md.tmpl",
    )
    return PluginPackage(name, kinds, files)


def write_package(package: PluginPackage, folder: Path) -> list[Path]:
    """Write ``package`` into ``folder`` (new, or empty); refuses to overwrite anything."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DiffeatError(
            f"{folder} already exists and is not an empty folder: diffeat plugin new never "
            "overwrites; pass --dir a new folder, or remove this one"
        )
    written = []
    for relative, text in package.files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


@click.group("plugin")
def plugin_group() -> None:
    """Write plugin packages (`diffeat plugins` lists the installed ones)."""


@plugin_group.command("new")
@click.argument("name")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(KINDS),
    help="The component to write; repeat for several (default: extractor).",
)
@click.option(
    "--dir",
    "folder",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder to create (default: ./diffeat-NAME); must not exist or be empty.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def plugin_new(name: str, kinds: tuple[str, ...], folder: Path | None, as_json: bool) -> None:
    """Write a pip-installable plugin package NAME with a component to start from.

    The package (diffeat-NAME, module diffeat_NAME) has the `diffeat` entry
    point, the component's module (NAME-resnet extractor, NAME-pool aggregator,
    NAME-ratio matcher or NAME-pairs dataset), tests using diffeat.testing's
    conformance suites, a README and (for a pipeline component) a pipeline file.
    NAME: lowercase letters, digits and single hyphens. Then:
    cd diffeat-NAME && pip install -e ".[test]" && python -m pytest
    """
    package = plugin_package(name, kinds)
    folder = folder if folder is not None else Path(package.project)
    written = write_package(package, folder)
    if as_json:
        emit_json(
            {
                "name": name,
                "project": package.project,
                "package": package.package,
                "folder": str(folder.resolve()),
                "kinds": list(package.kinds),
                "components": package.components(),
                "files": sorted(package.files),
            }
        )
        return
    click.echo(f"wrote {package.project} ({len(written)} files) in {folder}")
    for kind, component in package.components().items():
        click.echo(f"  {kind}: {component}")
    click.echo(f'next: cd {folder} && pip install -e ".[test]" && python -m pytest')


def add_to(cli: click.Group) -> None:
    cli.add_command(plugin_group)
