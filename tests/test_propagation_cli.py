"""``diffeat eval --dataset davis2017`` and ``diffeat propagate`` through the real executable,
on generated DAVIS-layout videos, with the example plugin's pixel-patch extractor (informative
for solid-coloured shapes moving over a muted background)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from clihelp import cli_env, pip_install, run, run_json
from PIL import Image

from diffeat.core.videos import read_indexed_png
from diffeat.testing.videos import make_davis, moving_shapes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "diffeat-example-plugin"

pytestmark = pytest.mark.slow

PIPELINE = """
[extractor]
plugin = "example-patches"
image_size = [96, 64]
patch = 3

[aggregator]
plugin = "select"

[matcher]
plugin = "nearest"

[propagation]
temperature = 0.2
topk = 15
context = 28
radius = 15
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    pip_install(site, EXAMPLE)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return cli_env(PYTHONPATH=path)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "patches.toml"
    path.write_text(PIPELINE)
    return path


def test_cli_eval_davis_near_perfect_on_easy_motion_and_skips_bad_sequences(env, config, tmp_path):
    root = tmp_path / "DAVIS"
    make_davis(root, sequences=3, frames=6, size=(96, 64))
    # sequence 2: a mask of the wrong size
    Image.new("P", (10, 10)).save(root / "Annotations/480p/shapes-2/00002.png")
    out, store = tmp_path / "out", tmp_path / "f.zarr"
    args = ("eval", config, "--dataset", "davis2017", "--root", root, "--out", out)
    data = run_json(*args, "--store", store, env=env)
    s = data["summary"]
    assert s["sequences"] == 2 and s["objects"] == 3 and s["skipped"] == 1
    assert s["J&F"] > 0.9 and s["J"] > 0.85 and s["F"] > 0.9
    (skipped,) = data["skipped"]
    assert skipped["id"] == "shapes-2"
    assert "shapes-2/00002.png: the mask is 10x10 but its frame" in skipped["reason"]
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["name"] == "davis2017-semi-supervised"
    assert results["pipeline"]["config"]["propagation"]["topk"] == 15
    assert (out / "results.md").is_file() and list((out / "plots").glob("*.png"))
    # options from --set; the terminal report names the skipped sequence
    text = run("-q", *args, "--store", store, "--set", "propagation.topk=5", env=env).stdout
    assert "J&F" in text and "skipped shapes-2" in text
    again = json.loads((out / "results.json").read_text())
    assert again["protocol"]["topk"] == 5
    bad = run(*args, "--set", "propagation.topk=0", env=env, check=2)
    assert f"{config}: [propagation]: topk must be >= 1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_propagate_writes_masks_and_an_overlay(env, config, tmp_path):
    images, masks = moving_shapes((96, 64), 5, objects=2, seed=3)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, im in enumerate(images):
        im.save(frames / f"f{i:02d}.png")
    first = tmp_path / "first.png"
    Image.fromarray(masks[0], mode="L").save(first)  # a greyscale id mask works too
    out = tmp_path / "out"
    data = run_json("propagate", config, frames, "--mask", first, "--out", out, env=env)
    assert data["frames"] == 5 and data["objects"] == 2
    assert [Path(p).name for p in data["masks"]] == [f"f{i:02d}.png" for i in range(5)]
    for i, path in enumerate(data["masks"]):
        ids = read_indexed_png(path)
        iou = [
            np.sum((ids == k) & (masks[i] == k)) / np.sum((ids == k) | (masks[i] == k))
            for k in (1, 2)
        ]
        assert min(iou) > 0.8, (i, iou)
    with Image.open(data["overlay"]) as gif:
        assert gif.n_frames == 5 and gif.size == (96, 64)
    # a GIF as the video (decoded frames), masks named by index
    clip = tmp_path / "clip.gif"
    images[0].save(clip, save_all=True, append_images=images[1:], duration=100)
    data = run_json(
        "propagate",
        config,
        clip,
        "--mask",
        first,
        "--out",
        tmp_path / "o2",
        "--no-overlay",
        env=env,
    )
    assert Path(data["masks"][-1]).name == "00004.png" and data["overlay"] is None
    # bad input: an undecodable video, a mask of another size
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"nothing")
    proc = run("propagate", config, broken, "--mask", first, "--out", out, env=env, check=2)
    assert "cannot decode the video" in proc.stderr and "broken.mp4" in proc.stderr
    Image.new("L", (20, 20)).save(tmp_path / "small.png")
    proc = run(
        "propagate",
        config,
        frames,
        "--mask",
        tmp_path / "small.png",
        "--out",
        out,
        env=env,
        check=2,
    )
    assert "the first mask is 20x20 but the frame is 96x64" in proc.stderr


def test_cli_eval_jhmdb_tracks_joints(env, config, tmp_path):
    pytest.importorskip("scipy")
    from diffeat.testing.videos import make_jhmdb

    made = make_jhmdb(tmp_path / "JHMDB", videos=2, frames=5)
    data = run_json("eval", config, "--dataset", "jhmdb", "--root", made["root"], env=env)
    assert data["protocol"]["name"] == "jhmdb-videowalk"
    assert data["summary"]["videos"] == 2 and data["summary"]["PCK@0.2"] > 0.9


def test_cli_extract_reads_video_files_and_video_datasets_keyed_by_frame_content(
    env, config, tmp_path
):
    av = pytest.importorskip("av")
    images, _ = moving_shapes((96, 64), 4, objects=1, seed=5)
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for im in images:
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    store = tmp_path / "f.zarr"
    first = run_json("extract", config, clip, "--store", store, env=env)
    assert (first["images"], first["computed"]) == (4, 4)
    again = run_json("extract", config, clip, "--store", store, env=env)
    assert (again["computed"], again["cached"]) == (0, 4)
    root = tmp_path / "DAVIS"
    make_davis(root, sequences=2, frames=3, size=(96, 64))
    made = run_json(
        "extract", config, "--dataset", "davis2017", "--root", root, "--store", store, env=env
    )
    assert made["images"] == 6 and made["computed"] == 6
