"""Keypoint propagation (JHMDB, VideoWalk's protocol) on top of the label propagation.

Each joint of the first frame becomes a Gaussian label map on the feature grid
(``exp(-d^2 / (2 sigma^2))``, ``d`` the distance in cells from the joint,
``sigma = 0.5`` cells); the maps are propagated exactly as masks are
(:mod:`diffeat.eval.labelprop`), upsampled to the model input (bilinear,
``x stride``) and each joint is put at its map's argmax, mapped back to the
frame's pixels. PCK@alpha: a joint is correct when its distance to the truth
is at most ``alpha * 0.6 * diagonal`` of the box of the frame's ground-truth
joints; the first frame (given) is not scored; PCK is the fraction of correct
(frame, joint) pairs over all videos.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffeat.core.config import config_digest
from diffeat.core.datasets import description_of
from diffeat.core.errors import DiffeatError, ImageError
from diffeat.core.geometry import ImageTransform, Size, grid_size_of
from diffeat.core.options import options_dict
from diffeat.core.videos import Video, frame_input
from diffeat.eval.labelprop import Propagator

__all__ = [
    "ALPHAS",
    "JointsEvaluation",
    "joint_maps",
    "maps_to_points",
    "pck_distances",
    "propagate_joints",
    "run_joints",
]

#: the PCK alphas of the JHMDB protocol
ALPHAS = (0.1, 0.2)


def joint_maps(
    points: np.ndarray, transform: ImageTransform, grid: Size, sigma: float
) -> torch.Tensor:
    """``[J, h, w]`` Gaussian maps of image-pixel joints ``[J, 2]`` on the feature grid."""
    gw, gh = grid
    cells = transform.image_to_grid(torch.as_tensor(points, dtype=torch.float32), grid)
    ys, xs = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    dx = xs[None] - cells[:, 0, None, None]
    dy = ys[None] - cells[:, 1, None, None]
    return torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def maps_to_points(maps: torch.Tensor, transform: ImageTransform) -> np.ndarray:
    """Each map's argmax after bilinear upsampling to the model input, in image pixels ``[J, 2]``."""
    w, h = transform.model_size
    up = F.interpolate(maps[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    idx = up.reshape(up.shape[0], -1).argmax(dim=1)
    model_pts = torch.stack([(idx % w).float(), (idx // w).float()], dim=1)
    return transform.model_to_image(model_pts.cpu()).numpy()


def pck_distances(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, float]:
    """Distances ``[J]`` and the reference length ``0.6 * diagonal`` of the truth's box."""
    lo, hi = truth.min(axis=0), truth.max(axis=0)
    ref = 0.6 * float(np.linalg.norm(hi - lo))
    return np.linalg.norm(pred - truth, axis=1), ref


def propagate_joints(pipe: Any, video: Video, options: Any) -> list[np.ndarray]:
    """Predicted joints ``[J, 2]`` of every frame (frame 0: the given joints)."""
    from diffeat.eval.propagation import frame_descriptors

    if video.first is None or not isinstance(video.first, np.ndarray):
        raise DiffeatError(f"{video.id}: no first-frame joints")

    def load(i: int) -> Any:
        try:
            return frame_input(video.frames[i], f"{video.id} frame {i}")
        except ImageError as exc:
            raise DiffeatError(str(exc)) from None

    desc, transform = frame_descriptors(pipe, load(0))
    grid = grid_size_of(desc)
    prop = Propagator(options.settings())
    prop.start(desc, joint_maps(video.first, transform, grid, options.sigma).to(desc.device))
    out = [np.asarray(video.first, dtype=np.float64)]
    for i in range(1, len(video)):
        desc, transform = frame_descriptors(pipe, load(i))
        if grid_size_of(desc) != grid:
            raise DiffeatError(f"{video.id} frame {i}: its size differs from the first frame's")
        out.append(maps_to_points(prop.step(desc), transform))
    return out


@dataclass
class JointsRecord:
    id: str
    frames: int
    distances: list[list[float]]  # per scored frame, per joint
    references: list[float]  # per scored frame
    seconds: float

    def pck(self, alpha: float) -> float:
        hits = [d <= alpha * r for ds, r in zip(self.distances, self.references) for d in ds]
        return float(np.mean(hits)) if hits else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "frames": self.frames,
            **{f"PCK@{a}": self.pck(a) for a in ALPHAS},
            "seconds": self.seconds,
            "distances": self.distances,
            "references": self.references,
        }


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class JointsEvaluation:
    """The outcome of ``diffeat eval`` on a ``"propagation"`` dataset of joints (JHMDB)."""

    dataset: str
    dataset_info: dict[str, Any]
    options: Any
    pipeline_config: dict[str, Any]
    records: list[JointsRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in ALPHAS:
            hits = [
                d <= a * ref
                for r in self.records
                for ds, ref in zip(r.distances, r.references)
                for d in ds
            ]
            out[f"PCK@{a}"] = float(np.mean(hits)) if hits else float("nan")
        out["videos"] = len(self.records)
        out["skipped"] = len(self.skipped)
        return out

    def results_dict(self, *, records: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": "propagation",
            "dataset": {"name": self.dataset, **self.dataset_info},
            "protocol": {
                "name": "jhmdb-videowalk",
                "description": (
                    "joints as Gaussian label maps (sigma in cells) propagated as masks, "
                    "argmax per joint; PCK@alpha of 0.6 x the diagonal of the truth's box; "
                    "first frame not scored"
                ),
                **options_dict(self.options),
            },
            "summary": self.summary(),
            "skipped": list(self.skipped),
            "pipeline": {
                "config": self.pipeline_config,
                "digest": config_digest(self.pipeline_config),
            },
        }
        if records:
            out["videos"] = [r.to_dict() for r in self.records]
        return _finite(out)

    def markdown(self, plots: list[str]) -> str:
        s = self.summary()
        lines = [
            f"# Keypoint propagation on {self.dataset}",
            "",
            f"**PCK@0.1 {100 * s['PCK@0.1']:.1f}**, PCK@0.2 {100 * s['PCK@0.2']:.1f} "
            f"({s['videos']} videos)",
            "",
            "| video | PCK@0.1 | PCK@0.2 |",
            "|---|---|---|",
            *[
                f"| {r.id} | {100 * r.pck(0.1):.1f} | {100 * r.pck(0.2):.1f} |"
                for r in self.records
            ],
            "",
        ]
        if self.skipped:
            lines += ["## Skipped", ""]
            lines += [f"- `{item['id']}`: {item['reason']}" for item in self.skipped]
        return "\n".join(lines) + "\n"

    def terminal_report(self) -> str:
        s = self.summary()
        lines = [
            f"{self.dataset}: PCK@0.1 {100 * s['PCK@0.1']:.1f}  PCK@0.2 {100 * s['PCK@0.2']:.1f}"
            f"  ({s['videos']} videos)"
        ]
        lines += [f"skipped {item['id']}: {item['reason']}" for item in self.skipped]
        return "\n".join(lines) + "\n"

    def write_plots(self, out: Path) -> list[Path]:
        return []


def run_joints(context: Any, items: list[Video], options: Any) -> JointsEvaluation:
    """Propagate and score every joints video."""
    pipe = context.pipeline
    ev = JointsEvaluation(
        dataset=context.dataset_name,
        dataset_info=description_of(context.dataset),
        options=options,
        pipeline_config=pipe.config.resolved(),
    )
    for video in items:
        try:
            if video.meta.get("error"):
                raise DiffeatError(str(video.meta["error"]))
            start = time.perf_counter()
            predicted = propagate_joints(pipe, video, options)
            seconds = time.perf_counter() - start
            distances, references = [], []
            for i in range(1, len(video)):
                truth = video.truth[i]
                if truth is None:
                    continue
                truth = np.asarray(truth, dtype=np.float64)
                vis = video.visible[i] if video.visible else np.ones(len(truth), bool)
                d, ref = pck_distances(predicted[i][vis], truth[vis])
                distances.append([float(v) for v in d])
                references.append(ref)
            ev.records.append(JointsRecord(video.id, len(video), distances, references, seconds))
        except DiffeatError as exc:
            ev.skipped.append({"id": video.id, "reason": str(exc)})
        if context.progress is not None:
            context.progress.update(1)
    return ev
