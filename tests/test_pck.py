"""PCK on hand-computed cases: every threshold, comparison and average, and the presets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffeat.core.errors import DiffeatError
from diffeat.eval.pck import (
    ScoredPair,
    box_side,
    correct,
    distances,
    format_alpha,
    headline,
    keypoint_extent,
    outside_image,
    pck_curve,
    summarize,
    threshold_of,
)
from diffeat.eval.protocols import PROTOCOLS, PCKProtocol, get_protocol

NAN = math.nan


# -- reference lengths ----------------------------------------------------------------


def test_box_thresholds_and_flipped_boxes_are_normalised():
    assert box_side((10, 20, 110, 70)) == 100  # w 100, h 50
    assert box_side((0, 0, 40, 80)) == 80
    assert box_side((110, 70, 10, 20)) == 100  # x1 < x0 and y1 < y0: same sides
    assert box_side((110, 20, 10, 70)) == 100
    kw = {"source_bbox": (0, 0, 40, 80), "target_bbox": (110, 70, 10, 20)}
    assert threshold_of("bbox-target", **kw) == 100
    assert threshold_of("bbox-source", **kw) == 80


def test_image_and_keypoint_extent_thresholds():
    assert threshold_of("img", target_size=(640, 480)) == 640
    assert threshold_of("img", target_size=(300, 500)) == 500
    tgt = [[10, 10], [40, 20], [25, 90]]  # extent 30 x 80
    src = [[0, 0], [5, 5], [50, 1]]  # extent 50 x 5
    assert threshold_of("kps-target", target_points=tgt) == 80
    assert threshold_of("kps-source", source_points=src) == 50
    # only scored keypoints define the extent
    vis = [True, True, False]
    assert threshold_of("kps-target", target_points=tgt, visible=vis) == 30
    assert keypoint_extent(src, vis) == 5


@pytest.mark.parametrize(
    "kind, kwargs, fragment",
    [
        ("bbox-target", {}, "target bounding box"),
        ("bbox-source", {"target_bbox": (0, 0, 1, 1)}, "source bounding box"),
        ("img", {}, "target image size"),
        ("kps-target", {}, "target keypoints"),
        ("nope", {}, "unknown PCK threshold 'nope'"),
    ],
)
def test_threshold_errors(kind, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        threshold_of(kind, **kwargs)


def test_keypoint_extent_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one keypoint"):
        keypoint_extent([[1, 2]], [False])


# -- correctness at the boundary ------------------------------------------------------------


def test_boundary_exactly_at_alpha_counts_with_le_not_with_lt():
    d = [10.0, 9.999, 10.001, NAN, 0.0]
    # T = 100, alpha = 0.1: the limit is exactly 10
    assert correct(d, 100, 0.1, "<=").tolist() == [True, True, False, False, True]
    assert correct(d, 100, 0.1, "<").tolist() == [False, True, False, False, True]
    # a 3-4-5 triangle: distance 5 against 0.1 * 50
    pred, gt = [[3.0, 4.0]], [[0.0, 0.0]]
    assert correct(distances(pred, gt), 50, 0.1, "<=").tolist() == [True]
    assert correct(distances(pred, gt), 50, 0.1, "<").tolist() == [False]


def test_zero_threshold_counts_exact_hits_only_with_le():
    assert correct([0.0, 0.5], 0.0, 0.1, "<=").tolist() == [True, False]
    assert correct([0.0, 0.5], 0.0, 0.1, "<").tolist() == [False, False]


@pytest.mark.parametrize(
    "threshold, alpha, comparison, fragment",
    [
        (-1.0, 0.1, "<=", "finite and >= 0"),
        (NAN, 0.1, "<=", "finite and >= 0"),
        (10.0, 0.0, "<=", "alpha must be a positive"),
        (10.0, -0.1, "<=", "alpha must be a positive"),
        (10.0, 0.1, "=<", "comparison must be"),
    ],
)
def test_bad_arguments(threshold, alpha, comparison, fragment):
    with pytest.raises(ValueError, match=fragment):
        correct([1.0], threshold, alpha, comparison)


def test_distances_mark_invisible_keypoints_nan():
    pred = [[0, 0], [3, 4], [100, 100]]
    gt = [[0, 0], [0, 0], [0, 0]]
    d = distances(pred, gt, [True, True, False])
    assert d[:2].tolist() == [0.0, 5.0] and math.isnan(d[2])
    with pytest.raises(ValueError, match="2 predicted points for 3"):
        distances(pred[:2], gt)
    with pytest.raises(ValueError, match="visibility has 2 entries"):
        distances(pred, gt, [True, False])


# -- averages ---------------------------------------------------------------------------


def pairs_fixture() -> list[ScoredPair]:
    return [
        # cat A: scored distances 1, 2, 30 (the 4th keypoint is not visible), T = 100
        ScoredPair("A", "cat", [1.0, 2.0, 30.0, NAN], 100.0),
        # cat B: one keypoint at 5 px, T = 20
        ScoredPair("B", "cat", [5.0], 20.0),
        # dog C: two exact hits, T = 50
        ScoredPair("C", "dog", [0.0, 0.0], 50.0),
        # dog D: nothing scored: left out of every average, counted
        ScoredPair("D", "dog", [NAN, NAN], 50.0),
    ]


def test_per_image_per_point_per_category_by_hand():
    s = summarize(pairs_fixture(), [0.1, 0.3], "<=")
    assert (s["pairs"], s["points"], s["pairs_without_points"]) == (3, 6, 1)
    a = s["by_alpha"]["0.1"]  # limits: A 10, B 2, C 5
    assert a["per_image"] == pytest.approx((2 / 3 + 0 + 1) / 3)  # 5/9
    assert a["per_point"] == pytest.approx(4 / 6)
    assert a["correct"] == 4
    cat, dog = a["categories"]["cat"], a["categories"]["dog"]
    assert cat["per_image"] == pytest.approx((2 / 3 + 0) / 2)
    assert cat["per_point"] == pytest.approx(2 / 4)
    assert (cat["pairs"], cat["points"], cat["correct"]) == (2, 4, 2)
    assert dog["per_image"] == 1.0 and dog["per_point"] == 1.0 and dog["pairs"] == 1
    assert a["category_mean_per_image"] == pytest.approx((1 / 3 + 1) / 2)
    assert a["category_mean_per_point"] == pytest.approx((0.5 + 1) / 2)
    assert a["category_weighted_per_point"] == pytest.approx((2 * 0.5 + 1 * 1) / 3)
    # several alphas at once: at 0.3 the limits are A 30, B 6, C 15
    b = s["by_alpha"]["0.3"]
    assert b["per_image"] == 1.0 and b["per_point"] == 1.0


def test_strict_comparison_changes_only_boundary_hits():
    s = summarize(pairs_fixture(), [0.3], "<")  # A's 30 px hits the limit exactly
    b = s["by_alpha"]["0.3"]
    assert b["per_image"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert b["per_point"] == pytest.approx(5 / 6)
    assert s["comparison"] == "<"


def test_headline_and_curve_read_the_summary():
    s = summarize(pairs_fixture(), [0.1], "<=")
    assert headline(s, 0.1, "per-image") == pytest.approx(5 / 9)
    assert headline(s, 0.1, "per-point") == pytest.approx(4 / 6)
    assert headline(s, 0.1, "category-mean-per-point") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown average"):
        headline(s, 0.1, "median")
    curve = pck_curve(pairs_fixture(), [0.01, 0.1, 0.3], "<=", "per-point")
    # at 0.01 the limits are A 1, B 0.2, C 0.5: A's 1 px (on the boundary) and C's two hits
    assert curve == pytest.approx([3 / 6, 4 / 6, 1.0])
    assert format_alpha(0.1) == "0.1" and format_alpha(0.05) == "0.05"


def test_empty_averages_are_none():
    s = summarize([ScoredPair("D", "dog", [NAN], 1.0)], [0.1])
    a = s["by_alpha"]["0.1"]
    assert a["per_image"] is None and a["per_point"] is None and a["categories"] == {}


def test_matches_a_written_out_dift_loop():
    """DIFT's eval_spair.py: per image = mean over all pairs (all categories pooled),
    per point = all correct / all, per-category tables; threshold = target box, <=."""
    rng = np.random.default_rng(0)
    pairs, loop_pairs = [], []
    for i in range(40):
        n = int(rng.integers(1, 8))
        d = rng.uniform(0, 30, size=n)
        box = rng.uniform(0, 200, size=4)
        cat = ["cat", "dog", "bus"][i % 3]
        t = max(abs(box[3] - box[1]), abs(box[2] - box[0]))
        pairs.append(ScoredPair(str(i), cat, d, threshold_of("bbox-target", target_bbox=box)))
        loop_pairs.append((cat, d, t))
    total_pck, all_correct, all_total = [], 0, 0
    per_cat = {}
    for cat in ["cat", "dog", "bus"]:
        cat_pck, cat_correct, cat_total = [], 0, 0
        for c, d, t in loop_pairs:
            if c != cat:
                continue
            correct_n = int(sum((x / t) <= 0.1 for x in d))
            cat_pck.append(correct_n / len(d))
            cat_correct += correct_n
            cat_total += len(d)
        total_pck.extend(cat_pck)
        all_correct += cat_correct
        all_total += cat_total
        per_cat[cat] = (np.mean(cat_pck), cat_correct / cat_total)
    s = summarize(pairs, [0.1], "<=")["by_alpha"]["0.1"]
    assert s["per_image"] == pytest.approx(np.mean(total_pck))
    assert s["per_point"] == pytest.approx(all_correct / all_total)
    for cat, (img, pt) in per_cat.items():
        assert s["categories"][cat]["per_image"] == pytest.approx(img)
        assert s["categories"][cat]["per_point"] == pytest.approx(pt)


# -- presets ------------------------------------------------------------------------------


def test_presets_encode_each_papers_choices():
    dift = get_protocol("dift")
    assert (dift.thresholds, dift.comparison, dift.average, dift.alphas) == (
        ("bbox-target",),
        "<=",
        "per-image",
        (0.1,),
    )
    assert "52.9" in dift.reproduces and "59.5" in dift.reproduces
    hedlin = get_protocol("hedlin")
    assert hedlin.thresholds_for("spair") == ("bbox-source",)  # the source-box quirk
    assert hedlin.thresholds_for("synthetic") == ("bbox-source",)  # SPair layout, SPair rules
    assert hedlin.thresholds_for("pfwillow") == ("kps-target-padded",)
    assert hedlin.thresholds_for("cub") == ("bbox-target-wscale",)
    assert hedlin.frame == 512  # distances and thresholds in the 512 x 512 squashed frame
    assert hedlin.alphas == (0.05, 0.1) and "45.4" in hedlin.reproduces
    hyper = get_protocol("hyperfeatures")
    assert hyper.thresholds == ("img", "bbox-target") and hyper.average == "per-point"
    assert "72.56" in hyper.reproduces and "69.42" in hyper.reproduces
    sd_dino = get_protocol("sd-dino")
    assert sd_dino.comparison == "<" and sd_dino.average == "category-weighted-per-point"
    assert get_protocol("pf-willow").thresholds == ("kps-target",)
    assert set(PROTOCOLS) >= {"dift", "hedlin", "hyperfeatures", "sd-dino", "pf-willow"}


def test_overrides_and_errors():
    p = get_protocol("hedlin").with_changes(
        alphas=(0.2,), thresholds=("img",), comparison="<", average="per-point"
    )
    assert p.alphas == (0.2,) and p.thresholds_for("spair") == ("img",) and p.comparison == "<"
    assert p.name == "hedlin (modified)"
    assert get_protocol("dift").with_changes() is get_protocol("dift")
    with pytest.raises(DiffeatError, match="unknown protocol 'dfit'"):
        get_protocol("dfit")
    with pytest.raises(DiffeatError, match="unknown threshold 'box'"):
        PCKProtocol("x", thresholds=("box",))
    with pytest.raises(DiffeatError, match="comparison"):
        PCKProtocol("x", comparison="==")
    with pytest.raises(DiffeatError, match="alphas"):
        PCKProtocol("x", alphas=(0.0,))
    d = get_protocol("hedlin").to_dict()
    assert d["dataset_thresholds"]["spair"] == ["bbox-source"]
    assert get_protocol("hedlin").to_dict("spair")["thresholds"] == ["bbox-source"]


# -- predictions without a usable point, outside the image, and the arithmetic ----------------


def test_a_nan_prediction_counts_wrong_not_dropped():
    """Two pairs, T = 100, alpha 0.1 (limit 10 px). Pair A: hits at 0 and 5 px and a NaN
    prediction; pair B: one NaN prediction only. The official evaluators divide by every
    annotated keypoint: A = 2/3, B = 0/1; per image (2/3 + 0) / 2 = 1/3, per point 2/4.
    (Dropping the NaN ones would give 1.0 and 1.0: the matcher that gives up wins.)"""
    gt = [[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]
    pred_a = [[10.0, 10.0], [23.0, 24.0], [NAN, NAN]]
    d_a = distances(pred_a, gt)
    assert d_a[:2].tolist() == [0.0, 5.0] and d_a[2] == math.inf
    d_b = distances([[NAN, 3.0]], [[1.0, 1.0]])
    pairs = [ScoredPair("A", "cat", d_a, 100.0), ScoredPair("B", "cat", d_b, 100.0)]
    s = summarize(pairs, [0.1])
    assert (s["pairs"], s["points"], s["invalid_points"], s["pairs_without_points"]) == (2, 4, 2, 0)
    a = s["by_alpha"]["0.1"]
    assert a["per_image"] == pytest.approx(1 / 3)
    assert a["per_point"] == pytest.approx(2 / 4) and a["correct"] == 2
    assert a["categories"]["cat"]["invalid_points"] == 2
    assert pairs[0].invalid == 1 and pairs[0].scored == 3
    # an infinite coordinate is unusable as well, and wrong under every test
    assert distances([[math.inf, 0.0]], [[0.0, 0.0]])[0] == math.inf
    for comparison in ("<=", "<"):
        for arithmetic in ("multiply", "divide"):
            assert correct([math.inf], 100, 0.1, comparison, arithmetic).tolist() == [False]
            assert correct([math.inf], 0.0, 0.1, comparison, arithmetic).tolist() == [False]


def test_a_prediction_marked_invalid_counts_wrong():
    """valid = False: the matcher gave up on that point; its coordinates (an exact hit here)
    are not scored, the keypoint counts wrong. T = 50, alpha 0.1: limit 5 px."""
    gt = [[5.0, 5.0], [8.0, 8.0]]
    pred = [[5.0, 5.0], [8.0, 8.0]]  # both exact
    d = distances(pred, gt, valid=[True, False])
    assert d.tolist() == [0.0, math.inf]
    s = summarize([ScoredPair("p", "cat", d, 50.0)], [0.1])
    assert s["by_alpha"]["0.1"]["per_point"] == pytest.approx(1 / 2)
    assert s["invalid_points"] == 1
    # invisible keypoints stay unscored, whatever the prediction says
    d2 = distances(pred, gt, visible=[False, True], valid=[False, False])
    assert math.isnan(d2[0]) and d2[1] == math.inf
    with pytest.raises(ValueError, match="validity has 1 entries for 2 points"):
        distances(pred, gt, valid=[True])


def test_a_prediction_outside_the_image_is_scored_by_its_distance():
    """The official evaluators never check bounds: a point outside the image is scored by its
    distance. A 40 x 30 image spans x in [-0.5, 39.5], y in [-0.5, 29.5]."""
    pred = [[-0.75, 10.0], [39.5, 29.5], [100.0, 10.0], [NAN, NAN], [20.0, 30.0]]
    assert outside_image(pred, (40, 30)).tolist() == [True, False, True, False, True]
    assert outside_image(pred, None).tolist() == [False] * 5
    gt = [[0.0, 10.0], [39.0, 29.0], [39.0, 10.0], [1.0, 1.0], [20.0, 29.0]]
    d = distances(pred, gt)
    assert d[0] == 0.75 and d[2] == 61.0 and d[4] == 1.0
    # T = 20, alpha 0.1: limit 2 px; the first point (0.75 px outside) is correct, the far one
    # is not, the NaN one counts wrong
    assert correct(d, 20, 0.1).tolist() == [True, True, False, False, True]


# Found by a search over random fractional predictions at alpha * T from integer keypoints
# (seed 1): `d / T <= alpha` and `d <= alpha * T` disagree in float64 for these.
DIVIDE_FAILS = (41.0, [122.0, 85.0], [120.39219438528451, 88.7715992768704])
MULTIPLY_FAILS = (155.0, [47.0, 16.0], [54.02265462091724, 2.1821737572326594])


def test_divide_and_multiply_differ_for_fractional_predictions():
    for (t, gt, pred), divide_ok in ((DIVIDE_FAILS, False), (MULTIPLY_FAILS, True)):
        d = float(distances([pred], [gt])[0])
        assert (d / t <= 0.1) is divide_ok and (d <= 0.1 * t) is not divide_ok  # plain Python
        assert correct([d], t, 0.1, "<=", "divide").tolist() == [divide_ok]
        assert correct([d], t, 0.1, "<=", "multiply").tolist() == [not divide_ok]
        s = summarize([ScoredPair("p", "c", [d], t)], [0.1], "<=", "divide")
        assert s["arithmetic"] == "divide"
        assert s["by_alpha"]["0.1"]["per_point"] == float(divide_ok)
    assert repr(float(distances([DIVIDE_FAILS[2]], [DIVIDE_FAILS[1]])[0])) == "4.1000000000000005"
    # integers at the boundary agree: 10 / 100 <= 0.1 and 10 <= 0.1 * 100
    for arithmetic in ("multiply", "divide"):
        assert correct([10.0, 10.5], 100, 0.1, "<=", arithmetic).tolist() == [True, False]
        assert correct([10.0], 100, 0.1, "<", arithmetic).tolist() == [False]
    # a zero T: multiply counts exact hits with <=, divide nothing (0 / 0 is NaN)
    assert correct([0.0], 0.0, 0.1, "<=", "multiply").tolist() == [True]
    assert correct([0.0], 0.0, 0.1, "<=", "divide").tolist() == [False]
    with pytest.raises(ValueError, match="arithmetic must be 'multiply' or 'divide'"):
        correct([1.0], 10, 0.1, "<=", "ratio")


def test_each_preset_compares_as_its_official_script():
    assert get_protocol("dift").arithmetic == "divide"  # eval_spair.py: dist / threshold <= 0.1
    for name in ("hedlin", "hyperfeatures", "sd-dino", "pf-willow"):
        assert get_protocol(name).arithmetic == "multiply", name
    assert get_protocol("dift").test() == "distance / T <= alpha"
    assert get_protocol("sd-dino").test() == "distance < alpha * T"
    d = get_protocol("dift").to_dict()
    assert d["arithmetic"] == "divide" and d["invalid_predictions"] == "wrong"
    t, gt, pred = DIVIDE_FAILS
    dist = distances([pred], [gt])
    assert get_protocol("dift").correct(dist, t, 0.1).tolist() == [False]
    assert get_protocol("hyperfeatures").correct(dist, t, 0.1).tolist() == [True]
    changed = get_protocol("hyperfeatures").with_changes(arithmetic="divide")
    assert changed.arithmetic == "divide" and changed.name == "hyperfeatures (modified)"
    with pytest.raises(DiffeatError, match="arithmetic must be one of multiply, divide"):
        PCKProtocol("x", arithmetic="ratio")


# -- Hedlin et al.'s evaluator: the 512 frame -------------------------------------------------


def _official_hedlin_pck(dataset, pred, src_kps, trg_kps, src_size, trg_size, src_box, trg_box):
    """Hedlin et al.'s loaders and classify_prd, written out (torch, float32): keypoints
    scaled into the 512 x 512 squashed frame, then torch.le(dist, T * alpha)."""
    import torch

    def scaled(kps, size):  # get_points: x * 512 / W, y * 512 / H, padded with -1 to 40
        k = torch.tensor(kps, dtype=torch.float32).t()
        k = torch.stack([k[0] * (512 / size[0]), k[1] * (512 / size[1])])
        return torch.cat([k, torch.zeros((2, 40 - k.shape[1])) - 1], dim=1), k.shape[1]

    trg, n = scaled(trg_kps, trg_size)
    prd = torch.tensor(pred, dtype=torch.float32).t()
    prd = torch.stack([prd[0] * (512 / trg_size[0]), prd[1] * (512 / trg_size[1])])
    if dataset == "spair":  # get_bbox on the source box with the source's size, max side
        b = torch.tensor(src_box, dtype=torch.float32)
        b[0::2] *= 512 / src_size[0]
        b[1::2] *= 512 / src_size[1]
        thres = torch.max(b[2] - b[0], b[3] - b[1])
    elif dataset == "pfwillow":  # max(trg_kps.max(1) - trg_kps.min(1)) over padded kps
        thres = max(trg.max(1)[0] - trg.min(1)[0])
    else:  # cub: max(w, h) of the (x, y, w, h) box times 512 / W
        x0, y0, x1, y1 = trg_box
        thres = max(x1 - x0, y1 - y0) * (512 / trg_size[0])
    dist = (prd - trg[:, :n]).pow(2).sum(dim=0).pow(0.5)
    return [
        torch.le(dist, torch.as_tensor(thres).expand_as(dist).float() * a).sum().item() / n
        for a in (0.05, 0.1)
    ]


@pytest.mark.parametrize("dataset", ["spair", "pfwillow", "cub"])
def test_hedlin_protocol_reproduces_the_official_evaluator(dataset):
    from pathlib import Path

    from diffeat.core.datasets import Pair
    from diffeat.eval.runner import PairOutcome, score

    rng = np.random.default_rng({"spair": 1, "pfwillow": 2, "cub": 3}[dataset])
    protocol = get_protocol("hedlin")
    outcomes, expected = [], []
    for i in range(30):
        n = 10 if dataset == "pfwillow" else int(rng.integers(1, 9))
        src_size = (int(rng.integers(150, 700)), int(rng.integers(150, 700)))
        trg_size = (int(rng.integers(150, 700)), int(rng.integers(150, 700)))
        src = rng.uniform(0, 1, (n, 2)) * np.array(src_size) * 0.9
        trg = rng.uniform(0, 1, (n, 2)) * np.array(trg_size) * 0.9
        # predictions near the truth (so some are right at each alpha), on Hedlin's grid:
        # argmax + 0.5 in the 512 frame, back in target pixels
        near = trg + rng.normal(0, 0.06, (n, 2)) * np.array(trg_size)
        cell = np.floor(near * 512 / np.array(trg_size))
        pred = (cell + 0.5) * np.array(trg_size) / 512
        src_box = tuple(float(v) for v in (*src.min(0), *src.max(0) + 20))
        trg_box = tuple(float(v) for v in (*trg.min(0), *trg.max(0) + 15))
        pair = Pair(
            str(i), Path("s.jpg"), Path("t.jpg"), "cat", src, trg,
            source_bbox=src_box, target_bbox=trg_box,
            source_size=src_size, target_size=trg_size,
        )  # fmt: skip
        outcomes.append(PairOutcome(pair, pred, np.ones(n), np.ones(n, dtype=bool), 0.0))
        expected.append(_official_hedlin_pck(dataset, pred, src, trg, src_size, trg_size,
                                             src_box, trg_box))  # fmt: skip
    kinds, _, summaries = score(outcomes, protocol, dataset)
    (kind,) = kinds
    by_alpha = summaries[kind]["by_alpha"]
    mean = np.mean(expected, axis=0)
    assert 0 < mean[0] < mean[1] < 1  # a case where the thresholds decide
    assert by_alpha["0.05"]["per_image"] == pytest.approx(mean[0], abs=1e-12)
    assert by_alpha["0.1"]["per_image"] == pytest.approx(mean[1], abs=1e-12)


def test_frame_thresholds_by_hand():
    # a 1000 x 500 target squashed to 512: x * 0.512, y * 1.024
    box = (100.0, 100.0, 300.0, 200.0)  # 200 wide, 100 high
    assert threshold_of("bbox-target", target_bbox=box, target_size=(1000, 500), frame=512) == (
        pytest.approx(max(200 * 0.512, 100 * 1.024))
    )
    assert threshold_of(
        "bbox-target-wscale", target_bbox=box, target_size=(1000, 500), frame=512
    ) == pytest.approx(200 * 0.512)
    pts = [[10.0, 20.0], [400.0, 50.0]]
    assert threshold_of("kps-target-padded", target_points=pts) == 401.0
    assert threshold_of(
        "kps-target-padded", target_points=pts, target_size=(1000, 500), frame=512
    ) == pytest.approx(400 * 0.512 + 1)
    assert threshold_of("img", target_size=(1000, 500), frame=512) == 512.0
    with pytest.raises(ValueError, match="needs the image size"):
        threshold_of("bbox-source", source_bbox=box, target_size=(10, 10), frame=512)
    # distances in the frame: 10 px in x of a 1000-wide target are 5.12 there
    assert distances([[10.0, 0.0]], [[0.0, 0.0]], scale=(0.512, 1.024))[0] == pytest.approx(5.12)
