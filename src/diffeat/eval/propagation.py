"""The ``"propagation"`` task of ``diffeat eval``: label propagation through videos.

A ``"propagation"`` dataset yields :class:`~diffeat.core.videos.Video` records
from ``videos()``. Each frame's descriptor map comes from the pipeline (its
store keyed by frame content), the first frame's labels are propagated frame by
frame (:mod:`diffeat.eval.labelprop`, DINO/UVC's algorithm as DIFT runs it) and
the predictions are scored:

- masks (DAVIS-2017): J, F and J&F as ``davis2017-evaluation``
  (:mod:`diffeat.eval.davis_metrics`);
- joints (JHMDB): PCK@0.1 / @0.2 (:mod:`diffeat.eval.joints`).

A video that cannot be evaluated (a missing annotation, a mask whose size
differs from its frame, an unreadable frame) is skipped with the reason, which
``results.json`` lists under ``skipped``; the others are still evaluated.

Options (the pipeline file's ``[propagation]`` table, ``--set propagation.topk=10``):
see :class:`PropagationOptions`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffeat.core.config import config_digest
from diffeat.core.datasets import description_of
from diffeat.core.errors import DiffeatError, ImageError
from diffeat.core.geometry import ImageTransform, Size, grid_size_of
from diffeat.core.images import ImageInput
from diffeat.core.options import build_options, opt, options_dict
from diffeat.core.videos import Frame, Video, frame_input, read_indexed_png
from diffeat.eval.davis_metrics import score_sequence
from diffeat.eval.labelprop import PropagationSettings, Propagator, labels_to_ids, one_hot
from diffeat.eval.tasks import TaskContext

__all__ = [
    "MaskPropagation",
    "PropagationEvaluation",
    "PropagationOptions",
    "content_box",
    "frame_descriptors",
    "grid_ids",
    "propagate_masks",
    "run",
]


@dataclass
class PropagationOptions:
    """Options of label propagation (defaults: DIFT's DAVIS-2017 settings)."""

    temperature: float = opt(0.2, "affinity exp(cos / temperature) (DIFT SD: 0.2; ADM: 0.1)")
    topk: int = opt(15, "affinities kept per target cell over all context positions (ADM: 10)")
    context: int = opt(28, "previous predicted frames in the context (plus the first frame)")
    radius: int = opt(15, "local window radius in feature cells ((2r+1)^2); 0: no window")
    sigma: float = opt(0.5, "joints: Gaussian label-map sigma in feature cells (VideoWalk)")
    block: int = opt(
        8, "target cells per side of an affinity block (memory and speed, not results)"
    )
    plots: int = opt(3, "videos drawn in plots/ (first, middle and last frame)")

    def validate(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.context < 0:
            raise ValueError(f"context must be >= 0, got {self.context}")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")

    def settings(self) -> PropagationSettings:
        return PropagationSettings(
            self.temperature, self.topk, self.context, self.radius, self.block
        )


class _OptionsHolder:
    Options = PropagationOptions


def parse_options(raw: dict[str, Any], where: str = "[propagation]") -> PropagationOptions:
    """Validate the raw ``[propagation]`` table."""
    return build_options(_OptionsHolder, dict(raw), where)


# -- one video ---------------------------------------------------------------------


def frame_descriptors(pipe: Any, inp: ImageInput) -> tuple[torch.Tensor, ImageTransform]:
    """The descriptor map ``[C, h, w]`` of a frame (stored or extracted) and its transform."""
    view = pipe.view(inp)
    if view.descriptors is None:
        raise DiffeatError(
            f"label propagation needs descriptor maps, but the matcher "
            f"{pipe.config.matcher.plugin!r} works without them; use a descriptor matcher "
            '(e.g. [matcher] plugin = "nearest")'
        )
    return view.descriptors, view.transform


def content_box(transform: ImageTransform) -> tuple[int, int, int, int] | None:
    """Where the frame lies in the model input; ``None`` when it fills it (a resize)."""
    if transform.offset == (0.0, 0.0):
        return None
    (w, h), (sx, sy), (ox, oy) = transform.image_size, transform.scale, transform.offset
    return (round(ox), round(oy), round(ox + w * sx), round(oy + h * sy))


def grid_ids(ids: np.ndarray, transform: ImageTransform, grid: Size) -> torch.Tensor:
    """Object ids ``[H, W]`` at the feature grid ``[h, w]``: a nearest resize (the official
    ``seg.resize(grid, 0)``) when the frame fills the model input; else each cell takes
    the id under its centre (0 outside the frame)."""
    if content_box(transform) is None:
        small = Image.fromarray(ids.astype(np.uint8)).resize(grid, Image.Resampling.NEAREST)
        return torch.from_numpy(np.array(small, dtype=np.int64))
    gw, gh = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    cells = torch.stack([xs, ys], dim=-1).reshape(-1, 2).float()
    pts = transform.grid_to_image(cells, grid).round().long()
    h, w = ids.shape
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    out = torch.zeros(len(pts), dtype=torch.int64)
    src = torch.from_numpy(ids.astype(np.int64))
    out[inside] = src[pts[inside, 1], pts[inside, 0]]
    return out.view(gh, gw)


def propagate_masks(
    pipe: Any,
    frames: list[Frame],
    first: np.ndarray,
    settings: PropagationSettings,
    *,
    on_frame: Callable[[int, np.ndarray], None] | None = None,
    names: Callable[[int], str] | None = None,
) -> Iterator[np.ndarray]:
    """Yield the predicted ids ``[H, W]`` of every frame (frame 0: ``first`` itself).

    ``first`` is the first frame's id map at its size. The context queue lives on
    the pipeline's device.
    """
    name = names or (lambda i: f"frame {i}")
    inp = _frame(frames[0], name(0))
    if first.shape != (inp.size[1], inp.size[0]):
        raise DiffeatError(
            f"{name(0)}: the first mask is {first.shape[1]}x{first.shape[0]} but the frame is "
            f"{inp.size[0]}x{inp.size[1]}; masks must have their frame's size"
        )
    desc, transform = frame_descriptors(pipe, inp)
    grid = grid_size_of(desc)
    prop = Propagator(settings)
    prop.start(desc, one_hot(grid_ids(first, transform, grid)).to(desc.device))
    yield first
    for i in range(1, len(frames)):
        inp = _frame(frames[i], name(i))
        desc, transform = frame_descriptors(pipe, inp)
        if grid_size_of(desc) != grid:
            raise DiffeatError(
                f"{name(i)}: its feature grid {grid_size_of(desc)} differs from the first "
                f"frame's {grid}; every frame of a video must have the same size"
            )
        soft = prop.step(desc)
        ids = labels_to_ids(soft, transform.model_size, inp.size, content_box(transform))
        if on_frame is not None:
            on_frame(i, ids)
        yield ids


def _frame(frame: Frame, what: str) -> ImageInput:
    try:
        return frame_input(frame, what)
    except ImageError as exc:
        raise DiffeatError(f"{what}: {exc}") from None


# -- the task ------------------------------------------------------------------------


def _frame_size(path: Path) -> Size:
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DiffeatError(f"frame not found: {path}") from None
    except OSError as exc:
        raise DiffeatError(f"cannot read the frame {path}: {exc}") from None


def check_masks(video: Video) -> None:
    """Refuse a mask video whose annotations are missing or sized unlike their frames."""
    if video.meta.get("error") or not video.frames:
        raise DiffeatError(str(video.meta.get("error") or f"{video.id}: no frames"))
    if video.first is None:
        raise DiffeatError(f"{video.id}: no first-frame annotation")
    for i, (frame, truth) in enumerate(zip(video.frames, video.truth)):
        if i == 0:
            truth = video.first
        if truth is None:
            raise DiffeatError(f"{video.id}: frame {video.frame_name(i)} has no annotation")
        truth = Path(truth)
        if not truth.is_file():
            raise DiffeatError(f"annotation not found: {truth}")
        if isinstance(frame, Path):
            size = _frame_size(frame)
            msize = _frame_size(truth)
            if msize != size:
                raise DiffeatError(
                    f"{truth}: the mask is {msize[0]}x{msize[1]} but its frame {frame} is "
                    f"{size[0]}x{size[1]}"
                )


@dataclass
class MaskPropagation:
    """What ``diffeat eval`` records of one propagated mask video."""

    id: str
    frames: int
    objects: int
    J: list[float]
    F: list[float]
    seconds: float
    J_frames: list[list[float]] = field(default_factory=list)
    F_frames: list[list[float]] = field(default_factory=list)

    @property
    def j_mean(self) -> float:
        return float(np.mean(self.J)) if self.J else float("nan")

    @property
    def f_mean(self) -> float:
        return float(np.mean(self.F)) if self.F else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "frames": self.frames,
            "objects": self.objects,
            "J": self.J,
            "F": self.F,
            "J_mean": self.j_mean,
            "F_mean": self.f_mean,
            "J&F": (self.j_mean + self.f_mean) / 2,
            "seconds": self.seconds,
            "frames_per_second": (self.frames - 1) / self.seconds if self.seconds > 0 else None,
            "J_frames": self.J_frames,
            "F_frames": self.F_frames,
        }


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class PropagationEvaluation:
    """The outcome of ``diffeat eval`` on a ``"propagation"`` dataset of masks."""

    dataset: str
    dataset_info: dict[str, Any]
    options: PropagationOptions
    pipeline_config: dict[str, Any]
    records: list[MaskPropagation] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: (video id, frame index, frame, predicted ids, truth ids) kept for plots
    samples: list[tuple[str, int, Image.Image, np.ndarray, np.ndarray | None]] = field(
        default_factory=list
    )

    def summary(self) -> dict[str, Any]:
        js = [j for r in self.records for j in r.J]
        fs = [f for r in self.records for f in r.F]
        j = float(np.nanmean(js)) if js else float("nan")
        f = float(np.nanmean(fs)) if fs else float("nan")
        frames = sum(r.frames - 1 for r in self.records)
        seconds = sum(r.seconds for r in self.records)
        return {
            "J&F": (j + f) / 2,
            "J": j,
            "F": f,
            "sequences": len(self.records),
            "objects": len(js),
            "skipped": len(self.skipped),
            "frames_propagated": frames,
            "frames_per_second": frames / seconds if seconds > 0 else None,
        }

    def protocol(self) -> dict[str, Any]:
        return {
            "name": "davis2017-semi-supervised",
            "description": (
                "label propagation (DINO/UVC, as DIFT): first frame + last `context` soft "
                "predictions, exp(cos/T) in a (2r+1)^2 window, top-k, normalised; scored as "
                "davis2017-evaluation (frames [1:-1], J = IoU, F = boundary F at 0.008 of "
                "the diagonal, means over objects)"
            ),
            **options_dict(self.options),
        }

    def results_dict(self, *, records: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": "propagation",
            "dataset": {"name": self.dataset, **self.dataset_info},
            "protocol": self.protocol(),
            "summary": self.summary(),
            "skipped": list(self.skipped),
            "pipeline": {
                "config": self.pipeline_config,
                "digest": config_digest(self.pipeline_config),
            },
        }
        if records:
            out["sequences"] = [r.to_dict() for r in self.records]
        return _clean(out)

    def _table(self) -> list[str]:
        lines = ["| sequence | objects | J&F | J | F | frames/s |", "|---|---|---|---|---|---|"]
        for r in self.records:
            d = r.to_dict()
            fps = d["frames_per_second"]
            lines.append(
                f"| {r.id} | {r.objects} | {100 * d['J&F']:.1f} | {100 * r.j_mean:.1f} | "
                f"{100 * r.f_mean:.1f} | {fps:.2f} |"
                if fps is not None
                else f"| {r.id} | {r.objects} | {100 * d['J&F']:.1f} | {100 * r.j_mean:.1f} | "
                f"{100 * r.f_mean:.1f} | - |"
            )
        return lines

    def markdown(self, plots: list[str]) -> str:
        s = self.summary()
        lines = [
            f"# Label propagation on {self.dataset}",
            "",
            f"Protocol `davis2017-semi-supervised`: temperature {self.options.temperature}, "
            f"top-k {self.options.topk}, context {self.options.context}, radius "
            f"{self.options.radius}.",
            "",
            f"**J&F {100 * s['J&F']:.1f}**, J {100 * s['J']:.1f}, F {100 * s['F']:.1f} "
            f"({s['sequences']} sequences, {s['objects']} objects)",
            "",
            *self._table(),
            "",
        ]
        if self.skipped:
            lines += ["## Skipped", ""]
            lines += [f"- `{item['id']}`: {item['reason']}" for item in self.skipped]
            lines.append("")
        if plots:
            lines += ["## Plots", ""]
            lines += [f"![{Path(p).stem}]({p})" for p in plots]
            lines.append("")
        return "\n".join(lines)

    def terminal_report(self) -> str:
        s = self.summary()
        lines = [
            f"{self.dataset}: J&F {100 * s['J&F']:.1f}  J {100 * s['J']:.1f}  "
            f"F {100 * s['F']:.1f}  ({s['sequences']} sequences, {s['objects']} objects)",
        ]
        lines += [line for line in self._table()]
        for item in self.skipped:
            lines.append(f"skipped {item['id']}: {item['reason']}")
        return "\n".join(lines) + "\n"

    def write_plots(self, out: Path) -> list[Path]:
        if not self.samples:
            return []
        from diffeat.eval.propagation_plots import draw_samples

        return draw_samples(self.samples, Path(out) / "plots")


def _mask_video(
    pipe: Any, video: Video, options: PropagationOptions, ev: PropagationEvaluation, draw: bool
) -> MaskPropagation:
    check_masks(video)
    assert video.first is not None
    first = read_indexed_png(video.first)
    truth = [first] + [read_indexed_png(p) for p in video.truth[1:]]
    start = time.perf_counter()
    keep = {len(video) // 2, len(video) - 1} if draw else set()
    predicted = []
    for i, ids in enumerate(
        propagate_masks(
            pipe,
            video.frames,
            first,
            options.settings(),
            names=lambda i: str(video.frames[i]),
        )
    ):
        predicted.append(ids)
        if i in keep:
            frame = frame_input(video.frames[i]).image
            ev.samples.append((video.id, i, frame, ids, truth[i]))
    seconds = time.perf_counter() - start
    scores = score_sequence(truth, predicted)
    return MaskPropagation(
        id=video.id,
        frames=len(video),
        objects=len(scores["J"]),
        J=list(scores["J"]),  # type: ignore[arg-type]
        F=list(scores["F"]),  # type: ignore[arg-type]
        seconds=seconds,
        J_frames=scores["J_frames"],  # type: ignore[arg-type]
        F_frames=scores["F_frames"],  # type: ignore[arg-type]
    )


def run(context: TaskContext) -> PropagationEvaluation:
    """Propagate every video of the dataset and score it (the ``"propagation"`` runner)."""
    options = parse_options(context.options, f"{context.pipeline.config.source}: [propagation]")
    dataset = context.dataset
    videos = getattr(dataset, "videos", None)
    if videos is None:
        raise DiffeatError(
            f"dataset {context.dataset_name!r} declares the propagation task but has no "
            "videos() method yielding diffeat.core.videos.Video records"
        )
    items = list(videos())
    if context.limit is not None:
        items = items[: context.limit]
    if context.progress is not None:
        context.progress.total = len(items)
    pipe = context.pipeline
    kinds = {v.labels for v in items}
    if kinds == {"joints"}:
        from diffeat.eval.joints import run_joints

        return run_joints(context, items, options)
    ev = PropagationEvaluation(
        dataset=context.dataset_name,
        dataset_info=description_of(dataset),
        options=options,
        pipeline_config=pipe.config.resolved(),
    )
    for n, video in enumerate(items):
        try:
            ev.records.append(_mask_video(pipe, video, options, ev, n < options.plots))
        except DiffeatError as exc:
            ev.skipped.append({"id": video.id, "reason": str(exc)})
        if context.progress is not None:
            context.progress.update(1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ev
