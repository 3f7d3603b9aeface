"""Evaluation tasks beside PCK on image pairs: the contract and the registry.

A dataset declares its task kind (:attr:`diffeat.core.datasets.Dataset.task`).
``"pairs"`` datasets are scored by :mod:`diffeat.eval.runner` (PCK). Every
other kind names a runner here, imported only when a dataset of that kind is
evaluated:

- ``"homography"``: image sequences with ground-truth homographies (HPatches),
  :mod:`diffeat.eval.homography`;
- ``"propagation"``: videos whose first-frame labels (masks, joints) are
  propagated through the frames (DAVIS-2017, JHMDB), :mod:`diffeat.eval.propagation`.

A runner is ``run(context: TaskContext) -> TaskEvaluation``. The options of a
task come from the pipeline file's table of the same name (``[homography]``,
``[propagation]``, overridable with ``--set homography.method=ransac``) and are
validated by the runner. All tasks write the same layout: ``results.json``,
``results.md`` and ``plots/`` in ``--out`` (:func:`write_task_outputs`), and
name their protocol in the results.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from diffeat.core.errors import DiffeatError

if TYPE_CHECKING:
    from diffeat.core.pipeline import Pipeline

#: task kind -> "module:function" of its runner (the "pairs" kind is diffeat.eval.runner)
TASK_RUNNERS: dict[str, str] = {
    "homography": "diffeat.eval.homography:run",
    "propagation": "diffeat.eval.propagation:run",
}


class Progress(Protocol):
    """The part of a tqdm bar a task uses."""

    total: float | None

    def update(self, n: float = 1) -> Any: ...


@dataclass
class TaskContext:
    """What a task runner gets from ``diffeat eval``."""

    pipeline: Pipeline
    dataset: Any
    dataset_name: str
    #: the raw options table of the task from the pipeline file (``{}`` when it has none)
    options: dict[str, Any] = field(default_factory=dict)
    #: only the first N units (sequences, videos) when set
    limit: int | None = None
    #: a bar the runner may set ``total`` of and update once per unit; None when quiet
    progress: Progress | None = None


class TaskEvaluation(Protocol):
    """The outcome of a task run, as ``diffeat eval`` writes and prints it."""

    def results_dict(self, *, records: bool = True) -> dict[str, Any]:
        """results.json: ``task``, ``dataset``, ``protocol`` (name and every setting),
        ``summary`` (the headline numbers), ``skipped`` (units not evaluated, each with the
        reason), ``pipeline`` (resolved config) and, with ``records``, per-unit records."""
        ...

    def markdown(self, plots: list[str]) -> str:
        """results.md: the tables, linking ``plots`` (paths relative to the output folder)."""
        ...

    def terminal_report(self) -> str:
        """What ``diffeat eval`` prints."""
        ...

    def write_plots(self, out: Path) -> list[Path]:
        """Draw the task's plots into ``out / "plots"``; return the files."""
        ...


def task_runner(task: str) -> Callable[[TaskContext], TaskEvaluation]:
    """The runner of a task kind; a clear error for a kind diffeat does not know."""
    target = TASK_RUNNERS.get(task)
    if target is None:
        known = ", ".join(["pairs", *TASK_RUNNERS])
        raise DiffeatError(f"unknown evaluation task {task!r}; diffeat evaluates: {known}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def write_task_outputs(
    ev: TaskEvaluation, out: str | Path, *, plots: bool = True, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write results.json, results.md and (optionally) the plots of a task into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {**ev.results_dict(records=True), **(extra or {})}
    json_path = out / "results.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(json_path)
    written: dict[str, Any] = {"json": str(json_path)}
    plot_files = [str(p) for p in ev.write_plots(out)] if plots else []
    if plots:
        written["plots"] = plot_files
    md = out / "results.md"
    md.write_text(ev.markdown([str(Path(p).relative_to(out)) for p in plot_files]))
    written["markdown"] = str(md)
    return written
