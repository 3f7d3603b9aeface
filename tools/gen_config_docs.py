"""Regenerate the option tables of docs/config.md from the plugins' Options dataclasses.

Usage: python tools/gen_config_docs.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffeat.core.options import describe_options
from diffeat.core.plugins import PluginManager
from diffeat.train.options import TrainTable

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
MARKER = "## Options of the built-in plugins"
KINDS = ("extractor", "aggregator", "matcher", "dataset")


def option_rows(factory: object) -> list[str]:
    rows = describe_options(factory)
    if not rows:
        return ["No options.\n"]
    out = ["| option | type | default | meaning |\n|---|---|---|---|"]
    for r in rows:
        help_text = r["help"].replace("|", "\\|")
        out.append(f"| `{r['name']}` | {r['type']} | `{json.dumps(r['default'])}` | {help_text} |")
    out.append("")
    return out


def tables() -> str:
    pm = PluginManager(entry_points=False)
    out = []
    for kind in KINDS:
        for name in pm.names(kind):
            out.append(f"### {kind} `{name}`\n")
            out.extend(option_rows(pm.get(kind, name).factory))
    out.append("### `[train]` table (`diffeat train`)\n")
    out.append(
        "Options of `diffeat train` (see `docs/cli.md`), in a pipeline's optional `[train]` "
        "table or as `--set train.OPTION=VALUE`.\n"
    )
    out.extend(option_rows(TrainTable))
    return "\n".join(out)


def render() -> str:
    head = DOC.read_text().split(MARKER)[0]
    intro = (
        f"{MARKER}\n\nThe tables below are generated from the plugins' `Options` dataclasses "
        "by `python tools/gen_config_docs.py`; a test fails when they are stale.\n\n"
    )
    return head + intro + tables()


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        return 0 if DOC.read_text() == text else 1
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
