"""The homography task (HPatches): DIFT's geometric-correspondence protocol.

For every sequence of a ``"homography"`` dataset, image 1 against each target:

1. keypoints: the benchmark's (DIFT's SuperPoint files) or detected
   (:mod:`diffeat.eval.keypoints`), repeats removed (``np.unique``, as DIFT);
2. descriptors: the pipeline's descriptor map of each image (extractor and
   aggregator, through the feature store: computed once, reused by later runs)
   sampled bilinearly at the keypoints, with DIFT's half-cell offset as a switch
   (:mod:`diffeat.eval.homography_metrics`);
3. mutual nearest neighbours between the two keypoint sets (cosine; ``l2`` for
   ADM). The pipeline's own ``[matcher]`` is not used: the protocol matches
   keypoint sets, not query points;
4. ``cv2.findHomography`` (LMEDS; RANSAC with a threshold as an option);
5. error = mean distance of image 1's four corners warped by the estimate and by
   the ground truth; accuracy = share of pairs with error ``<= t`` for each
   threshold (1, 3, 5 px), over all pairs, illumination and viewpoint sequences.

Options come from the pipeline file's ``[homography]`` table
(:class:`HomographyOptions`). ``run`` is the task runner of
:mod:`diffeat.eval.tasks`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from diffeat.core.components import needs_descriptors
from diffeat.core.datasets import description_of
from diffeat.core.errors import DiffeatError
from diffeat.core.images import ImageInput, as_input
from diffeat.core.options import build_options, opt, options_dict
from diffeat.core.sequences import (
    SEQUENCE_KINDS,
    HomographySequence,
    SequenceImage,
    SkippedSequence,
    apply_homography,
)
from diffeat.eval.homography_metrics import (
    accuracy,
    corner_error,
    estimate_homography,
    mutual_nearest,
    require_cv2,
    sample_descriptors,
    threshold_key,
    unique_keypoints,
)
from diffeat.eval.keypoints import detect_keypoints
from diffeat.eval.report import text_table
from diffeat.eval.tasks import TaskContext

PROTOCOL = "dift-hpatches"
#: the settings of DIFT's own evaluation (eval_homography.py, SD features)
#: DIFT's settings: SD (LMEDS, cosine) and ADM (RANSAC 3 px, L2)
OFFICIAL = (
    {"method": "lmeds", "metric": "cosine", "half_cell_offset": True},
    {"method": "ransac", "ransac_threshold": 3.0, "metric": "l2", "half_cell_offset": True},
)
SUBSETS = ("all", *SEQUENCE_KINDS)

__all__ = ["HomographyEvaluation", "HomographyOptions", "PairRecord", "run"]


@dataclass
class HomographyOptions:
    method: Literal["lmeds", "ransac"] = opt(
        "lmeds", "cv2.findHomography method: lmeds (DIFT SD) or ransac (DIFT ADM)"
    )
    ransac_threshold: float = opt(3.0, "reprojection threshold in pixels (ransac)")
    metric: Literal["cosine", "l2"] = opt(
        "cosine", "mutual nearest neighbours by cosine similarity (DIFT SD) or L2 (DIFT ADM)"
    )
    half_cell_offset: bool = opt(
        True,
        "sample descriptors as DIFT does: x normalised by (w-1)/2 with grid_sample "
        "align_corners=False, zeros padding (false: at the pixel centres, border padding)",
    )
    thresholds: list[float] = opt([1.0, 3.0, 5.0], "corner-error thresholds in pixels")
    detector: Literal["sift", "orb", "gftt"] = opt(
        "sift", "OpenCV keypoint detector when the dataset gives no keypoints"
    )
    max_keypoints: int = opt(1000, "strongest detected keypoints kept per image")
    plots: int = opt(4, "pairs drawn in plots/homography_pairs.png")

    def validate(self) -> None:
        if not self.thresholds or any(not (t > 0) for t in self.thresholds):
            raise ValueError(f"thresholds must be positive pixel values, got {self.thresholds}")
        if self.ransac_threshold <= 0:
            raise ValueError(f"ransac_threshold must be > 0, got {self.ransac_threshold}")
        if self.max_keypoints < 4:
            raise ValueError(f"max_keypoints must be at least 4, got {self.max_keypoints}")
        if self.plots < 0:
            raise ValueError(f"plots must be >= 0, got {self.plots}")


class _Task:
    Options = HomographyOptions


@dataclass
class PairRecord:
    """The outcome of one image pair (reference vs one target)."""

    sequence: str
    kind: str
    index: int
    reference: Path
    target: Path
    reference_size: tuple[int, int]
    truth: np.ndarray
    estimate: np.ndarray | None
    keypoints: tuple[int, int]
    error: float
    seconds: float
    #: matched points ``[M, 2]`` in the reference and in the target, and the inlier mask
    src: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 2)))
    dst: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 2)))
    inliers: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def matches(self) -> int:
        return len(self.src)

    def match_errors(self) -> np.ndarray:
        """``[M]`` distance of each match's target point to where the truth maps its source."""
        if not len(self.src):
            return np.zeros(0)
        return np.linalg.norm(apply_homography(self.truth, self.src) - self.dst, axis=1)

    def to_dict(self, thresholds: list[float]) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "kind": self.kind,
            "target_index": self.index,
            "reference": str(self.reference),
            "target": str(self.target),
            "keypoints": list(self.keypoints),
            "matches": self.matches,
            "inliers": int(self.inliers.sum()),
            "correct_matches_3px": int((self.match_errors() <= 3.0).sum()),
            "corner_error": self.error if math.isfinite(self.error) else None,
            "estimated": self.estimate is not None,
            "correct": {threshold_key(t): bool(self.error <= t) for t in thresholds},
            "homography": None if self.estimate is None else self.estimate.tolist(),
            "seconds": round(self.seconds, 4),
        }


@dataclass
class RunCounts:
    computed: int = 0
    read_from_store: int = 0
    seconds: float = 0.0


@dataclass
class HomographyEvaluation:
    """What :func:`run` produced; written by :func:`diffeat.eval.tasks.write_task_outputs`."""

    dataset: str
    dataset_info: dict[str, Any]
    options: HomographyOptions
    keypoint_source: str
    records: list[PairRecord]
    skipped: list[dict[str, str]]
    counts: RunCounts
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    pipeline_digest: str = ""
    pipeline_source: str = ""

    # -- numbers ---------------------------------------------------------------

    def subset(self, name: str) -> list[PairRecord]:
        return [r for r in self.records if name == "all" or r.kind == name]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"thresholds": list(self.options.thresholds)}
        for name in SUBSETS:
            recs = self.subset(name)
            errors = np.array([r.error for r in recs], dtype=np.float64)
            finite = errors[np.isfinite(errors)]
            out[name] = {
                "pairs": len(recs),
                "accuracy": accuracy(errors, self.options.thresholds),
                "median_corner_error": float(np.median(errors)) if len(errors) else None,
                "mean_corner_error_of_estimates": float(finite.mean()) if len(finite) else None,
                "no_estimate": int((~np.isfinite(errors)).sum()),
            }
        return out

    def protocol(self) -> dict[str, Any]:
        settings = options_dict(self.options)
        settings.pop("plots", None)
        official = (
            any(all(settings[k] == v for k, v in setting.items()) for setting in OFFICIAL)
            and [float(t) for t in self.options.thresholds] == [1.0, 3.0, 5.0]
            and self.keypoint_source.startswith("dataset")
        )
        return {
            "name": PROTOCOL,
            "description": (
                "image 1 vs 2..6 of each sequence; descriptors sampled at keypoints, mutual "
                "nearest neighbours, cv2.findHomography, error = mean distance of the 4 warped "
                "corners of image 1, accuracy = share of pairs with error <= t"
            ),
            "keypoints": self.keypoint_source,
            "settings": settings,
            "official": official,
            "matcher": "mutual nearest neighbours of the keypoint sets (the pipeline's "
            "[matcher] is not used)",
        }

    def run_info(self) -> dict[str, Any]:
        times = np.array([r.seconds for r in self.records], dtype=np.float64)
        return {
            "pairs": len(self.records),
            "sequences": len({r.sequence for r in self.records}),
            "skipped_sequences": len(self.skipped),
            "features": {
                "computed": self.counts.computed,
                "read_from_store": self.counts.read_from_store,
            },
            "seconds_total": round(self.counts.seconds, 4),
            "seconds_per_pair_mean": float(times.mean()) if len(times) else None,
            "seconds_per_pair_median": float(np.median(times)) if len(times) else None,
        }

    # -- the TaskEvaluation protocol ------------------------------------------------

    def results_dict(self, *, records: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": "homography",
            "dataset": {"name": self.dataset, **self.dataset_info},
            "protocol": self.protocol(),
            "summary": self.summary(),
            "skipped": list(self.skipped),
            "run": self.run_info(),
            "pipeline": {
                "config": self.pipeline_config,
                "digest": self.pipeline_digest,
                "source": self.pipeline_source,
            },
        }
        if records:
            out["records"] = [r.to_dict(self.options.thresholds) for r in self.records]
        return _clean(out)

    def table(self) -> tuple[list[str], list[list[str]]]:
        summary = self.summary()
        header = ["sequences", "pairs"] + [
            f"acc@{threshold_key(t)}px" for t in self.options.thresholds
        ]
        header += ["median error (px)"]
        rows = []
        for name in SUBSETS:
            s = summary[name]
            row = [name, str(s["pairs"])]
            row += [_pct(s["accuracy"][threshold_key(t)]) for t in self.options.thresholds]
            med = s["median_corner_error"]
            row.append("-" if med is None else ("inf" if math.isinf(med) else f"{med:.2f}"))
            rows.append(row)
        return header, rows

    def _settings(self) -> list[str]:
        p = self.protocol()
        s = p["settings"]
        run = self.run_info()
        fit = s["method"] + (f" ({s['ransac_threshold']:g} px)" if s["method"] == "ransac" else "")
        return [
            f"dataset: {self.dataset} ({self.dataset_info.get('title', '')}), "
            f"{run['pairs']} pairs in {run['sequences']} sequences",
            f"protocol: {p['name']}{' (official settings)' if p['official'] else ''}: "
            f"keypoints {p['keypoints']}; {s['metric']} mutual nearest neighbours; "
            f"findHomography {fit}; half-cell offset {'on' if s['half_cell_offset'] else 'off'}",
            f"features: {run['features']['computed']} computed, "
            f"{run['features']['read_from_store']} read from the store; "
            + (
                f"{run['seconds_per_pair_mean']:.3f} s per pair"
                if run["seconds_per_pair_mean"] is not None
                else "no pair evaluated"
            ),
        ]

    def terminal_report(self) -> str:
        header, rows = self.table()
        lines = [*self._settings(), "", text_table(header, rows)]
        if self.skipped:
            lines += ["", f"skipped {len(self.skipped)} sequence(s):"]
            lines += [f"  {s['name']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines) + "\n"

    def markdown(self, plots: list[str]) -> str:
        header, rows = self.table()
        name = self.pipeline_config.get("name") or Path(self.pipeline_source).stem or "pipeline"
        lines = [f"# {name} on {self.dataset}: homography accuracy", ""]
        lines += [f"- {line}" for line in self._settings()]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if self.skipped:
            lines += ["", f"Skipped {len(self.skipped)} sequence(s):", ""]
            lines += [f"- `{s['name']}`: {s['reason']}" for s in self.skipped]
        for p in plots:
            lines += ["", f"![{Path(p).stem}]({p})"]
        return "\n".join(lines) + "\n"

    def write_plots(self, out: Path) -> list[Path]:
        from diffeat.eval.homography_plots import write_homography_plots

        return write_homography_plots(self, Path(out) / "plots")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _clean(value: Any) -> Any:
    """JSON-safe: arrays to lists, NaN / inf to None."""
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


# -- the run -------------------------------------------------------------------------


class _Features:
    """Views of images through the pipeline, counting store reads and computations."""

    def __init__(self, pipeline: Any, counts: RunCounts) -> None:
        self.pipeline = pipeline
        self.counts = counts

    def view(self, inp: ImageInput) -> Any:
        if self.pipeline.store is not None and self.pipeline.is_stored(inp):
            self.counts.read_from_store += 1
        else:
            self.counts.computed += 1
        return self.pipeline.view(inp)


def _keypoints(image: SequenceImage, inp: ImageInput, opts: HomographyOptions) -> np.ndarray:
    kps = image.keypoints
    if kps is None:
        kps = detect_keypoints(inp.image, opts.detector, opts.max_keypoints)
    return kps


def evaluate_sequence(
    seq: HomographySequence, features: _Features, opts: HomographyOptions
) -> list[PairRecord]:
    """Every pair of one sequence; a :class:`DiffeatError` (naming the file) if one fails."""
    t0 = time.perf_counter()
    ref_inp = as_input(seq.reference.path)
    ref_view = features.view(ref_inp)
    kps_a, _ = unique_keypoints(_keypoints(seq.reference, ref_inp, opts))
    desc_a = sample_descriptors(ref_view, kps_a, half_cell_offset=opts.half_cell_offset)
    ref_seconds = time.perf_counter() - t0
    records = []
    for target in seq.targets:
        t1 = time.perf_counter()
        inp = as_input(target.image.path)
        view = features.view(inp)
        kps_b, _ = unique_keypoints(_keypoints(target.image, inp, opts))
        desc_b = sample_descriptors(view, kps_b, half_cell_offset=opts.half_cell_offset)
        pairs = mutual_nearest(desc_a, desc_b, opts.metric)
        src = kps_a[pairs[:, 0]].astype(np.float64)
        dst = kps_b[pairs[:, 1]].astype(np.float64)
        estimate, inliers = estimate_homography(src, dst, opts.method, opts.ransac_threshold)
        error = corner_error(estimate, target.homography, ref_inp.size)
        seconds = time.perf_counter() - t1 + ref_seconds / max(1, len(seq.targets))
        records.append(
            PairRecord(
                sequence=seq.name,
                kind=seq.kind,
                index=target.index,
                reference=seq.reference.path,
                target=target.image.path,
                reference_size=ref_inp.size,
                truth=target.homography,
                estimate=estimate,
                keypoints=(len(kps_a), len(kps_b)),
                error=error,
                seconds=seconds,
                src=src,
                dst=dst,
                inliers=inliers,
            )
        )
    return records


def run(context: TaskContext) -> HomographyEvaluation:
    """The task runner (see :mod:`diffeat.eval.tasks`)."""
    opts: HomographyOptions = build_options(_Task, dict(context.options), "[homography]")
    pipeline = context.pipeline
    if not needs_descriptors(pipeline.matcher):
        raise DiffeatError(
            f"the homography task samples descriptor maps, but the pipeline's matcher "
            f"{pipeline.config.matcher.plugin!r} works without descriptors; use a pipeline "
            'with an extractor and a descriptor matcher (e.g. plugin = "mutual")'
        )
    require_cv2()
    dataset = context.dataset
    sequences = getattr(dataset, "sequences", None)
    if sequences is None:
        raise DiffeatError(
            f"the {context.dataset_name} dataset declares the homography task but has no "
            "sequences() method (see diffeat.core.sequences)"
        )
    counts = RunCounts()
    features = _Features(pipeline, counts)
    records: list[PairRecord] = []
    skipped: list[dict[str, str]] = []
    given: set[bool] = set()
    start = time.perf_counter()
    items = list(sequences())[: context.limit]  # reading them is cheap: no image is decoded
    if context.progress is not None:
        context.progress.total = len(items)
    for item in items:
        if isinstance(item, SkippedSequence):
            skipped.append(item.to_dict())
        else:
            try:
                records.extend(evaluate_sequence(item, features, opts))
                given.add(item.reference.keypoints is not None)
            except DiffeatError as exc:
                skipped.append({"name": item.name, "reason": str(exc)})
        if context.progress is not None:
            context.progress.update(1)
    counts.seconds = time.perf_counter() - start
    if not records:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3])
        raise DiffeatError(
            f"the {context.dataset_name} dataset gave no sequence to evaluate"
            + (f" (skipped: {reasons})" if reasons else " (check --root, --split and options)")
        )
    if given == {True}:
        source = "dataset files"
    elif given == {False}:
        source = f"detected: OpenCV {opts.detector}, strongest {opts.max_keypoints}"
    else:
        source = f"dataset files where given, else OpenCV {opts.detector}"
    return HomographyEvaluation(
        dataset=context.dataset_name,
        dataset_info=description_of(dataset),
        options=opts,
        keypoint_source=source,
        records=records,
        skipped=skipped,
        counts=counts,
        pipeline_config=pipeline.config.resolved(),
        pipeline_digest=pipeline.config.digest(),
        pipeline_source=str(pipeline.config.source),
    )
