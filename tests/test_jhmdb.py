"""JHMDB keypoint propagation (VideoWalk's protocol): label maps, argmax, PCK, the dataset
reading its own annotation files, and eval on a generated JHMDB-layout copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffeat.core.geometry import ImageTransform
from diffeat.core.pipeline import Pipeline
from diffeat.eval.joints import joint_maps, maps_to_points, pck_distances
from diffeat.eval.propagation import run
from diffeat.eval.tasks import TaskContext
from diffeat.plugins.datasets.jhmdb import Jhmdb, JhmdbOptions
from diffeat.testing.videos import make_jhmdb

pytest.importorskip("scipy")  # reading and writing the .mat files


def test_gaussian_maps_are_centred_on_the_joints_with_sigma_in_cells():
    t = ImageTransform.resize((32, 16), (32, 16))
    maps = joint_maps(np.array([[9.0, 5.0], [20.0, 11.0]]), t, (16, 8), sigma=0.5)
    assert maps.shape == (2, 8, 16)
    # (9, 5) px is cell (4.25, 2.25): the nearest cell (4, 2) is the peak
    assert divmod(int(maps[0].argmax()), 16) == (2, 4)
    expected = np.exp(-(0.25**2 + 0.25**2) / (2 * 0.5**2))
    assert float(maps[0, 2, 4]) == pytest.approx(expected, rel=1e-5)


def test_argmax_of_upsampled_maps_returns_image_points():
    t = ImageTransform.resize((64, 32), (32, 16))  # the model input is half the image
    maps = torch.zeros(1, 16, 32)
    maps[0, 4, 10] = 1.0  # model pixel (10, 4) after a stride-1 "upsampling"
    (pt,) = maps_to_points(maps, t)
    # model (10, 4) -> image ((10 + 0.5) * 2 - 0.5, (4 + 0.5) * 2 - 0.5)
    np.testing.assert_allclose(pt, [20.5, 8.5])


def test_pck_reference_is_0_6_of_the_truth_box_diagonal():
    truth = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])  # box 3 x 4, diagonal 5
    pred = truth + np.array([[0.3, 0.0], [0.0, 0.31], [0.6, 0.0]])
    d, ref = pck_distances(pred, truth)
    assert ref == pytest.approx(3.0)
    np.testing.assert_allclose(d, [0.3, 0.31, 0.6])
    assert list(d <= 0.1 * ref) == [True, False, False]  # PCK@0.1 threshold 0.3
    assert list(d <= 0.2 * ref) == [True, True, True]


def test_jhmdb_reads_its_list_and_mat_files(tmp_path):
    made = make_jhmdb(tmp_path / "JHMDB", videos=2, frames=5)
    videos = list(Jhmdb(JhmdbOptions(root=made["root"])).videos())
    assert [v.id for v in videos] == ["walk/shapes_0", "walk/shapes_1"]
    v = videos[0]
    assert len(v) == 5 and v.labels == "joints" and v.first.shape == (6, 2)
    assert v.frames[0].name == "00001.png"


def test_eval_tracks_joints_of_easy_motion_and_skips_a_damaged_annotation(manager, tmp_path):
    made = make_jhmdb(tmp_path / "JHMDB", videos=3, frames=5)
    bad = tmp_path / "JHMDB/joint_positions/walk/shapes_2/joint_positions.mat"
    bad.write_bytes(b"not a mat file")
    pipe = Pipeline.from_dict(
        {"extractor": {"plugin": "color-blur", "image_size": [96, 64], "stride": 2}},
        manager=manager,
    )
    ds = Jhmdb(JhmdbOptions(root=made["root"]))
    ev = run(TaskContext(pipeline=pipe, dataset=ds, dataset_name="jhmdb"))
    s = ev.summary()
    assert s["videos"] == 2 and s["skipped"] == 1
    assert s["PCK@0.2"] > 0.9 and s["PCK@0.1"] > 0.7
    (skipped,) = ev.skipped
    assert skipped["id"] == "walk/shapes_2" and "joint_positions.mat" in skipped["reason"]
    data = ev.results_dict()
    assert data["protocol"]["name"] == "jhmdb-videowalk" and len(data["videos"]) == 2
    assert len(data["videos"][0]["distances"]) == 4  # the first frame is not scored
