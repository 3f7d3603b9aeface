"""Named PCK protocols: the exact evaluation choices of each paper we reproduce.

Every result reports per image, per point, per category and the mean of
categories for every threshold of the protocol; the protocol also names the
*headline* average (the number the paper prints) and its default alphas.
The reported numbers below are from ``METHODS.md`` (each paper's table);
reproducing them also needs the paper's pipeline (``examples/*.toml``).

| preset | threshold | `<=`/`<` | headline | alphas | reproduces |
|---|---|---|---|---|---|
| `dift` | target bbox | `<=` | per image (per point also printed) | 0.1 | DIFT SPair-71k PCK@0.1(bbox): 52.9 per image, 59.5 per point (SD 2.1) |
| `hedlin` | SPair: *source* bbox; PF-Willow: target keypoint extent; CUB: target bbox | `<=` | per image | 0.05, 0.1 | Hedlin et al.: SPair 28.9 / 45.4, PF-Willow 53.0 / 84.3, CUB 61.6 / 77.5 |
| `hyperfeatures` | target image (`alpha_img`) and target bbox (`alpha_bbox`) | `<=` | per point | 0.1 | Diffusion Hyperfeatures: SPair 72.56 (img) / 64.61 (bbox); CUB 82.29 / 69.42 |
| `sd-dino` | target bbox | `<` | pair-weighted mean of categories of per-point PCK | 0.1, 0.05, 0.01 | SD-DINO SPair PCK@0.1 about 64 |
| `pf-willow` | target keypoint extent | `<=` | per image | 0.05, 0.1 | the usual PF-Willow `alpha_bbox` protocol |
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from diffeat.core.errors import DiffeatError
from diffeat.eval.pck import AVERAGES, COMPARISONS, THRESHOLDS


@dataclass(frozen=True)
class PCKProtocol:
    """How to score: thresholds, comparison, headline average, alphas.

    ``dataset_thresholds`` overrides ``thresholds`` for a dataset (by plugin
    name), for papers whose reference length differs per benchmark.
    """

    name: str
    thresholds: tuple[str, ...] = ("bbox-target",)
    comparison: str = "<="
    average: str = "per-image"
    alphas: tuple[float, ...] = (0.1,)
    dataset_thresholds: dict[str, tuple[str, ...]] = field(default_factory=dict)
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
        if self.average not in AVERAGES:
            raise DiffeatError(
                f"protocol {self.name!r}: average must be one of {', '.join(AVERAGES)}"
            )
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
        if not changes:
            return self
        return replace(self, **changes, name=f"{self.name} (modified)")

    def to_dict(self, dataset: str | None = None) -> dict[str, Any]:
        out = {
            "name": self.name,
            "thresholds": list(self.thresholds_for(dataset) if dataset else self.thresholds),
            "comparison": self.comparison,
            "average": self.average,
            "alphas": list(self.alphas),
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
            average="per-image",
            alphas=(0.1,),
            reproduces=(
                "DIFT (Tang et al. 2023) SPair-71k PCK@0.1(bbox): 52.9 per image, 59.5 per point "
                "(SD 2.1, t=261, up_ft_index 1, ensemble 8; examples/dift-sd21.toml)"
            ),
            notes=(
                "eval_spair.py: threshold max(w, h) of the target box, dist / T <= 0.1; per image "
                "= mean over all pairs (not over categories), per point = all correct / all points"
            ),
        ),
        PCKProtocol(
            "hedlin",
            thresholds=("bbox-target",),
            dataset_thresholds={"spair": ("bbox-source",), "pfwillow": ("kps-target",)},
            comparison="<=",
            average="per-image",
            alphas=(0.05, 0.1),
            reproduces=(
                "Hedlin et al. 2023 PCK@0.05 / @0.1: SPair-71k 28.9 / 45.4 (source-box quirk), "
                "PF-Willow 53.0 / 84.3, CUB 61.6 / 77.5"
            ),
            notes=(
                "CATs-style evaluator (mean of per-pair PCK, <=); on SPair the reference length "
                "is the source box. Their CUB test set is every test pair of classes 1-3: "
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
                "side); pooled over all points. Their SPair test set is a 20 pairs x 18 "
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
                "pck_spair_pascal.py: err < alpha * max(target box side), per point within a "
                "category, then the categories weighted by their pair counts ('Weighted PCK', "
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
                "DHPF / CATs get_pckthres: max(w, h) of the target keypoints' extent; "
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
