"""The evaluation loop and ``diffeat eval`` end to end, with known PCK."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from clihelp import cli_env, pip_install, run, run_json

from diffeat.core.components import MatchResult
from diffeat.core.datasets import Pair
from diffeat.core.pipeline import Pipeline
from diffeat.eval.protocols import get_protocol
from diffeat.eval.report import markdown, results_dict, terminal_report, write_outputs
from diffeat.eval.runner import Evaluation, evaluate, run_pairs, score
from diffeat.plugins.datasets.spair import SPairOptions
from diffeat.plugins.datasets.synthetic import Synthetic, make_synthetic
from diffeat.testing import smooth_texture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "diffeat-example-plugin"


def texture_folder(path: Path) -> Path:
    """Four 64x64 textures in two category folders (64x64: the example extractor's input)."""
    for cat, seeds in (("cat", (0, 1)), ("dog", (10, 11))):
        (path / cat).mkdir(parents=True)
        for s in seeds:
            smooth_texture((64, 64), seed=s).save(path / cat / f"t{s}.png")
    return path


COLOR_BLUR = {"extractor": {"plugin": "color-blur", "image_size": [64, 64]}}


# ------------------------------------------------------------------------- in process


def test_flip_invariant_extractor_is_exact_on_synthetic_pairs(manager, tmp_path):
    bench = tmp_path / "bench"
    make_synthetic(
        bench,
        [texture_folder(tmp_path / "photos")],
        pairs=9,
        seed=0,
        kinds=["identity", "translate", "flip"],
        ext="png",
    )
    dataset = Synthetic(SPairOptions(root=str(bench)))
    store = tmp_path / "feats.zarr"
    pipe = Pipeline.from_dict(COLOR_BLUR, manager=manager, store=store)
    ev = evaluate(pipe, dataset, dataset_name="synthetic", protocol=get_protocol("dift"))
    # colour blurred with symmetric kernels is shift- and flip-equivariant: every point exact
    for outcome in ev.outcomes:
        assert np.nanmax(outcome.distances()) == 0.0, outcome.pair.id
    assert ev.headline() == 1.0
    summary = ev.summaries["bbox-target"]["by_alpha"]["0.1"]
    assert summary["per_point"] == 1.0 and set(summary["categories"]) == {"cat", "dog"}
    # 4 source images + 9 targets, of which the 3 identity targets are their sources' pixels
    stats = ev.stats.to_dict()
    assert stats["pairs"] == 9 and stats["images_decoded"] == 4 + 9
    assert stats["features"] == {"computed": 4 + 6, "read_from_store": 18 - 10}
    assert ev.store["cache_key"] == pipe.cache_key
    held = pipe.store.info()["extractors"][pipe.cache_key]["bytes"]
    assert ev.store["cache_key_bytes"] == held > 0
    # another matcher on the same store computes nothing
    other = Pipeline.from_dict(
        {**COLOR_BLUR, "matcher": {"plugin": "mutual"}}, manager=manager, store=store
    )
    ev2 = evaluate(other, dataset, dataset_name="synthetic", protocol=get_protocol("dift"))
    assert ev2.stats.to_dict()["features"] == {"computed": 0, "read_from_store": 18}
    # outputs
    written = write_outputs(ev, tmp_path / "out")
    data = json.loads(Path(written["json"]).read_text())
    assert data["pipeline"]["config"]["extractor"]["plugin"] == "color-blur"
    assert data["pipeline"]["config"]["matcher"]["plugin"] == "nearest"  # resolved default
    assert data["protocol"]["name"] == "dift" and data["dataset"]["name"] == "synthetic"
    assert data["headline"]["value"] == 1.0 and data["run"]["features"]["computed"] == 10
    pair = data["pairs"][0]
    assert pair["predicted"] == pair["target_points"]
    assert pair["correct"]["bbox-target"]["0.1"] == [True] * len(pair["target_points"])
    assert set(pair["thresholds"]) == {"bbox-target"} and pair["seconds"] >= 0
    for name in ("pck_vs_alpha.png", "categories.png", "qualitative.png", "results.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| cat |" in md and "mean of categories" in md and "![qualitative]" in md
    assert "mean of categories" in terminal_report(ev)


class Recorder:
    """A stand-in pipeline: records what it is asked and answers target = source + (1, 0)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, np.ndarray]] = []
        self.store = None
        self.matcher = object()

    def match(self, source, target, points):
        pts = torch.as_tensor(points, dtype=torch.float32)
        self.calls.append((source.category, target.category, pts.numpy().copy()))
        return MatchResult(
            pts + torch.tensor([1.0, 0.0]),
            torch.ones(len(pts)),
            torch.ones(len(pts), dtype=torch.bool),
        )


def test_counts_cover_every_extractor_of_a_fused_pipeline(manager, tmp_path):
    """An image counts as read from the store only if every extractor's entry is there."""
    bench = tmp_path / "bench"
    make_synthetic(
        bench, [texture_folder(tmp_path / "photos")], pairs=4, seed=1, kinds=["translate"]
    )
    dataset = Synthetic(SPairOptions(root=str(bench)))
    store = tmp_path / "feats.zarr"
    first = {"name": "a", "plugin": "color-blur", "image_size": [64, 64]}
    second = {"name": "b", "plugin": "color-blur", "image_size": [32, 32]}
    only_a = Pipeline.from_dict({"extractor": [first]}, manager=manager, store=store)
    evaluate(only_a, dataset, dataset_name="synthetic", protocol=get_protocol("dift"))
    both = Pipeline.from_dict(
        {"extractor": [first, second], "aggregator": {"plugin": "fuse"}},
        manager=manager,
        store=store,
    )
    ev = evaluate(both, dataset, dataset_name="synthetic", protocol=get_protocol("dift"))
    features = ev.stats.to_dict()["features"]
    assert features["computed"] > 0  # "a" is stored, "b" is not: these are computed
    again = evaluate(both, dataset, dataset_name="synthetic", protocol=get_protocol("dift"))
    assert again.stats.to_dict()["features"]["computed"] == 0


def test_runner_passes_visible_clipped_points_and_the_category(tmp_path):
    img = tmp_path / "a.png"
    smooth_texture((40, 30)).save(img)
    pairs = [
        Pair(
            "p1",
            img,
            img,
            "tvmonitor",
            [[5, 5], [45, 10], [7, 8]],  # the 2nd lies outside the 40x30 image: clipped
            [[6, 5], [40, 10], [0, 0]],
            visible=[True, True, False],
        ),
        Pair("p2", img, img, "tvmonitor", [[1, 1]], [[1, 1]], visible=[False]),
    ]
    rec = Recorder()
    outcomes, stats = run_pairs(rec, pairs)
    assert len(rec.calls) == 1  # p2 has nothing to match
    src_cat, tgt_cat, pts = rec.calls[0]
    assert (src_cat, tgt_cat) == ("tvmonitor", "tvmonitor")
    assert pts.tolist() == [[5, 5], [39, 10]]
    assert stats.clipped_source_points == 1 and stats.pairs_without_points == 1
    assert stats.computed == 2 and stats.read_from_store == 0  # no store: always computed
    first = outcomes[0]
    assert first.predicted[:2].tolist() == [[6, 5], [40, 10]] and np.isnan(first.predicted[2]).all()
    d = first.distances()
    assert d[:2].tolist() == [0, 0] and math.isnan(d[2])
    # sizes missing from the annotation are read from the files: the img threshold works
    assert pairs[0].target_size == (40, 30)


class Scripted:
    """A stand-in pipeline that answers each pair with scripted points and validity."""

    def __init__(self, answers: list[tuple[list[list[float]], list[bool]]]) -> None:
        self.answers = list(answers)
        self.store = None
        self.matcher = object()

    def match(self, source, target, points):
        pts, valid = self.answers.pop(0)
        assert len(pts) == len(points)
        return MatchResult(
            torch.tensor(pts, dtype=torch.float64),
            torch.ones(len(pts)),
            torch.tensor(valid, dtype=torch.bool),
        )


def test_unusable_predictions_count_wrong_and_are_recorded(tmp_path):
    """A matcher that gives up (NaN, or valid = False) must not raise its own score.

    Target box 0..39 x 0..29 in a 40 x 30 image: T = 39, alpha 0.1, limit 3.9 px.
    p1: an exact hit; a NaN; an exact hit marked invalid; a point 0.75 px outside the image
    (scored by distance, correct); a 20 px miss; an invisible keypoint. p2: one NaN.
    Official: p1 2/5, p2 0/1 -> per image 0.2, per point 2/6. (Dropping the unusable ones,
    as before, gave p1 2/3 or 3/4 and left p2 out.)"""
    img = tmp_path / "a.png"
    smooth_texture((40, 30)).save(img)
    nan = math.nan
    gt = [[5, 5], [10, 10], [15, 15], [0, 12], [10, 20], [7, 7]]
    box = (0, 0, 39, 29)
    pairs = [
        Pair("p1", img, img, "cat", gt, gt, [True] * 5 + [False], box, box),
        Pair("p2", img, img, "cat", [[3, 3]], [[3, 3]], None, box, box),
    ]
    answers = [
        (
            [[5, 5], [nan, nan], [15, 15], [-0.75, 12], [30, 20]],
            [True, True, False, True, True],
        ),
        ([[nan, 4.0]], [True]),
    ]
    outcomes, stats = run_pairs(Scripted(answers), pairs)
    assert stats.invalid_predictions == 3 and stats.outside_image_predictions == 1
    protocol = get_protocol("dift")
    kinds, per_pair, summaries = score(outcomes, protocol, "spair")
    summary = summaries["bbox-target"]
    assert (summary["pairs"], summary["points"], summary["invalid_points"]) == (2, 6, 3)
    at = summary["by_alpha"]["0.1"]
    assert at["per_image"] == pytest.approx(0.2) and at["per_point"] == pytest.approx(2 / 6)
    assert at["categories"]["cat"]["invalid_points"] == 3
    ev = Evaluation(
        "spair", {}, protocol, protocol.alphas, kinds, outcomes, stats, summaries, per_pair
    )
    data = results_dict(ev)
    assert data["run"]["invalid_predictions"] == 3
    assert data["run"]["outside_image_predictions"] == 1
    assert data["summary"]["bbox-target"]["invalid_points"] == 3
    assert data["protocol"]["arithmetic"] == "divide"
    assert data["protocol"]["invalid_predictions"] == "wrong"
    p1, p2 = data["pairs"]
    assert p1["invalid"] == [False, True, True, False, False, None]
    assert p1["invalid_points"] == 2 and p1["outside_image_points"] == 1
    assert p1["correct"]["bbox-target"]["0.1"] == [True, False, False, True, False, None]
    assert p1["distances"][1] is None and p1["distances"][3] == 0.75
    assert p2["invalid"] == [True] and p2["correct"]["bbox-target"]["0.1"] == [False]
    text = terminal_report(ev)
    assert "without a usable prediction" in text and "correct if distance / T <= alpha" in text


def test_training_validation_counts_unusable_predictions_wrong(tmp_path):
    """Training validation scores with the evaluation's PCK: a NaN or invalid prediction is
    wrong there too (it was left out before). 40 x 30 image, T_img = 40, limit 4 px."""
    from types import SimpleNamespace

    from diffeat.train.validate import Validator, ValPair

    img = tmp_path / "a.png"
    smooth_texture((40, 30)).save(img)
    gt = [[5, 5], [10, 10], [15, 15], [20, 20]]
    pair = Pair("p", img, img, "cat", gt, gt, target_size=(40, 30))
    nan = math.nan
    matcher = Scripted([([[5, 5], [nan, nan], [15, 15], [21, 20]], [True, True, False, True])])
    source = SimpleNamespace(read=lambda key, device=None: SimpleNamespace(transform=None))
    aggregator = SimpleNamespace(forward_features=lambda sets: torch.ones(2, 3, 2, 2))
    cells = np.zeros(4, dtype=np.int64)
    item = ValPair(pair, "a", "a", cells, cells, (40, 30))
    validator = Validator(source, matcher, aggregator, [item], alpha=0.1, temperature=0.07)
    out = validator()
    assert out["pck_img"] == pytest.approx(2 / 4)  # the exact hit and the 1 px miss
    assert out["points"] == 4 and out["invalid_points"] == 2 and out["pck_bbox"] is None


def test_several_thresholds_and_overrides(manager, tmp_path):
    bench = tmp_path / "bench"
    make_synthetic(
        bench, [texture_folder(tmp_path / "photos")], pairs=4, seed=1, kinds=["flip"], ext="png"
    )
    pipe = Pipeline.from_dict(COLOR_BLUR, manager=manager)
    protocol = get_protocol("hyperfeatures").with_changes(alphas=(0.01, 0.1))
    ev = evaluate(
        pipe,
        Synthetic(SPairOptions(root=str(bench))),
        dataset_name="synthetic",
        protocol=protocol,
        limit=3,
    )
    assert ev.thresholds == ("img", "bbox-target") and ev.stats.pairs == 3
    for t in ev.pair_thresholds:
        assert t["img"] == 64 and 0 < t["bbox-target"] <= 63
    data = results_dict(ev, pairs=False)
    assert "pairs" not in data and set(data["summary"]) == {"img", "bbox-target"}
    assert set(data["summary"]["img"]["by_alpha"]) == {"0.01", "0.1"}
    assert data["headline"] == {
        "threshold": "img",
        "alpha": 0.01,
        "average": "per-point",
        "value": 1.0,
    }
    assert "## Threshold `bbox-target`" in markdown(ev)


# ------------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """The example plugin (pixel-patch extractor ``example-patches``, matcher ``example-l2``)
    pip-installed into a folder, found through its entry point."""
    import os

    site = tmp_path_factory.mktemp("site")
    pip_install(site, EXAMPLE)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return cli_env(PYTHONPATH=path)


def in_process_example_pipeline(monkeypatch, store=None):
    """The same example pipeline in this process (the plugin imported from its source)."""
    from diffeat.core.plugins import PluginManager

    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    import diffeat_example_plugin

    pm = PluginManager(entry_points=False)
    pm.add_plugin(diffeat_example_plugin, "example")
    return Pipeline.from_file(EXAMPLE / "example.toml", manager=pm, store=store)


@pytest.mark.slow
def make_translate_bench(bench: Path, photos: Path, pairs: int, env: dict) -> dict:
    """``diffeat datasets make-synthetic`` with integer translations, lossless PNG."""
    return run_json(
        "datasets",
        "make-synthetic",
        bench,
        "--from",
        photos,
        "--pairs",
        pairs,
        "--kinds",
        "translate",
        "--ext",
        "png",
        env=env,
    )


def test_cli_eval_known_pck_and_store_reuse(plugin_env, tmp_path):
    bench = tmp_path / "bench"
    made = make_translate_bench(bench, texture_folder(tmp_path / "photos"), 6, plugin_env)
    assert made["pairs"] == 6 and made["kinds"] == {"translate": 6}
    store, out = tmp_path / "feats.zarr", tmp_path / "out"
    evaluate_example = ("eval", EXAMPLE / "example.toml", "--dataset", "synthetic", "--root", bench)
    evaluate_example += ("--store", store)
    first = run_json(*evaluate_example, "--out", out, env=plugin_env)
    # pixel patches match exactly under a pure integer translation: PCK 1 under any average
    assert first["headline"]["value"] == 1.0
    s = first["summary"]["bbox-target"]["by_alpha"]["0.1"]
    assert (s["per_image"], s["per_point"], s["category_mean_per_point"]) == (1.0, 1.0, 1.0)
    assert first["run"]["features"] == {"computed": 4 + 6, "read_from_store": 2}
    assert first["store"]["cache_key_bytes"] > 0 and first["outputs"]["json"] == str(
        out / "results.json"
    )
    results = json.loads((out / "results.json").read_text())
    assert all(d == 0 for p in results["pairs"] for d in p["distances"])
    assert results["pipeline"]["config"]["extractor"]["plugin"] == "example-patches"
    assert (out / "qualitative.png").stat().st_size > 0
    # another matcher on the same store: every feature is read back, none computed
    second = run_json(*evaluate_example, "--set", 'matcher.plugin="nearest"', env=plugin_env)
    assert second["run"]["features"] == {"computed": 0, "read_from_store": 12}
    assert second["pipeline"]["config"]["matcher"]["plugin"] == "nearest"
    assert second["headline"]["value"] == 1.0
    # the terminal table
    text = run(
        "-q",
        *evaluate_example,
        "--alpha",
        "0.05,0.1",
        "--threshold",
        "img",
        "--comparison",
        "<",
        env=plugin_env,
    ).stdout
    assert (
        "PCK@0.05 (image)" in text
        and "mean of categories" in text
        and "0 computed, 12 read" in text
    )


@pytest.mark.slow
def test_cli_flip_pck_equals_an_independent_computation(plugin_env, tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    run(
        "datasets",
        "make-synthetic",
        bench,
        "--from",
        texture_folder(tmp_path / "photos"),
        "--pairs",
        8,
        "--kinds",
        "translate,flip",
        "--ext",
        "png",
        "--seed",
        3,
        env=plugin_env,
    )
    out = tmp_path / "out"
    run(
        "eval",
        EXAMPLE / "example.toml",
        "--dataset",
        "synthetic",
        "--root",
        bench,
        "--out",
        out,
        "--protocol",
        "sd-dino",
        "--no-plots",
        env=plugin_env,
    )
    results = json.loads((out / "results.json").read_text())
    assert not (out / "pck_vs_alpha.png").exists()
    pipe = in_process_example_pipeline(monkeypatch)
    correct = {0.1: [0, 0], 0.05: [0, 0], 0.01: [0, 0]}  # alpha -> [correct, total]
    per_kind: dict[str, list[bool]] = {"translate": [], "flip": []}
    for p in results["pairs"]:
        from diffeat.core.images import as_input

        src = as_input(p["source"]).with_category(p["category"])
        tgt = as_input(p["target"]).with_category(p["category"])
        pred = pipe.match(src, tgt, p["source_points"]).points.numpy()
        assert np.allclose(pred, p["predicted"], atol=1e-3)
        gt = np.asarray(p["target_points"])
        x0, y0, x1, y1 = p["target_bbox"]
        t = max(x1 - x0, y1 - y0)
        dist = np.linalg.norm(pred - gt, axis=1)
        for alpha in correct:
            ok = dist < alpha * t  # SD-DINO: strict
            correct[alpha][0] += int(ok.sum())
            correct[alpha][1] += len(ok)
            assert p["correct"]["bbox-target"][f"{alpha:g}"] == ok.tolist()
        per_kind[p["flags"]["transform"]["kind"]] += (dist < 0.1 * t).tolist()
    assert all(per_kind["translate"])  # exact under translation
    flip_pck = np.mean(per_kind["flip"])
    assert flip_pck < 0.9  # pixel patches are not mirror-invariant
    summary = results["summary"]["bbox-target"]["by_alpha"]
    for alpha, (c, n) in correct.items():
        assert summary[f"{alpha:g}"]["per_point"] == pytest.approx(c / n)
    assert summary["0.1"]["per_point"] < 1.0
    assert results["protocol"]["comparison"] == "<"


@pytest.mark.slow
def test_cli_datasets_listing_and_errors(tmp_path):
    listing = run_json("datasets")
    names = {d["name"]: d for d in listing["datasets"]}
    assert set(names) >= {"spair", "pfwillow", "cub", "synthetic"}
    assert (
        "PairAnnotation" in names["spair"]["layout"]
        and names["spair"]["default_protocol"] == "dift"
    )
    assert "test_pairs_pf.csv" in names["pfwillow"]["layout"]
    assert any(o["name"] == "pairs_per_class" for o in names["cub"]["options"])
    text = run("datasets").stdout
    assert "expects:" in text and "cvlab.postech.ac.kr" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = ROOT / "examples" / "dift-sd21.toml"  # validated, never loaded: no model is needed
    proc = run("eval", cfg, "--dataset", "spair", "--root", empty, check=2)
    assert "is missing JPEGImages/" in proc.stderr and "SPair-71k" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("eval", cfg, "--dataset", "spiar", "--root", empty, check=2)
    assert (
        "unknown dataset plugin 'spiar'" in proc.stderr
        and "did you mean 'spair'" in proc.stderr.lower()
    )
    proc = run("eval", cfg, "--dataset", "cub", "--root", empty, "-o", "pair_per_class=3", check=2)
    assert "unknown option 'pair_per_class'" in proc.stderr
    proc = run("datasets", "make-synthetic", tmp_path / "b", "--from", empty, check=2)
    assert "no images found" in proc.stderr


def test_config_protocol_is_the_eval_default(plugin_env, tmp_path):
    bench = tmp_path / "bench"
    make_translate_bench(bench, texture_folder(tmp_path / "photos"), 2, plugin_env)
    cfg = tmp_path / "p.toml"
    text = (EXAMPLE / "example.toml").read_text()
    cfg.write_text('protocol = "hyperfeatures"\n' + text)
    args = ("eval", cfg, "--dataset", "synthetic", "--root", bench, "--limit", 1)
    res = run_json(*args, env=plugin_env)
    assert res["protocol"]["name"] == "hyperfeatures"
    assert run_json(*args, "--protocol", "dift", env=plugin_env)["protocol"]["name"] == "dift"
    cfg.write_text('protocol = "nope"\n' + text)
    proc = run(*args, env=plugin_env, check=2)
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_the_store_report_never_fails_a_finished_evaluation(tmp_path) -> None:
    from diffeat.eval.runner import _cache_key_bytes
    from diffeat.store import FeatureStore

    class OlderStore:  # written against the protocol before cache_key_bytes
        def info(self):
            return {"extractors": {"ck": {"bytes": 123}}}

    class Unreadable:
        def cache_key_bytes(self, cache_key):
            raise PermissionError(13, "Permission denied", str(tmp_path))

    store = FeatureStore(tmp_path / "feats.zarr")
    assert _cache_key_bytes(OlderStore(), "ck") == 123
    assert _cache_key_bytes(Unreadable(), "ck") is None
    assert _cache_key_bytes(store, "never-written") is None  # computed, not kept
