"""Named PCK protocols: the exact evaluation choices of each paper we reproduce.

Every result reports per image, per point, per category and the mean of
categories for every threshold of the protocol; the protocol also names the
*headline* average (the number the paper prints) and its default alphas.
The reported numbers below are from ``METHODS.md`` (each paper's table);
reproducing them also needs the paper's pipeline (``examples/*.toml``).

| preset | threshold | test | headline | alphas | reproduces |
|---|---|---|---|---|---|
| `dift` | target bbox | `d / T <= a` | per image (per point also printed) | 0.1 | DIFT SPair-71k PCK@0.1(bbox): 52.9 per image, 59.5 per point (SD 2.1) |
| `hedlin` | in the 512 x 512 squashed frame: SPair *source* bbox; PF-Willow max keypoint coordinate + 1; CUB target bbox x 512 / W | `d <= a * T` | per image | 0.05, 0.1 | Hedlin et al.: SPair 28.9 / 45.4, PF-Willow 53.0 / 84.3, CUB 61.6 / 77.5 |
| `hyperfeatures` | target image (`alpha_img`) and target bbox (`alpha_bbox`) | `d <= a * T` | per point | 0.1 | Diffusion Hyperfeatures: SPair 72.56 (img) / 64.61 (bbox); CUB 82.29 / 69.42 |
| `sd-dino` | target bbox | `d < a * T` | pair-weighted mean of categories of per-point PCK | 0.1, 0.05, 0.01 | SD-DINO SPair PCK@0.1 about 64 |
| `pf-willow` | target keypoint extent | `d <= a * T` | per image | 0.05, 0.1 | the usual PF-Willow `alpha_bbox` protocol |

In every preset, as in every official evaluator, a scored keypoint whose
prediction is unusable (``NaN``/``inf`` coordinates or ``valid = False``)
counts as wrong: the official scripts divide by the number of annotated
keypoints, and a comparison with ``NaN`` is false.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from diffeat.core.errors import DiffeatError
from diffeat.eval.pck import ARITHMETICS, AVERAGES, COMPARISONS, THRESHOLDS, correct


@dataclass(frozen=True)
class PCKProtocol:
    """How to score: thresholds, comparison and its arithmetic, headline average, alphas.

    ``arithmetic`` is ``multiply`` (``d <= alpha * T``) or ``divide`` (``d / T <= alpha``):
    the two differ for some fractional distances (see :mod:`diffeat.eval.pck`).
    ``dataset_thresholds`` overrides ``thresholds`` for a dataset (by plugin
    name), for papers whose reference length differs per benchmark.
    """

    name: str
    thresholds: tuple[str, ...] = ("bbox-target",)
    comparison: str = "<="
    arithmetic: str = "multiply"
    average: str = "per-image"
    alphas: tuple[float, ...] = (0.1,)
    dataset_thresholds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: measure in the frame x frame squashed frame of each image (0: the images' own pixels)
    frame: int = 0
    reproduces: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        for kinds in (self.thresholds, *self.dataset_thresholds.values()):
            for kind in kinds:
                if kind not in THRESHOLDS:
                    raise DiffeatError(
                        f"protocol {self.name!r}: unknown threshold {kind!r}; use one of "
                        f"{', '.join(THRESHOLDS)}"
                    )
            if not kinds:
                raise DiffeatError(f"protocol {self.name!r}: no threshold")
        if self.comparison not in COMPARISONS:
            raise DiffeatError(f"protocol {self.name!r}: comparison must be '<=' or '<'")
        if self.arithmetic not in ARITHMETICS:
            raise DiffeatError(
                f"protocol {self.name!r}: arithmetic must be one of {', '.join(ARITHMETICS)}, "
                f"got {self.arithmetic!r}"
            )
        if self.average not in AVERAGES:
            raise DiffeatError(
                f"protocol {self.name!r}: average must be one of {', '.join(AVERAGES)}"
            )
        if self.frame < 0:
            raise DiffeatError(f"protocol {self.name!r}: frame must be 0 or a size in pixels")
        if not self.alphas or any(not (a > 0) for a in self.alphas):
            raise DiffeatError(f"protocol {self.name!r}: alphas must be positive numbers")

    def thresholds_for(self, dataset: str) -> tuple[str, ...]:
        # the synthetic benchmark is in the SPair layout and scored like SPair
        key = "spair" if dataset == "synthetic" else dataset
        return self.dataset_thresholds.get(key, self.thresholds)

    def with_changes(
        self,
        *,
        alphas: tuple[float, ...] | None = None,
        thresholds: tuple[str, ...] | None = None,
        comparison: str | None = None,
        average: str | None = None,
        arithmetic: str | None = None,
        frame: int | None = None,
    ) -> PCKProtocol:
        """A copy with command-line overrides (a threshold override applies to every dataset)."""
        changes: dict[str, Any] = {}
        if alphas:
            changes["alphas"] = tuple(float(a) for a in alphas)
        if thresholds:
            changes["thresholds"] = tuple(thresholds)
            changes["dataset_thresholds"] = {}
        if comparison:
            changes["comparison"] = comparison
        if average:
            changes["average"] = average
        if arithmetic:
            changes["arithmetic"] = arithmetic
        if frame is not None and frame != self.frame:
            changes["frame"] = frame
        if not changes:
            return self
        return replace(self, **changes, name=f"{self.name} (modified)")

    def correct(self, dist: np.ndarray, threshold: float, alpha: float) -> np.ndarray:
        """Which of the distances ``dist`` are correct at ``alpha`` under this protocol's
        comparison and arithmetic (``NaN``: not scored and ``inf``: unusable -> False)."""
        return correct(dist, threshold, alpha, self.comparison, self.arithmetic)

    def test(self) -> str:
        """The test in words: ``d / T <= alpha`` or ``d <= alpha * T`` (``<`` if strict)."""
        if self.arithmetic == "divide":
            return f"distance / T {self.comparison} alpha"
        return f"distance {self.comparison} alpha * T"

    def to_dict(self, dataset: str | None = None) -> dict[str, Any]:
        out = {
            "name": self.name,
            "thresholds": list(self.thresholds_for(dataset) if dataset else self.thresholds),
            "comparison": self.comparison,
            "arithmetic": self.arithmetic,
            "test": self.test(),
            "invalid_predictions": "wrong",
            "average": self.average,
            "alphas": list(self.alphas),
            "frame": f"{self.frame} x {self.frame} squashed" if self.frame else "image pixels",
            "reproduces": self.reproduces,
            "notes": self.notes,
        }
        if self.dataset_thresholds and dataset is None:
            out["dataset_thresholds"] = {k: list(v) for k, v in self.dataset_thresholds.items()}
        return out


PROTOCOLS: dict[str, PCKProtocol] = {
    p.name: p
    for p in [
        PCKProtocol(
            "dift",
            thresholds=("bbox-target",),
            comparison="<=",
            arithmetic="divide",
            average="per-image",
            alphas=(0.1,),
            reproduces=(
                "DIFT (Tang et al. 2023) SPair-71k PCK@0.1(bbox): 52.9 per image, 59.5 per point "
                "(SD 2.1, t=261, up_ft_index 1, ensemble 8; examples/dift-sd21.toml)"
            ),
            notes=(
                "eval_spair.py: threshold max(w, h) of the target box, dist / T <= 0.1 (a division, "
                "in float64); per image = mean over all pairs (not over categories), per point = "
                "all correct / all points; every annotated keypoint is counted"
            ),
        ),
        PCKProtocol(
            "hedlin",
            thresholds=("bbox-target",),
            dataset_thresholds={
                "spair": ("bbox-source",),
                "pfwillow": ("kps-target-padded",),
                "cub": ("bbox-target-wscale",),
            },
            comparison="<=",
            average="per-image",
            alphas=(0.05, 0.1),
            frame=512,
            reproduces=(
                "Hedlin et al. 2023 PCK@0.05 / @0.1: SPair-71k 28.9 / 45.4 (source-box quirk), "
                "PF-Willow 53.0 / 84.3, CUB 61.6 / 77.5"
            ),
            notes=(
                "CATs-style evaluator (mean of per-pair PCK; torch.le(dist, T * alpha)), distances "
                "and thresholds in the 512 x 512 squashed frame of each image (frame = 512). SPair: "
                "T = max side of the source box (scaled by the source's factors); PF-Willow: "
                "T = max keypoint coordinate + 1 (max - min over the -1-padded keypoints); CUB: "
                "T = max side of the target box x 512 / W. Their CUB test set is every test pair "
                "of classes 1-3 with a part visible in both: "
                "-o max_classes=3 -o pairs_per_class=0 -o min_common_parts=1"
            ),
        ),
        PCKProtocol(
            "hyperfeatures",
            thresholds=("img", "bbox-target"),
            comparison="<=",
            average="per-point",
            alphas=(0.1,),
            reproduces=(
                "Diffusion Hyperfeatures (Luo et al. 2023) PCK@0.1: SPair-71k 72.56 (img) / "
                "64.61 (bbox); CUB 82.29 / 69.42"
            ),
            notes=(
                "compute_pck: distances <= alpha * max(target image size) or max(target box "
                "side) (numpy, float64); pooled over all points. Their SPair test set is a 20 pairs x 18 "
                "categories subset (pass it with -o pair_list=FILE)"
            ),
        ),
        PCKProtocol(
            "sd-dino",
            thresholds=("bbox-target",),
            comparison="<",
            average="category-weighted-per-point",
            alphas=(0.1, 0.05, 0.01),
            reproduces="SD-DINO (Zhang et al. 2023) SPair-71k PCK@0.1 about 64 (all test pairs)",
            notes=(
                "pck_spair_pascal.py: err < alpha * max(target box side) (torch float32, in their "
                "padded 840 px frame), per point within a category, then the categories weighted by their pair counts ('Weighted PCK', "
                "the paper's setting: all test pairs, --SAMPLE 0). Its default run samples 20 "
                "pairs per category (-o sample_per_category=20, seed 42), where the weighting "
                "equals the plain mean ('Average PCK')"
            ),
        ),
        PCKProtocol(
            "pf-willow",
            thresholds=("kps-target",),
            comparison="<=",
            average="per-image",
            alphas=(0.05, 0.1),
            reproduces="the PF-Willow alpha_bbox protocol (target keypoint extent) at 0.05 and 0.1",
            notes=(
                "DHPF / CATs get_pckthres: max(w, h) of the target keypoints' extent, "
                "torch.le(dist, T * alpha); "
                "CNNGeometric/NCNet used the source keypoints (threshold kps-source)"
            ),
        ),
    ]
}


def get_protocol(name: str) -> PCKProtocol:
    """The preset called ``name``, or a :class:`DiffeatError` listing the presets."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise DiffeatError(
            f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}"
        ) from None


def __getattr__(name: str) -> object:  # the former name, kept working for a while
    if name == "Protocol":
        import warnings

        warnings.warn(
            "diffeat.eval.protocols.Protocol is now PCKProtocol",
            DeprecationWarning,
            stacklevel=2,
        )
        return PCKProtocol
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
