"""Evaluation outputs: ``results.json``, ``results.md``, a terminal table, plots.

``results.json`` keeps every setting (the resolved pipeline config and its
digest, the dataset and its options, the protocol), the run statistics
(features computed vs read from the store, stored bytes, time per pair), the
PCK summaries (with the number of scored keypoints that had no usable
prediction, counted wrong) and, per pair, the predictions and the correctness
of each keypoint under every threshold and alpha. PCK values are fractions in
``[0, 1]`` in JSON and percentages in tables.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from diffeat.eval.pck import format_alpha
from diffeat.eval.runner import Evaluation

AVERAGE_LABEL = {
    "per-image": "per image",
    "per-point": "per point",
    "category-mean-per-image": "mean of categories (per image)",
    "category-mean-per-point": "mean of categories (per point)",
    "category-weighted-per-point": "pair-weighted mean of categories (per point)",
}


def _clean(value: Any) -> Any:
    """JSON-safe: arrays to lists, NaN / inf to None."""
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def pair_records(ev: Evaluation) -> list[dict[str, Any]]:
    records = []
    for outcome, thresholds in zip(ev.outcomes, ev.pair_thresholds):
        pair = outcome.pair
        dist = outcome.distances()
        invalid = outcome.invalid()
        outside = outcome.outside()
        correctness: dict[str, dict[str, list[bool | None]]] = {}
        for kind in ev.thresholds:
            t = thresholds[kind]
            correctness[kind] = {}
            for alpha in ev.alphas:
                if math.isnan(t):
                    ok = [None] * len(dist)
                else:
                    hits = ev.protocol.correct(dist, t, alpha)
                    ok = [bool(h) if not math.isnan(d) else None for h, d in zip(hits, dist)]
                correctness[kind][format_alpha(alpha)] = ok
        record = pair.to_dict()
        record.update(
            {
                "predicted": np.round(outcome.predicted, 3),
                "scores": np.round(outcome.scores, 6),
                "valid": outcome.valid,
                "distances": np.round(dist, 4),
                "invalid": [bool(b) if not math.isnan(d) else None for b, d in zip(invalid, dist)],
                "invalid_points": int(invalid.sum()),
                "outside_image_points": int(outside.sum()),
                "thresholds": thresholds,
                "correct": correctness,
                "seconds": round(outcome.seconds, 5),
                "clipped_source_points": outcome.clipped,
            }
        )
        records.append(record)
    return _clean(records)


def results_dict(
    ev: Evaluation, *, pairs: bool = True, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The content of ``results.json`` (``pairs=False`` leaves out the per-pair records)."""
    from diffeat import __version__

    kind, alpha = ev.thresholds[0], ev.alphas[0]
    out: dict[str, Any] = {
        "diffeat": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"name": ev.dataset, **ev.dataset_info},
        "protocol": ev.protocol.to_dict(ev.dataset),
        "pipeline": {"config": ev.pipeline_config, "digest": ev.pipeline_digest},
        "store": ev.store,
        "run": ev.stats.to_dict(),
        "headline": {
            "threshold": kind,
            "alpha": alpha,
            "average": ev.protocol.average,
            "value": ev.headline(kind, alpha),
        },
        "summary": ev.summaries,
    }
    if extra:
        out.update(extra)
    if pairs:
        out["pairs"] = pair_records(ev)
    return _clean(out)


def write_json(ev: Evaluation, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(results_dict(ev, extra=extra), indent=1))
    return path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def category_rows(ev: Evaluation, kind: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-category table of one threshold kind."""
    summary = ev.summaries[kind]
    header = ["category", "pairs", "points"]
    for alpha in ev.alphas:
        a = format_alpha(alpha)
        header += [f"PCK@{a} (image)", f"PCK@{a} (point)"]
    first = summary["by_alpha"][format_alpha(ev.alphas[0])]
    rows = []
    for cat, info in first["categories"].items():
        row = [cat, str(info["pairs"]), str(info["points"])]
        for alpha in ev.alphas:
            c = summary["by_alpha"][format_alpha(alpha)]["categories"][cat]
            row += [_pct(c["per_image"]), _pct(c["per_point"])]
        rows.append(row)
    mean = ["mean of categories", "", ""]
    total = ["all pairs", str(summary["pairs"]), str(summary["points"])]
    for alpha in ev.alphas:
        s = summary["by_alpha"][format_alpha(alpha)]
        mean += [_pct(s["category_mean_per_image"]), _pct(s["category_mean_per_point"])]
        total += [_pct(s["per_image"]), _pct(s["per_point"])]
    rows += [mean, total]
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(r, widths))
            )
        )
    return "\n".join(lines)


def _settings_lines(ev: Evaluation) -> list[str]:
    p = ev.protocol
    stats = ev.stats.to_dict()
    feats = stats["features"]
    lines = [
        f"dataset: {ev.dataset} ({ev.dataset_info.get('title', '')}), {stats['pairs']} pairs",
        f"protocol: {p.name}; threshold {', '.join(ev.thresholds)}; correct if {p.test()}; "
        f"headline {AVERAGE_LABEL[p.average]}",
        f"pipeline: {ev.pipeline_source or '<memory>'} (digest {ev.pipeline_digest[:16]})",
        f"features: {feats['computed']} computed, {feats['read_from_store']} read from the store"
        if ev.store
        else f"features: {feats['computed']} computed (no store)",
    ]
    if ev.store:
        nbytes = ev.store.get("cache_key_bytes")
        held = f" (this pipeline's features: {nbytes} bytes)" if nbytes is not None else ""
        lines.append(f"store: {ev.store['path']}{held}")
    if stats["seconds_per_pair_mean"] is not None:
        lines.append(
            f"time: {stats['seconds_total']:.2f} s, {1000 * stats['seconds_per_pair_mean']:.1f} ms "
            "per pair (mean)"
        )
    if stats["clipped_source_points"]:
        lines.append(f"clipped source points: {stats['clipped_source_points']}")
    if stats["invalid_predictions"]:
        lines.append(
            f"keypoints without a usable prediction (NaN or marked invalid; counted wrong): "
            f"{stats['invalid_predictions']}"
        )
    if stats["outside_image_predictions"]:
        lines.append(
            f"predictions outside the target image (scored by distance): "
            f"{stats['outside_image_predictions']}"
        )
    if stats["size_mismatches"]:
        lines.append(
            f"image size differs from the annotation: {len(stats['size_mismatches'])} time(s)"
        )
    return lines


def headline_line(ev: Evaluation) -> str:
    parts = []
    for kind in ev.thresholds:
        for alpha in ev.alphas:
            parts.append(f"PCK@{format_alpha(alpha)} ({kind}) {_pct(ev.headline(kind, alpha))}")
    return f"{AVERAGE_LABEL[ev.protocol.average]}: " + "; ".join(parts)


def terminal_report(ev: Evaluation) -> str:
    out = [*_settings_lines(ev), headline_line(ev), ""]
    for kind in ev.thresholds:
        header, rows = category_rows(ev, kind)
        out += [
            f"threshold {kind} (PCK in %; (image): mean over pairs, (point): over all keypoints)",
            text_table(header, rows),
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def _pipeline_name(ev: Evaluation) -> str:
    name = ev.pipeline_config.get("name")
    if name:
        return f"pipeline {name}"
    if ev.pipeline_source and ev.pipeline_source != "<memory>":
        return f"pipeline {Path(ev.pipeline_source).name}"
    return f"pipeline {ev.pipeline_digest[:12]}"


def markdown(ev: Evaluation, plots: list[str] | None = None) -> str:
    p = ev.protocol
    out = [
        f"# {ev.dataset}: PCK of {_pipeline_name(ev)}",
        "",
    ]
    out += [f"- {line}" for line in _settings_lines(ev)]
    if p.reproduces:
        out.append(f"- protocol reproduces: {p.reproduces}")
    out += ["", f"**{headline_line(ev)}**", ""]
    for kind in ev.thresholds:
        header, rows = category_rows(ev, kind)
        out += [
            f"## Threshold `{kind}`",
            "",
            "PCK in %; (image): mean over pairs of per-pair PCK, (point): over all keypoints.",
            "",
        ]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in rows:
            cells = [
                f"**{c}**" if row[0] in ("mean of categories", "all pairs") and c else c
                for c in row
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


def write_outputs(
    ev: Evaluation, out: str | Path, *, plots: bool = True, extra: dict[str, Any] | None = None
) -> dict[str, str]:
    """Write results.json, results.md and (optionally) the plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": str(write_json(ev, out / "results.json", extra=extra))}
    plot_files: list[str] = []
    if plots:
        from diffeat.eval.plots import write_plots

        plot_files = [str(p) for p in write_plots(ev, out)]
        written["plots"] = plot_files  # type: ignore[assignment]
    md = out / "results.md"
    md.write_text(markdown(ev, plot_files))
    written["markdown"] = str(md)
    return written
