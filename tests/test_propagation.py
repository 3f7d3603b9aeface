"""Label propagation (DAVIS-2017): the propagation arithmetic, the DAVIS metrics, the
dataset, the video readers and ``diffeat eval`` on a generated DAVIS-layout copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffeat.core.errors import DiffeatError
from diffeat.core.geometry import ImageTransform
from diffeat.core.images import as_input
from diffeat.core.pipeline import Pipeline
from diffeat.core.videos import (
    DAVIS_PALETTE,
    Video,
    frame_input,
    read_indexed_png,
    read_video,
    write_indexed_png,
)
from diffeat.eval.davis_metrics import boundary_f, disk, region_j, score_sequence, seg2bmap
from diffeat.eval.labelprop import (
    PropagationSettings,
    Propagator,
    dense_reference,
    labels_to_ids,
    one_hot,
    propagate,
)
from diffeat.eval.propagation import grid_ids, parse_options, run
from diffeat.eval.tasks import TaskContext, write_task_outputs
from diffeat.plugins.datasets.davis import Davis2017, DavisOptions
from diffeat.testing.videos import make_davis, moving_shapes

# ----------------------------------------------------------------- propagation arithmetic


def _random_context(n: int, h: int, w: int, c: int = 5, labels: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, h * w, c, generator=g), dim=2)
    target = F.normalize(torch.randn(h * w, c, generator=g), dim=1)
    soft = torch.softmax(torch.randn(n, labels, h, w, generator=g), dim=1)
    return target, feats, soft


@pytest.mark.parametrize(
    ("radius", "topk", "chunk"),
    [(2, 4, 2), (2, 4, 3), (0, 6, 4), (1, 5, 1), (3, 15, 7), (15, 15, 8)],
)
def test_chunked_propagation_equals_the_dense_official_computation(radius, topk, chunk):
    target, feats, soft = _random_context(3, 7, 9)
    s = PropagationSettings(temperature=0.2, topk=topk, context=28, radius=radius, block=chunk)
    ours = propagate(target, feats, soft, s)
    official = dense_reference(target, feats, soft, s)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
    # a soft label map still sums to one per cell (normalised affinity, one-hot-like context)
    torch.testing.assert_close(ours.sum(0), torch.ones(7, 9), rtol=1e-5, atol=1e-5)


def test_topk_beyond_the_window_keeps_every_window_value_like_the_official():
    # 1 context frame, radius 1: at most 9 positive affinities per target, top-k 12 > 9, so
    # the official k-th value is a zero from outside the window and nothing in it is dropped
    target, feats, soft = _random_context(1, 7, 3, seed=3)
    s = PropagationSettings(temperature=0.1, topk=12, context=0, radius=1, block=1)
    torch.testing.assert_close(
        propagate(target, feats, soft, s), dense_reference(target, feats, soft, s)
    )


def test_ties_at_the_kth_value_are_all_kept():
    # identical context features: all affinities tie, so every one is kept (official aff < kth)
    h, w = 2, 3
    feats = F.normalize(torch.ones(1, h * w, 4), dim=2)
    target = F.normalize(torch.ones(h * w, 4), dim=1)
    labels = torch.zeros(1, 2, h, w)
    labels[0, 1, 0, 0] = 1.0  # one labelled cell of six
    labels[0, 0] = 1 - labels[0, 1]
    out = propagate(target, feats, labels, PropagationSettings(topk=1, radius=0))
    torch.testing.assert_close(out[1], torch.full((h, w), 1 / 6))


def test_propagator_context_is_the_first_frame_and_the_last_n_soft_predictions():
    g = torch.Generator().manual_seed(1)
    h, w, c = 5, 6, 4
    maps = [torch.randn(c, h, w, generator=g) for _ in range(6)]
    first = one_hot(torch.randint(0, 3, (h, w), generator=g))
    s = PropagationSettings(temperature=0.2, topk=5, context=2, radius=2, block=2)
    prop = Propagator(s)
    prop.start(maps[0], first)

    def unit(m):
        return F.normalize(m.reshape(c, -1).T, dim=1)

    soft = {}
    for i in range(1, 6):
        soft[i] = prop.step(maps[i])
    # frame 5: context = first frame + the predictions of frames 3 and 4 (context = 2)
    feats = torch.stack([unit(maps[0]), unit(maps[3]), unit(maps[4])])
    labels = torch.stack([first, soft[3], soft[4]])
    expected = dense_reference(unit(maps[5]), feats, labels, s)
    torch.testing.assert_close(soft[5], expected, rtol=1e-5, atol=1e-6)
    assert len(prop.queue) == 2 and prop.queue[-1][1] is soft[5]


def test_labels_to_ids_min_max_normalises_each_channel_before_the_argmax():
    labels = torch.tensor([[[1.0, 0.0], [0.0, 0.3]], [[0.0, 0.5], [0.5, 0.2]]])
    ids = labels_to_ids(labels, model_size=(2, 2), frame_size=(4, 4))
    # raw argmax at (1, 1) would be 0 (0.3 > 0.2); after min-max it is 1 (0.3 < 0.4)
    expected = np.array([[0, 1], [1, 1]], dtype=np.uint8).repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(ids, expected)


def test_grid_ids_is_the_official_nearest_resize_and_pads_with_background():
    ids = np.zeros((8, 16), dtype=np.uint8)
    ids[:, 8:] = 2
    grid = grid_ids(ids, ImageTransform.resize((16, 8), (32, 16)), (4, 2))
    np.testing.assert_array_equal(grid.numpy(), [[0, 0, 2, 2], [0, 0, 2, 2]])
    # a padded fit: the frame (16x8) centred in a 16x16 input, grid 4x4: rows 0 and 3 are pad
    padded = ImageTransform((16, 8), (16, 16), (1.0, 1.0), (0.0, 4.0))
    g = grid_ids(ids, padded, (4, 4)).numpy()
    np.testing.assert_array_equal(g[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(g[1], [0, 0, 2, 2])


def test_options_defaults_are_difts_and_bad_values_name_the_key():
    o = parse_options({})
    assert (o.temperature, o.topk, o.context, o.radius) == (0.2, 15, 28, 15)
    with pytest.raises(DiffeatError, match=r"\[propagation\].*topk"):
        parse_options({"topk": 0})
    with pytest.raises(DiffeatError, match="temprature.*did you mean 'temperature'"):
        parse_options({"temprature": 0.1})


# ------------------------------------------------------------------------ DAVIS metrics


def _square(size, rows, cols):
    m = np.zeros(size, dtype=bool)
    m[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return m


def test_j_and_f_of_hand_computed_masks():
    gt = _square((12, 12), (2, 5), (2, 5))
    pred = _square((12, 12), (2, 5), (5, 8))
    # the boundary map of a square is the outline of the square one pixel up-left larger
    b = seg2bmap(gt)
    assert b.sum() == 16 and b[1, 1:6].all() and b[5, 1:6].all() and b[1:6, 1].all()
    # intersection: column 5, 4 rows; union 28
    assert region_j(gt, pred) == pytest.approx(4 / 28)
    # tolerance ceil(0.008 * 16.97) = 1 px (a cross): 9 of 16 boundary pixels match each way
    assert boundary_f(gt, pred) == pytest.approx(9 / 16)
    assert region_j(gt, gt) == 1.0 and boundary_f(gt, gt) == 1.0


def test_davis_conventions_for_empty_and_full_masks():
    empty = np.zeros((20, 30), dtype=bool)
    full = np.ones((20, 30), dtype=bool)
    some = _square((20, 30), (3, 9), (4, 12))
    assert region_j(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    # an object predicted where there is none (or missed): J 0, F 0
    assert region_j(empty, some) == 0.0 and boundary_f(empty, some) == 0.0
    assert region_j(some, empty) == 0.0 and boundary_f(some, empty) == 0.0
    # a full mask has an empty boundary map in _seg2bmap: F against an empty mask is 1
    assert seg2bmap(full).sum() == 0
    assert region_j(full, empty) == 0.0 and boundary_f(full, empty) == 1.0
    assert region_j(full, full) == 1.0 and boundary_f(full, full) == 1.0


def test_boundary_tolerance_at_davis_size_is_8_pixels():
    assert int(np.ceil(0.008 * np.linalg.norm((480, 854)))) == 8
    d = disk(2)
    np.testing.assert_array_equal(
        d,
        [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]],
    )


def test_sequence_scores_skip_first_and_last_frame_and_read_void_as_background():
    a = np.zeros((12, 12), dtype=np.uint8)
    a[2:6, 2:6] = 1
    a[8:10, 8:10] = 2
    truth = [a, a, a.copy(), a]
    truth[2][0, 0] = 255  # void: background for the semi-supervised scores
    wrong = np.where(a == 2, 0, a)  # object 2 lost
    predicted = [a, a, wrong, np.zeros_like(a)]  # the last frame is not scored
    scores = score_sequence(truth, predicted)
    assert scores["J_frames"] == [[1.0, 1.0], [1.0, 0.0]]
    assert scores["J"] == [1.0, 0.5] and scores["F"] == [1.0, 0.5]


# ------------------------------------------------------------------- videos and the store


def test_indexed_png_round_trip_and_rgb_masks_refused(tmp_path):
    ids = np.array([[0, 1, 2], [255, 1, 0]], dtype=np.uint8)
    path = write_indexed_png(tmp_path / "m.png", ids)
    with Image.open(path) as img:
        assert img.mode == "P" and img.getpalette()[:9] == DAVIS_PALETTE[:9]
    np.testing.assert_array_equal(read_indexed_png(path), ids)
    Image.new("RGB", (3, 2), (128, 0, 0)).save(tmp_path / "rgb.png")
    with pytest.raises(DiffeatError, match=r"rgb\.png is a RGB image, not an indexed mask"):
        read_indexed_png(tmp_path / "rgb.png")
    with pytest.raises(DiffeatError, match="mask not found"):
        read_indexed_png(tmp_path / "none.png")


def test_video_files_and_frame_folders_give_the_same_content_keys(tmp_path):
    images, _ = moving_shapes((48, 32), 4, objects=1)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i:03d}.png")
    gif = tmp_path / "clip.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=100)
    from_folder = read_video(folder)
    assert [p.name for p in from_folder] == ["000.png", "001.png", "002.png", "003.png"]
    keys = [frame_input(f).key for f in from_folder]
    assert keys == [as_input(im).key for im in images]  # a frame is an image to the store
    assert len(read_video(gif)) == 4
    with pytest.raises(DiffeatError, match="video not found"):
        read_video(tmp_path / "missing.mp4")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(DiffeatError, match=r"cannot decode the video .*broken\.mp4"):
        read_video(bad)


def test_mp4_decoded_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    images, _ = moving_shapes((64, 48), 5, objects=1)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for im in images:
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    frames = read_video(path)
    assert len(frames) == 5 and frames[0].size == (64, 48)


# -------------------------------------------------------------------- dataset and eval


@pytest.fixture
def davis_copy(tmp_path):
    root = tmp_path / "DAVIS"
    make_davis(root, sequences=2, frames=6, size=(96, 64))
    return root


def test_davis_dataset_reads_the_layout(davis_copy):
    ds = Davis2017(DavisOptions(root=str(davis_copy)))
    videos = list(ds.videos())
    assert [v.id for v in videos] == ["shapes-0", "shapes-1"]
    v = videos[0]
    assert len(v) == 6 and v.frames[0].name == "00000.jpg" and v.first.name == "00000.png"
    assert read_indexed_png(v.first).max() == 2
    only = Davis2017(DavisOptions(root=str(davis_copy), sequences=["shapes-1"]))
    assert [v.id for v in only.videos()] == ["shapes-1"]
    with pytest.raises(DiffeatError, match="ImageSets/2017/train.txt"):
        list(Davis2017(DavisOptions(root=str(davis_copy), split="train")).videos())


def _color_pipeline(manager, stride=1):
    return Pipeline.from_dict(
        {"extractor": {"plugin": "color-blur", "image_size": [96, 64], "stride": stride}},
        manager=manager,
    )


def test_eval_propagates_easy_motion_near_perfectly_and_writes_outputs(
    manager, davis_copy, tmp_path
):
    ds = Davis2017(DavisOptions(root=str(davis_copy)))
    ev = run(TaskContext(pipeline=_color_pipeline(manager), dataset=ds, dataset_name="davis2017"))
    s = ev.summary()
    assert s["sequences"] == 2 and s["objects"] == 3 and s["skipped"] == 0
    assert s["J&F"] > 0.9 and s["J"] > 0.85 and s["F"] > 0.9
    written = write_task_outputs(ev, tmp_path / "out")
    data = json.loads(Path(written["json"]).read_text())
    assert data["task"] == "propagation" and data["protocol"]["topk"] == 15
    assert data["summary"]["J&F"] == pytest.approx(s["J&F"])
    assert len(data["sequences"][0]["J_frames"][0]) == 4  # frames [1:-1] of 6
    assert all(Path(p).is_file() for p in written["plots"])
    assert "J&F" in Path(written["markdown"]).read_text()


def test_bad_videos_are_skipped_with_the_file_named_and_the_others_evaluated(manager, davis_copy):
    make_davis(davis_copy, sequences=3, frames=6, size=(96, 64))
    (davis_copy / "JPEGImages/480p/shapes-2/00004.jpg").write_bytes(b"truncated")
    (davis_copy / "Annotations/480p/shapes-0/00003.png").unlink()
    small = np.zeros((10, 10), dtype=np.uint8)
    write_indexed_png(davis_copy / "Annotations/480p/shapes-1/00000.png", small)
    with open(davis_copy / "ImageSets/2017/val.txt", "a") as f:
        f.write("ghost\n")
    ds = Davis2017(DavisOptions(root=str(davis_copy)))
    ev = run(TaskContext(pipeline=_color_pipeline(manager), dataset=ds, dataset_name="davis2017"))
    reasons = {item["id"]: item["reason"] for item in ev.skipped}
    assert set(reasons) == {"shapes-0", "shapes-1", "shapes-2", "ghost"}
    assert "shapes-2/00004.jpg" in reasons["shapes-2"]
    assert "annotation not found" in reasons["shapes-0"] and "00003.png" in reasons["shapes-0"]
    assert "shapes-1/00000.png: the mask is 10x10 but its frame" in reasons["shapes-1"]
    assert "ghost" in reasons["ghost"] and "no frames" in reasons["ghost"]
    assert ev.results_dict()["skipped"] == ev.skipped and ev.records == []


def test_frames_are_read_from_the_store_on_a_second_run(manager, davis_copy, tmp_path):
    from diffeat.store import FeatureStore
    from diffeat.testing import ColorBlurExtractor

    ds = Davis2017(DavisOptions(root=str(davis_copy), sequences=["shapes-1"]))
    store = FeatureStore(tmp_path / "f.zarr")
    cfg = {"extractor": {"plugin": "color-blur", "image_size": [96, 64], "stride": 2}}
    before = ColorBlurExtractor.calls
    first = run(TaskContext(Pipeline.from_dict(cfg, manager=manager, store=store), ds, "d"))
    assert ColorBlurExtractor.calls - before == 6
    again = run(TaskContext(Pipeline.from_dict(cfg, manager=manager, store=store), ds, "d"))
    assert ColorBlurExtractor.calls - before == 6  # every frame came from the store
    assert again.summary()["J&F"] == pytest.approx(first.summary()["J&F"])


def test_video_record_checks_its_ground_truth_length():
    with pytest.raises(ValueError, match="2 ground-truth entries for 3 frames"):
        Video("v", [Path("a.jpg"), Path("b.jpg"), Path("c.jpg")], truth=[None, None])
