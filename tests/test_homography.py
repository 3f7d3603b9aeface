"""The homography task (HPatches): metrics on hand-made cases, the dataset reader on the real
layout, and ``diffeat eval`` end to end through the real CLI on generated sequences."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clihelp import cli_env, run, run_json

from diffeat.core.components import View
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.geometry import ImageTransform, sample_at
from diffeat.core.images import load_image
from diffeat.core.pipeline import Pipeline
from diffeat.core.sequences import HomographySequence, SkippedSequence, apply_homography
from diffeat.eval.homography import run as run_task
from diffeat.eval.homography_metrics import (
    accuracy,
    corner_error,
    estimate_homography,
    mutual_nearest,
    official_points,
    require_cv2,
    sample_descriptors,
    unique_keypoints,
)
from diffeat.eval.tasks import TaskContext, write_task_outputs
from diffeat.plugins.datasets.hpatches import HPatches, HPatchesOptions
from diffeat.plugins.datasets.hpatches_synthetic import make_hpatches_synthetic
from diffeat.plugins.datasets.synthetic import warp_image
from diffeat.testing import photo_like

SIZE = (240, 180)
BLUR = {
    "extractor": {"plugin": "color-blur", "image_size": list(SIZE), "sigmas": [0.0, 1.0, 2.0, 4.0]},
    "matcher": {"plugin": "mutual"},
}


def photos(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo_like(SIZE, seed=i).save(folder / f"p{i}.png")
    return folder


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    """Four generated sequences (2 viewpoint, 2 illumination) in the HPatches layout."""
    out = tmp_path / "hpatches-sequences-release"
    make_hpatches_synthetic(out, [photos(tmp_path / "photos")], sequences=4, seed=0)
    return out


# ------------------------------------------------------------------ metrics, by hand


def test_corner_error_of_known_homographies():
    truth = np.eye(3)
    shift = np.array([[1.0, 0, 2], [0, 1, 0], [0, 0, 1]])
    assert corner_error(shift, truth, (11, 21)) == pytest.approx(2.0, abs=1e-12)
    # scaling by 2 about the origin moves corner (x, y) by |(x, y)|; corners of an 11x21 image
    scale = np.diag([2.0, 2.0, 1.0])
    expected = (0 + 20 + 10 + math.hypot(10, 20)) / 4
    assert corner_error(scale, truth, (11, 21)) == pytest.approx(expected, abs=1e-12)
    # the same homography up to scale is no error; no estimate is an infinite one
    assert corner_error(3.0 * scale, scale, (11, 21)) == pytest.approx(0.0, abs=1e-12)
    assert corner_error(None, truth, (11, 21)) == math.inf


def test_accuracy_counts_errors_up_to_and_including_the_threshold():
    errors = [0.5, 1.0, 2.9, 3.0, 4.99, 5.0, 5.01, math.inf]
    assert accuracy(errors, [1, 3, 5]) == {"1": 2 / 8, "3": 4 / 8, "5": 6 / 8}
    assert accuracy([], [1.0, 2.5]) == {"1": None, "2.5": None}


def test_mutual_nearest_neighbours_on_a_constructed_case():
    a = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.1, 0.9, 0.0]])
    b = np.array([[0.0, 1.0, 0.05], [5.0, 5.0, 5.0], [2.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    # a0 <-> b2 and a1 <-> b0 are mutual; a2's nearest is b0, whose nearest is a1: dropped
    assert mutual_nearest(a, b, "cosine").tolist() == [[0, 2], [1, 0]]
    # cosine ignores length, L2 does not: [1, 0] is nearer [0.9, 0] than [10, 0] in L2 only
    a2 = np.array([[1.0, 0.0]])
    b2 = np.array([[10.0, 0.1], [0.9, 0.3]])
    assert mutual_nearest(a2, b2, "cosine").tolist() == [[0, 0]]
    assert mutual_nearest(a2, b2, "l2").tolist() == [[0, 1]]
    assert mutual_nearest(a2, b2[:0], "l2").shape == (0, 2)
    with pytest.raises(DiffeatError, match="metric must be one of cosine, l2"):
        mutual_nearest(a2, b2, "dot")


def test_half_cell_offset_arithmetic():
    pts = torch.tensor([[0.0, 0.0], [2.0, 1.0], [4.0, 3.0]])
    # w = 5, h = 4: x * 5/4 - 0.5 and y * 4/3 - 0.5; the ends go to the image edges
    got = official_points(pts, (5, 4))
    assert torch.allclose(got, torch.tensor([[-0.5, -0.5], [2.0, 1 * 4 / 3 - 0.5], [4.5, 3.5]]))


def test_sampling_reproduces_the_official_grid_sample_call_and_the_switch_turns_it_off():
    torch.manual_seed(0)
    w, h = 64, 48
    fmap = torch.randn(7, 12, 16)  # a grid over a 128x96 model input (squash resize)
    view = View(photo_like((w, h)), ImageTransform.resize((w, h), (128, 96)), descriptors=fmap)
    pts = np.array([[0, 0], [63, 47], [10.0, 30.0], [31.5, 23.5], [5, 40]], dtype=np.float32)
    # DIFT: c = ((w-1)/2, (h-1)/2); grid_sample(feat, (coord - c) / c), default arguments
    c = torch.tensor([(w - 1) / 2, (h - 1) / 2])
    norm = (torch.from_numpy(pts) - c) / c
    official = F.grid_sample(fmap[None], norm[None, :, None, :], align_corners=False)
    official = official[0, :, :, 0].T.numpy()
    ours = sample_descriptors(view, pts, half_cell_offset=True)
    np.testing.assert_allclose(ours, official, atol=1e-5)
    centred = sample_descriptors(view, pts, half_cell_offset=False)
    expected = sample_at(fmap, view.image_to_grid(torch.from_numpy(pts))).numpy()
    np.testing.assert_allclose(centred, expected, atol=1e-6)
    # the two agree at the image centre and differ towards the edges
    np.testing.assert_allclose(ours[3], centred[3], atol=1e-5)
    assert np.abs(ours[[0, 1, 4]] - centred[[0, 1, 4]]).max() > 1e-2


def test_unique_keypoints_sort_and_drop_repeats_as_numpy_does():
    pts = np.array([[5.0, 1.0], [1.0, 2.0], [5.0, 1.0], [1.0, 0.0]])
    kept, index = unique_keypoints(pts)
    assert kept.tolist() == [[1.0, 0.0], [1.0, 2.0], [5.0, 1.0]]
    assert index.tolist() == [3, 1, 0]


def test_homography_estimate_recovers_an_exact_map_and_fails_cleanly():
    rng = np.random.default_rng(0)
    truth = np.array([[1.02, 0.03, 4.0], [-0.02, 0.98, -3.0], [1e-4, -2e-4, 1.0]])
    src = rng.uniform(0, 200, size=(60, 2))
    dst = apply_homography(truth, src)
    dst[:20] = rng.uniform(0, 200, size=(20, 2))  # a third of the matches wrong
    for method in ("lmeds", "ransac"):
        est, inliers = estimate_homography(src, dst, method)
        assert corner_error(est, truth, (200, 200)) < 1e-3, method
        assert inliers[20:].all() and inliers.sum() <= 42
    est, inliers = estimate_homography(src[:3], dst[:3])
    assert est is None and inliers.tolist() == [False] * 3


def test_missing_opencv_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(DiffeatError, match=r"pip install 'diffeat\[geometric\]'"):
        require_cv2()


# ------------------------------------------------------------------ the dataset and generator


def test_generated_sequences_carry_their_exact_homographies(bench):
    seqs = list(HPatches(HPatchesOptions(root=str(bench))).sequences())
    assert [s.name for s in seqs] == sorted(p.name for p in bench.iterdir())
    assert {s.kind for s in seqs} == {"illumination", "viewpoint"}
    for seq in seqs:
        assert isinstance(seq, HomographySequence) and [t.index for t in seq.targets] == [
            2,
            3,
            4,
            5,
            6,
        ]
        image1 = load_image(seq.reference.path)
        for t in seq.targets:
            if seq.kind == "illumination":
                assert np.array_equal(t.homography, np.eye(3))
                continue
            # warping image 1 by the matrix read back gives the stored target, byte for byte
            again = np.asarray(warp_image(image1, t.homography))
            assert np.array_equal(again, np.asarray(load_image(t.image.path))), t.image.path
    viewpoint = next(s for s in seqs if s.kind == "viewpoint")
    assert not np.allclose(viewpoint.targets[-1].homography, np.eye(3))
    only = HPatches(HPatchesOptions(root=str(bench), split="viewpoint"))
    assert {s.kind for s in only.sequences()} == {"viewpoint"}


def test_bad_sequences_are_skipped_with_the_file_named(bench):
    names = sorted(p.name for p in bench.iterdir())
    (bench / names[0] / "H_1_4").unlink()
    (bench / names[1] / "H_1_2").write_text("1 2 3\nnot numbers\n")
    (bench / names[2] / "5.ppm").unlink()
    seqs = list(HPatches(HPatchesOptions(root=str(bench))).sequences())
    skipped = {s.name: s.reason for s in seqs if isinstance(s, SkippedSequence)}
    assert set(skipped) == set(names[:3])
    assert skipped[names[0]] == f"missing homography file {bench / names[0] / 'H_1_4'}"
    assert str(bench / names[1] / "H_1_2") in skipped[names[1]]
    assert skipped[names[1]].startswith("unreadable homography file")
    assert skipped[names[2]] == f"missing image {bench / names[2] / '5.ppm'}"
    assert isinstance(seqs[3], HomographySequence)


def test_high_res_sequences_of_d2net_are_left_out_unless_asked(tmp_path):
    root = tmp_path / "hp"
    make_hpatches_synthetic(root, [photos(tmp_path / "photos", 1)], sequences=1)
    (root / next(p.name for p in root.iterdir())).rename(root / "v_talent")
    make_hpatches_synthetic(root / "x", [tmp_path / "photos"], sequences=1)
    (root / "x" / "v_000p0").rename(root / "v_ok")
    (root / "x").rmdir()
    names = [s.name for s in HPatches(HPatchesOptions(root=str(root))).sequences()]
    assert names == ["v_ok"]
    full = HPatches(HPatchesOptions(root=str(root), exclude_high_res=False))
    assert [s.name for s in full.sequences()] == ["v_ok", "v_talent"]
    with pytest.raises(DiffeatError, match="is a homography benchmark"):
        next(iter(full.pairs()))
    with pytest.raises(DiffeatError, match="missing i_\\*/, v_\\*/"):
        list(HPatches(HPatchesOptions(root=str(tmp_path / "photos"))).sequences())


def write_kp_files(bench: Path, folder: Path) -> dict[str, np.ndarray]:
    """DIFT-format keypoint files (rows 'x y score'; the first two columns are the point)
    at points of image 1 mapped by the truth into each target, with one repeated row."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    written = {}
    for seq in HPatches(HPatchesOptions(root=str(bench))).sequences():
        w, h = load_image(seq.reference.path).size
        base = rng.uniform([8, 8], [w - 9, h - 9], size=(150, 2)).round(1)
        rows = np.concatenate([base, rng.uniform(size=(150, 1))], axis=1)
        rows = np.concatenate([rows, rows[:1]])  # a repeat, dropped as np.unique drops it
        np.savetxt(folder / f"{seq.name}-1.kp", rows)
        written[f"{seq.name}-1"] = base
        for t in seq.targets:
            mapped = apply_homography(t.homography, base)
            np.savetxt(folder / f"{seq.name}-{t.index}.kp", mapped)
    return written


def test_dift_keypoint_files_are_read_and_used(manager, bench, tmp_path):
    kp_dir = tmp_path / "superpoint-1k"
    written = write_kp_files(bench, kp_dir)
    dataset = HPatches(HPatchesOptions(root=str(bench), keypoints=str(kp_dir)))
    seqs = list(dataset.sequences())
    first = seqs[0]
    assert first.reference.keypoints.shape == (151, 2)
    np.testing.assert_array_equal(first.reference.keypoints[:150], written[f"{first.name}-1"])
    pipe = Pipeline.from_dict(BLUR, manager=manager)
    ev = run_task(TaskContext(pipe, dataset, "hpatches"))
    assert ev.keypoint_source == "dataset files"
    assert all(r.keypoints == (150, 150) for r in ev.records)
    proto = ev.results_dict()["protocol"]
    assert proto["official"] and proto["settings"]["method"] == "lmeds"
    # keypoints that correspond exactly: wherever most matches are right, LMEDS recovers the
    # homography to rounding; the colour descriptors fail some strong illumination changes
    for r in ev.records:
        if (r.match_errors() < 1e-3).mean() > 0.6:
            assert r.error < 1e-4, (r.sequence, r.index)
    assert ev.summary()["viewpoint"]["accuracy"]["1"] == 1.0
    assert ev.summary()["all"]["accuracy"]["1"] >= 0.9
    (kp_dir / f"{first.name}-3.kp").unlink()
    skipped = [s for s in dataset.sequences() if isinstance(s, SkippedSequence)]
    assert skipped == [
        SkippedSequence(first.name, f"missing keypoint file {kp_dir / f'{first.name}-3.kp'}")
    ]


def test_options_are_validated_and_a_descriptor_free_matcher_is_refused(manager, bench):
    dataset = HPatches(HPatchesOptions(root=str(bench)))
    pipe = Pipeline.from_dict(BLUR, manager=manager)
    with pytest.raises(ConfigError, match=r"\[homography\]\.method: 'svd' is not one of"):
        run_task(TaskContext(pipe, dataset, "hpatches", options={"method": "svd"}))
    with pytest.raises(ConfigError, match=r"unknown option 'metrik' \(did you mean 'metric'\?\)"):
        run_task(TaskContext(pipe, dataset, "hpatches", options={"metrik": "l2"}))
    from diffeat.core.plugins import PluginManager
    from diffeat.testing import AllHooksPlugin

    pm = PluginManager(entry_points=False)
    pm.add_plugin(AllHooksPlugin(), "all-hooks")
    free = Pipeline.from_dict(
        {"extractor": {"plugin": "testing-blur"}, "matcher": {"plugin": "testing-scaled"}},
        manager=pm,
    )
    with pytest.raises(DiffeatError, match="works without descriptors"):
        run_task(TaskContext(free, dataset, "hpatches"))


def test_in_process_run_is_near_perfect_and_writes_the_outputs(manager, bench, tmp_path):
    dataset = HPatches(HPatchesOptions(root=str(bench)))
    pipe = Pipeline.from_dict(BLUR, manager=manager, store=tmp_path / "feats.zarr")
    ev = run_task(TaskContext(pipe, dataset, "hpatches"))
    summary = ev.summary()
    assert summary["all"]["pairs"] == 20
    assert summary["illumination"]["pairs"] == summary["viewpoint"]["pairs"] == 10
    assert summary["all"]["accuracy"]["3"] >= 0.9
    assert summary["viewpoint"]["accuracy"]["5"] == 1.0
    # the store is keyed by content: the two sequences made from one photo share image 1
    assert ev.counts.computed == 22 and ev.counts.read_from_store == 2
    again = run_task(TaskContext(pipe, dataset, "hpatches"))
    assert again.counts.computed == 0 and again.counts.read_from_store == 24
    assert [r.error for r in again.records] == [r.error for r in ev.records]
    written = write_task_outputs(ev, tmp_path / "out")
    data = json.loads(Path(written["json"]).read_text())
    assert data["task"] == "homography" and data["protocol"]["name"] == "dift-hpatches"
    assert len(data["records"]) == 20 and data["skipped"] == []
    assert not data["protocol"]["official"]  # detected keypoints, not DIFT's SuperPoint files
    for name in ("accuracy.png", "homography_pairs.png"):
        assert (tmp_path / "out" / "plots" / name).stat().st_size > 0
    md = Path(written["markdown"]).read_text()
    assert "| viewpoint | 10 |" in md and "![homography_pairs](plots/homography_pairs.png)" in md


# ------------------------------------------------------------------ the real CLI


@pytest.fixture(scope="module")
def blur_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose ``diffeat`` finds the ``color-blur`` test extractor through an
    entry point (a dist-info folder on PYTHONPATH naming a module that holds the plugin)."""
    site = tmp_path_factory.mktemp("site")
    (site / "geo_blur_plugin.py").write_text(
        "from diffeat.testing import TestPlugin\nplugin = TestPlugin()\n"
    )
    info = site / "geo_blur_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: geo-blur-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffeat]\ntesting = geo_blur_plugin:plugin\n")
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return cli_env(PYTHONPATH=path)


@pytest.mark.slow
def test_cli_eval_hpatches_end_to_end(blur_env, tmp_path):
    listed = {d["name"]: d for d in run_json("datasets", env=blur_env)["datasets"]}
    assert listed["hpatches"]["task"] == "homography" and listed["spair"]["task"] == "pairs"
    made = run_json(
        "datasets",
        "make-synthetic",
        tmp_path / "bench",
        "--from",
        photos(tmp_path / "photos"),
        "--pairs",
        5,
        "--layout",
        "hpatches",
        env=blur_env,
    )
    bench = Path(made["out"])
    assert made["sequences"] == 5 and made["pairs"] == 25
    broken = made["names"][-1]
    (bench / broken / "H_1_3").unlink()
    cfg = tmp_path / "blur.toml"
    cfg.write_text(
        'name = "blur-geometric"\n[extractor]\nplugin = "color-blur"\nimage_size = [240, 180]\n'
        'sigmas = [0.0, 1.0, 2.0, 4.0]\n[matcher]\nplugin = "mutual"\n'
        '[homography]\nmethod = "lmeds"\nmetric = "cosine"\nhalf_cell_offset = true\n'
    )
    store, out = tmp_path / "feats.zarr", tmp_path / "out"
    args = ("eval", cfg, "--dataset", "hpatches", "--root", bench, "--store", store)
    res = run_json(*args, "--out", out, env=blur_env)
    assert res["task"] == "homography" and res["protocol"]["name"] == "dift-hpatches"
    assert res["protocol"]["settings"]["method"] == "lmeds"
    summary = res["summary"]
    assert summary["all"]["pairs"] == 20
    assert summary["all"]["accuracy"]["3"] >= 0.9 and summary["viewpoint"]["accuracy"]["5"] == 1.0
    assert res["skipped"] == [
        {"name": broken, "reason": f"missing homography file {bench / broken / 'H_1_3'}"}
    ]
    assert res["run"]["features"] == {"computed": 22, "read_from_store": 2}  # shared image 1s
    data = json.loads((out / "results.json").read_text())
    assert len(data["records"]) == 20 and data["pipeline"]["config"]["homography"]["method"]
    assert (out / "plots" / "homography_pairs.png").stat().st_size > 0
    # the terminal report, RANSAC through --set, features read back from the store
    text = run(*args, "--set", 'homography.method="ransac"', env=blur_env).stdout
    assert "findHomography ransac (3 px)" in text and "0 computed, 24 read" in text
    assert f"{broken}: missing homography file" in text
    assert "viewpoint" in text and "acc@1px" in text
    # bad task options: a clear message, exit 2
    proc = run(*args, "--set", 'homography.metric="dot"', env=blur_env, check=2)
    assert "[homography].metric: 'dot' is not one of 'cosine', 'l2'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_geometric_preset_and_the_defaults_are_dift_settings_and_documented(manager):
    from dataclasses import fields

    from diffeat.core.config import load_config
    from diffeat.core.options import build_options, options_dict
    from diffeat.eval.homography import OFFICIAL, HomographyOptions, _Task

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples" / "dift-sd21-geometric.toml", manager=manager)
    from_file = options_dict(build_options(_Task, cfg.tasks["homography"], "[homography]"))
    defaults = options_dict(HomographyOptions())
    for opts in (from_file, defaults):
        sd = OFFICIAL[0]
        assert {k: opts[k] for k in sd} == sd and opts["thresholds"] == [1, 3, 5]
    adm = load_config(root / "examples" / "dift-adm-geometric.toml", manager=manager)
    adm_opts = options_dict(build_options(_Task, adm.tasks["homography"], "[homography]"))
    assert {k: adm_opts[k] for k in OFFICIAL[1]} == OFFICIAL[1]  # RANSAC 3 px, L2
    doc = (root / "docs" / "evaluation.md").read_text()
    for f in fields(HomographyOptions):
        assert f"| `{f.name}` |" in doc, f.name


@pytest.mark.parametrize("detector", ["sift", "orb", "gftt"])
def test_detectors_keep_the_strongest_keypoints_inside_the_image(detector):
    from diffeat.eval.keypoints import detect_keypoints

    image = photo_like(SIZE, seed=5)
    many = detect_keypoints(image, detector, 1000)
    few = detect_keypoints(image, detector, 20)
    assert 20 < len(many) <= 1000 and len(few) == 20
    np.testing.assert_array_equal(few, many[:20])  # the strongest first
    assert (many >= 0).all() and (many[:, 0] <= SIZE[0] - 1).all()
    assert (many[:, 1] <= SIZE[1] - 1).all()


def test_an_unknown_detector_is_named():
    from diffeat.eval.keypoints import detect_keypoints

    with pytest.raises(DiffeatError, match="detector must be one of sift, orb, gftt, got 'fast'"):
        detect_keypoints(photo_like((32, 32)), "fast")
