"""docs/writing-a-plugin.md cannot drift from the plugin API.

Every hookspec has a reference section with its signature, every optional
capability of ``diffeat.core.components`` has one, and every ``python`` example
under ``## Reference`` runs and loads as a plugin.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
from pathlib import Path

import click
import pytest

from diffeat.core import components, hookspecs
from diffeat.core.plugins import PluginManager

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"
HEADING = re.compile(r"^(#{2,4}) (.+)$")
CODE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def reference_sections() -> dict[str, str]:
    """``{heading: body}`` of every heading under ``## Reference`` (to the next ``## ``)."""
    text = DOC.read_text()
    start = text.index("\n## Reference\n")
    end = text.find("\n## ", start + 1)
    part = text[start : end if end != -1 else len(text)]
    sections: dict[str, str] = {}
    heading = ""
    for line in part.splitlines(keepends=True):
        m = HEADING.match(line.rstrip("\n"))
        if m:
            heading = m.group(2).strip()
            sections[heading] = ""
        elif heading:
            sections[heading] += line
    return sections


def hookspec_signatures() -> dict[str, str]:
    """``{name: "name(arg, ...)"}`` for every function marked ``@hookspec``."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: f"{name}({', '.join(inspect.signature(fn).parameters)})"
        for name, fn in vars(hookspecs).items()
        if hasattr(fn, marker)
    }


#: Protocols of components.py that are not a component's optional capability
NOT_CAPABILITIES = {"FeatureStorage"}


def capability_protocols() -> set[str]:
    return {
        name
        for name, obj in vars(components).items()
        if inspect.isclass(obj)
        and getattr(obj, "_is_protocol", False)
        and obj.__module__ == components.__name__
        and name not in NOT_CAPABILITIES
    }


def test_every_hookspec_has_a_reference_section_with_its_signature() -> None:
    headings = list(reference_sections())
    specs = hookspec_signatures()
    assert specs, "no hookspec found"
    for signature in specs.values():
        assert f"`{signature}`" in headings, (
            f"docs/writing-a-plugin.md has no reference heading `{signature}` "
            f"(headings: {headings})"
        )


def test_every_capability_has_a_reference_section() -> None:
    headings = " ".join(reference_sections())
    for protocol in sorted(capability_protocols()):
        assert protocol in headings, f"no reference heading names {protocol}"
    for flag in ("conditioning", "needs_descriptors"):
        assert flag in headings, f"no reference heading names {flag}"


def test_every_reference_section_has_an_example() -> None:
    sections = reference_sections()
    leaves = [h for h in sections if h not in ("Reference", "Hooks", "Optional capabilities")]
    for heading in leaves:
        assert CODE.search(sections[heading]), f"reference section {heading!r} has no example"


def examples() -> list[pytest.param]:
    return [
        pytest.param(code, id=re.sub(r"[^a-z0-9_]+", "-", heading.lower()).strip("-"))
        for heading, body in reference_sections().items()
        for code in CODE.findall(body)
    ]


@pytest.mark.parametrize("code", examples())
def test_reference_example_runs_and_loads(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("doc_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, str(DOC), "exec"), module.__dict__)

    pm = PluginManager(entry_points=False)
    record = pm.add_plugin(module, "doc-example")
    assert record.ok, record.error
    group = click.Group("diffeat")
    pm.add_commands(group)
    assert pm.records["doc-example"].ok, pm.records["doc-example"].error
    implemented = {n for n in vars(module) if n in hookspec_signatures()}
    assert implemented, "the example implements no hook"
    registers = implemented - {"register_commands"}
    assert len(record.provides) >= len(registers), "a register_* hook registered nothing"
    if "register_commands" in implemented:
        assert group.commands, "register_commands added no command"


# ------------------------------------------------ docs/store-format.md's examples

STORE_DOC = DOC.parent / "store-format.md"


def json_example_after(heading: str) -> dict:
    """The first ```json block after ``heading`` in docs/store-format.md, parsed."""
    text = STORE_DOC.read_text()
    start = text.index(f"\n{heading}\n")
    block = re.search(r"^```json\n(.*?)^```$", text[start:], re.S | re.M)
    assert block, f"no json example under {heading!r}"
    return json.loads(block.group(1))


def test_store_format_examples_have_the_keys_the_plugins_write(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented extractor info and entry are what the stable-diffusion plugin
    writes (the same keys at every level; the doc's abridged ``config`` and
    ``versions`` hold only keys a real one has)."""
    from diffeat.core.pipeline import Pipeline
    from diffeat.testing import smooth_texture

    monkeypatch.chdir(tmp_path)
    smooth_texture((50, 37), seed=0).save("cat.png")
    data = {
        "extractor": {
            "plugin": "stable-diffusion",
            "model": str(tiny_sd),
            "image_size": [64, 64],
            "ensemble_size": 1,
            "prompt": "a photo of a cat",
        }
    }
    pipe = Pipeline.from_dict(data, store=tmp_path / "s.zarr")
    pipe.extract(["cat.png"])
    (image_key,) = pipe.store.entries(pipe.cache_key)
    folder = tmp_path / "s.zarr" / pipe.cache_key
    entry = json.loads((folder / image_key / "zarr.json").read_text())
    info = json.loads((folder / "zarr.json").read_text())["attributes"]

    doc_entry = json_example_after("## Entry group")
    assert doc_entry.keys() == entry.keys()
    attrs, doc_attrs = entry["attributes"], doc_entry["attributes"]
    assert doc_attrs.keys() == attrs.keys()
    assert doc_attrs["meta"].keys() == attrs["meta"].keys()
    assert doc_attrs["meta"]["transform"].keys() == attrs["meta"]["transform"].keys()
    assert list(doc_attrs["layers"]) == list(attrs["layers"])
    (spec,), (doc_spec,) = attrs["layers"].values(), doc_attrs["layers"].values()
    assert doc_spec.keys() == spec.keys()
    assert attrs["source"] == str(tmp_path / "cat.png")  # stored absolute, as documented
    assert doc_attrs["source"].startswith("/")

    doc_info = json_example_after("## Cache-key group: extractor info")
    assert doc_info.keys() == info.keys()
    assert doc_info["model"].keys() == info["model"].keys()
    assert [layer.keys() for layer in doc_info["layers"]] == [
        layer.keys() for layer in info["layers"]
    ]
    assert doc_info["config"].keys() <= info["config"].keys()
    assert doc_info["versions"].keys() <= info["versions"].keys()
    assert doc_info["plugin"] == info["plugin"] == doc_info["config"]["plugin"]


# ------------------------------------------ every python block of the guide runs

NOT_RUN = re.compile(r"<!-- not-run: (?P<why>[^>]*?) -->\s*$")
#: a block whose first line names a file (``# my_plugin/commands.py``) is that file
FILE_BLOCK = re.compile(r"^# ([a-z_][a-z0-9_]*(?:/[a-z_][a-z0-9_]*)*\.py)\n")
#: the most fragments the guide may mark ``<!-- not-run: why -->`` (use it sparingly)
MAX_NOT_RUN = 2


def guide_blocks() -> list[tuple[int, str, str]]:
    """``(line, code, not_run_reason)`` of every ```python block of the guide."""
    text = DOC.read_text()
    found = []
    for m in CODE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        why = NOT_RUN.search(before)
        found.append(
            (text[: m.start()].count("\n") + 1, m.group(1), why.group("why") if why else "")
        )
    return found


def reference_span() -> tuple[int, int]:
    text = DOC.read_text()
    start = text.index("\n## Reference\n")
    end = text.find("\n## ", start + 1)
    first = text[:start].count("\n") + 2
    return first, (text[:end].count("\n") + 1 if end != -1 else text.count("\n") + 1)


def test_not_run_marks_are_few_and_say_why() -> None:
    marked = [(line, why) for line, _code, why in guide_blocks() if why]
    assert all(why.strip() for _line, why in marked)
    assert len(marked) <= MAX_NOT_RUN, f"too many not-run blocks: {marked}"


def outside_reference() -> list[pytest.param]:
    first, last = reference_span()
    return [
        pytest.param(code, id=f"line-{line}")
        for line, code, why in guide_blocks()
        if not why and not (first <= line <= last) and not FILE_BLOCK.match(code)
    ]


def test_every_python_block_is_run_somewhere() -> None:
    first, last = reference_span()
    blocks = guide_blocks()
    inside = [b for b in blocks if first <= b[0] <= last]
    assert len(inside) == len(examples()), "a Reference block is not among the examples"
    files = [b for b in blocks if FILE_BLOCK.match(b[1])]
    assert len(blocks) == len(inside) + len(outside_reference()) + len(files) + sum(
        1 for b in blocks if b[2] and not (first <= b[0] <= last)
    )


@pytest.mark.parametrize("code", outside_reference())
def test_guide_block_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("doc_block")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, str(DOC), "exec"), module.__dict__)


def test_guide_file_blocks_make_a_plugin_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manager: PluginManager
) -> None:
    """The blocks that name a file (``# my_plugin/commands.py``) form a package that loads
    as a plugin and whose commands run."""
    from click.testing import CliRunner

    from diffeat.testing import smooth_texture

    files = [FILE_BLOCK.match(code) for _line, code, why in guide_blocks() if not why]
    written = {m.group(1): m.string for m in files if m}
    assert written, "the guide has no file blocks"
    for rel, code in written.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    packages = sorted({rel.split("/")[0] for rel in written})
    for name in packages:
        monkeypatch.delitem(sys.modules, name, raising=False)
        module = __import__(name)
        pm = PluginManager(entry_points=False)
        assert pm.add_plugin(module, name).ok
        group = click.Group("diffeat")
        pm.add_commands(group)
        assert pm.records[name].ok, pm.records[name].error
        assert group.commands, f"{name} added no command"
        for command in group.commands:
            args = [command, "--help"]
            if isinstance(group.commands[command], click.Group):
                args = [command, next(iter(group.commands[command].commands)), "--help"]
            result = CliRunner().invoke(group, args)
            assert result.exit_code == 0, result.output
        if name != "my_plugin":
            continue
        # the guide's two commands, run: the descriptor shape of a pipeline of the test
        # plugin's color-blur extractor, and a swatch
        monkeypatch.chdir(tmp_path)
        smooth_texture((24, 16)).save("img.png")
        Path("blur.toml").write_text('[extractor]\nplugin = "color-blur"\n')
        result = CliRunner().invoke(group, ["describe", "blur.toml", "img.png", "--json"])
        assert result.exit_code == 0, result.output
        from diffeat.core.pipeline import Pipeline

        expected = list(Pipeline.from_file("blur.toml").view("img.png").descriptors.shape)
        assert json.loads(result.output) == {"image": "img.png", "shape": expected}
        result = CliRunner().invoke(group, ["plot", "swatch", "img.png", "--out", "s.png"])
        assert result.exit_code == 0, result.output
        assert Path("s.png").stat().st_size > 0


def test_import_table_names_importable_paths() -> None:
    """Each name of the guide's "Where the public types live" table imports from every
    module its row names."""
    import importlib

    text = DOC.read_text()
    start = text.index("\n### Where the public types live\n")
    table = text[start : text.index("```", start)]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 8
    for row in rows:
        names_cell, where_cell = row.split("|")[1:3]
        names = re.findall(r"`([A-Za-z_]+)`", names_cell)
        modules = re.findall(r"`(diffeat[a-z_.]*)`", where_cell)
        assert names and modules, row
        for module in modules:
            for name in names:
                assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
