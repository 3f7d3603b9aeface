"""``diffeat train``: the loss, keypoint rounding, pair order, a run that learns, SIGKILL + resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clihelp import DIFFEAT, cli_env, run
from waiting import wait_until

from diffeat.core.config import load_config, parse_config, to_toml
from diffeat.core.errors import ConfigError
from diffeat.core.geometry import ImageTransform
from diffeat.core.images import as_input
from diffeat.core.pipeline import Pipeline
from diffeat.eval.protocols import get_protocol
from diffeat.eval.runner import evaluate
from diffeat.plugins.datasets.spair import SPairOptions
from diffeat.plugins.datasets.synthetic import Synthetic, make_synthetic
from diffeat.plugins.hyperfeatures import load_checkpoint
from diffeat.store import FeatureStore
from diffeat.testing import (
    ColorBlurExtractor,
    ExtractorConformance,
    MultiColorBlurExtractor,
    MultiColorBlurOptions,
    smooth_texture,
)
from diffeat.train.loop import pair_order, train, trainable_aggregator
from diffeat.train.loss import cells_centres, cells_scale, correspondence_loss
from diffeat.train.options import TrainOptions, train_options

SMALL_NET = {
    "plugin": "hyperfeatures",
    "projection_dim": 32,
    "norm_groups": 8,
    "size": [16, 16],
    "device": "cpu",
}
CONFIG = {
    "extractor": {"plugin": "color-blur-multi", "image_size": [64, 64]},
    "aggregator": SMALL_NET,
}


@pytest.fixture
def one_thread():
    """Tiny convolutions run fastest (and reproducibly) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_bench(path: Path, pairs: int = 12) -> Path:
    """Flipped copies of smooth textures (two categories): a fresh network matches them badly."""
    photos = path / "photos"
    for cat, seeds in (("cat", (0, 1, 2)), ("dog", (10, 11, 12))):
        (photos / cat).mkdir(parents=True)
        for s in seeds:
            smooth_texture((64, 64), seed=s).save(photos / cat / f"t{s}.png")
    bench = path / "bench"
    make_synthetic(bench, [photos], pairs=pairs, seed=0, kinds=["flip"], ext="png", points=12)
    return bench


# ------------------------------------------------------------------------- loss and rounding


def test_loss_equals_the_written_out_computation():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(16, 5, 7, generator=g, requires_grad=True)
    tgt = torch.randn(16, 5, 7, generator=g, requires_grad=True)
    src_idx = torch.tensor([0, 3, 34, 12, 12])
    tgt_idx = torch.tensor([5, 5, 20, 33, 0])
    loss = correspondence_loss(src, tgt, src_idx, tgt_idx, temperature=0.07)
    # compute_clip_loss: full cosine matrices (flatten to [HW, C], divide by the norm)
    a = src.reshape(16, -1).T
    b = tgt.reshape(16, -1).T
    a = a / torch.linalg.norm(a, dim=-1, keepdim=True)
    b = b / torch.linalg.norm(b, dim=-1, keepdim=True)
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    source_logits = scale * (a @ b.T)
    target_logits = scale * (b @ a.T)
    expected = (
        F.cross_entropy(source_logits[src_idx], tgt_idx)
        + F.cross_entropy(target_logits[tgt_idx], src_idx)
    ) / 2
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss, (src, tgt))
    want = torch.autograd.grad(expected, (src, tgt))
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


def official_idxs(points_xy, image_size, load_size=(64, 64)) -> np.ndarray:
    """load_image_pair's rescale_points + points_to_idxs of train_hyperfeatures.py, verbatim
    in behaviour: (y, x) order, scale by new / old, clip, np.round, load_size[1] * y + x."""
    pts = np.flip(np.asarray(points_xy, dtype=np.float64), 1)
    x_scale = load_size[0] / image_size[0]
    y_scale = load_size[1] / image_size[1]
    pts = np.multiply(pts, np.array([y_scale, x_scale]))
    y = np.clip(pts[:, 0], 0, load_size[1] - 1)
    x = np.clip(pts[:, 1], 0, load_size[0] - 1)
    return load_size[1] * np.round(y) + np.round(x)


def test_keypoint_rounding_matches_the_official_formula():
    points = [
        [1, 0],  # x -> 0.5: half to even -> 0
        [3, 5],  # (1.5, 2.5) -> (2, 2)
        [127, 127],  # 63.5 -> clipped to 63
        [-3, 10],  # x clipped to 0, y 5
        [64, 300],  # y far outside -> 63
        [10, 21],  # (5, 10.5) -> (5, 10)
    ]
    got = cells_scale(np.array(points), (128, 128), (64, 64))
    assert got.tolist() == [0, 64 * 2 + 2, 64 * 63 + 63, 64 * 5, 64 * 63 + 32, 64 * 10 + 5]
    assert got.tolist() == official_idxs(points, (128, 128)).astype(int).tolist()
    rng = np.random.default_rng(0)  # SPair-like sizes and keypoints, anywhere in the image
    for size in [(500, 375), (333, 500), (64, 64)]:
        pts = np.stack([rng.integers(-5, size[0] + 5, 50), rng.integers(-5, size[1] + 5, 50)], 1)
        assert cells_scale(pts, size, (64, 64)).tolist() == official_idxs(pts, size).tolist()
    # the pixel-centre alternative: q = (p + 0.5) * grid / image - 0.5, then clip and round
    transform = ImageTransform.resize((128, 128), (64, 64))
    got = cells_centres(np.array([[12, 36], [3, 5], [127, 0]]), transform, (16, 16))
    # (12.5 / 8 - 0.5, 36.5 / 8 - 0.5) = (1.0625, 4.0625); (-0.0625, 0.1875) -> 0; (15.4375, 0)
    assert got.tolist() == [16 * 4 + 1, 0, 15]


def test_pair_order_is_the_official_permutation():
    anns = [{"id": i} for i in range(50)]
    np.random.seed(0)
    official = [a["id"] for a in np.random.permutation(anns)[:20]]
    assert pair_order(50, 20, 0).tolist() == official
    rng = np.random.RandomState(3)  # fewer pairs than steps: further draws are appended
    expected = np.concatenate([rng.permutation(7) for _ in range(3)])[:20]
    assert pair_order(7, 20, 3).tolist() == expected.tolist()


# ------------------------------------------------------------------------- the test extractor


class TestMultiColorBlurConformance(ExtractorConformance):
    def make_extractor(self):
        return MultiColorBlurExtractor(MultiColorBlurOptions(layers=3, timesteps=[0, 50, 200]))


def test_multi_color_blur_with_one_layer_and_timestep_is_the_plain_extractor():
    images = [as_input(smooth_texture((80, 60), seed=1))]
    (plain,) = ColorBlurExtractor().extract(images)
    (multi,) = MultiColorBlurExtractor(MultiColorBlurOptions(layers=1, timesteps=[0])).extract(
        images
    )
    assert list(multi.layers) == ["color"] and multi.timesteps == plain.timesteps == (0,)
    torch.testing.assert_close(multi.layers["color"], plain.layers["color"], rtol=0, atol=0)
    (two,) = MultiColorBlurExtractor().extract(images)  # color + color1 at stride 2, t 0 and 100
    assert {k: tuple(v.shape) for k, v in two.layers.items()} == {
        "color": (2, 9, 64, 64),
        "color1": (2, 9, 32, 32),
    }
    torch.testing.assert_close(two.layers["color"][0], plain.layers["color"][0])
    assert not torch.allclose(two.layers["color"][1], plain.layers["color"][0])


# ------------------------------------------------------------------------- config


def test_train_table_overrides_and_validation(tmp_path, manager):
    path = tmp_path / "pipe.toml"
    path.write_text(to_toml({**CONFIG, "train": {"steps": 7, "lr": 0.01}}))
    cfg = load_config(path, ["train.steps=100", "train.point_rounding=centres"], manager=manager)
    assert cfg.train == {"steps": 100, "lr": 0.01, "point_rounding": "centres"}
    assert cfg.resolved()["train"] == cfg.train
    options = train_options(cfg.train, str(path))
    assert (options.steps, options.lr, options.point_rounding) == (100, 0.01, "centres")
    assert options.val_every == 1000 and options.seed == 0  # defaults
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg.resolved()))
    assert load_config(again, manager=manager).digest() == cfg.digest()
    plain = parse_config(CONFIG, manager=manager)
    assert plain.train is None and "train" not in plain.resolved()
    with pytest.raises(ConfigError) as err:
        train_options({"step": 3}, str(path))
    msg = str(err.value)
    assert "'step'" in msg and "did you mean 'steps'" in msg and "val_every" in msg
    assert str(path) in msg and "[train]" in msg
    with pytest.raises(ConfigError, match="point_rounding"):
        train_options({"point_rounding": "floor"}, "x.toml")
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        parse_config({**CONFIG, "train": 3}, manager=manager)
    fixed = Pipeline.from_dict({"extractor": CONFIG["extractor"]}, manager=manager, store=None)
    with pytest.raises(ConfigError, match='has nothing to train; use plugin = "hyperfeatures"'):
        trainable_aggregator(fixed)


# ------------------------------------------------------------------------- training in process


def test_training_lowers_the_loss_and_raises_pck(manager, tmp_path, one_thread):
    bench = make_bench(tmp_path)
    dataset = Synthetic(SPairOptions(root=str(bench)))
    pairs = list(dataset.pairs())
    store = tmp_path / "feats.zarr"
    out = tmp_path / "agg.safetensors"
    # the config names the network it will be evaluated with: this run's output, so the
    # training starts from a fresh network instead of loading it
    named = {**CONFIG, "aggregator": {**SMALL_NET, "checkpoint": str(out)}}
    pipe = Pipeline.from_dict(named, manager=manager, store=store)
    options = TrainOptions(steps=200, lr=3e-3, val_every=100, checkpoint_every=0, workers=0)
    report = train(pipe, pairs, pairs, options, out)
    # 6 sources + 12 flipped targets, of which pairs k and k + 6 share pixels (one key)
    assert report.images == 18 and report.extracted == 12
    losses = np.asarray(report.losses)
    assert len(losses) == 200 and losses[-20:].mean() < 0.5 * losses[:20].mean()
    assert [h["step"] for h in report.history] == [100, 200] and report.metric == "pck_bbox"

    def pck(checkpoint: str) -> float:
        agg = {**SMALL_NET, "checkpoint": checkpoint}
        p = Pipeline.from_dict({**CONFIG, "aggregator": agg}, manager=manager, store=store)
        ev = evaluate(p, dataset, dataset_name="synthetic", protocol=get_protocol("hyperfeatures"))
        return ev.summaries["bbox-target"]["by_alpha"]["0.1"]["per_point"]

    before, after = pck(""), pck(str(out))
    assert before < 0.5 and after > before + 0.3, (before, after)
    # the best checkpoint is the validated step with the highest PCK, and reloads to it
    best = max(report.history, key=lambda h: h["pck_bbox"])
    assert report.best["step"] == best["step"] and after == pytest.approx(best["pck_bbox"])
    meta = load_checkpoint(out).extra["train"]
    assert meta["step"] == best["step"] and meta["kind"] == "best"
    last = load_checkpoint(report.last)
    assert last.extra["train"]["step"] == 200 and any(k.startswith("adamw.") for k in last.tensors)


# ------------------------------------------------------------------------- the real CLI

TOML = """
[extractor]
plugin = "color-blur-multi"
image_size = [64, 64]

[aggregator]
plugin = "hyperfeatures"
projection_dim = 32
norm_groups = 8
size = [16, 16]
device = "cpu"

[train]
steps = 200
lr = 3e-3
val_every = 100
checkpoint_every = 20
workers = 1
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A bench, a config, an environment whose ``diffeat`` finds the test extractors (an
    entry point in a folder on PYTHONPATH), and a store filled by ``extract --dataset``."""
    root = tmp_path_factory.mktemp("train-cli")
    site = root / "site"
    (site / "diffeat_trainplug-0.0.dist-info").mkdir(parents=True)
    (site / "diffeat_trainplug.py").write_text(
        "from diffeat.testing import TestPlugin\n\nplugin = TestPlugin()\n"
    )
    dist = site / "diffeat_trainplug-0.0.dist-info"
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: diffeat-trainplug\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[diffeat]\ntesting = diffeat_trainplug:plugin\n")
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    env = cli_env(PYTHONPATH=path, OMP_NUM_THREADS="1")
    config = root / "pipe.toml"
    config.write_text(TOML)
    bench = make_bench(root)
    store = root / "feats.zarr"
    args = ["--dataset", "synthetic", "--root", bench, "--split", "test"]
    proc = run("-q", "extract", config, *args, "--store", store, "--json", env=env)
    return {
        "root": root,
        "env": env,
        "config": config,
        "bench": bench,
        "store": store,
        "data": args,
        "extract": json.loads(proc.stdout),
    }


@pytest.mark.slow
def test_cli_extract_dataset_stores_every_image(cli):
    report = cli["extract"]
    images = sorted((cli["bench"] / "JPEGImages").rglob("*.png"))
    assert report["images"] == len(images) == 18 and report["failed"] == []
    assert (report["computed"], report["cached"]) == (12, 6)  # same flip of the same source
    store = FeatureStore(cli["store"], mode="r")
    keys = {as_input(p).key for p in images}
    assert len(keys) == 12 and set(store.entries(report["cache_key"])) == keys
    proc = run("extract", cli["config"], cli["bench"], "--store", cli["store"], "--dataset",
               "synthetic", "--root", cli["bench"], env=cli["env"], check=2)  # fmt: skip
    assert "not both" in proc.stderr and "Traceback" not in proc.stderr


def _train_args(cli, out: Path, *extra) -> list:
    return [
        "train", cli["config"], *cli["data"], "--val-split", "test",
        "--store", cli["store"], "--out", out, "--no-extract", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_train_killed_and_resumed_equals_an_uninterrupted_run(cli):
    env = cli["env"]
    straight = cli["root"] / "straight" / "agg.safetensors"
    full = json.loads(run("-q", *_train_args(cli, straight), "--json", env=env).stdout)
    assert full["start_step"] == 0 and full["steps"] == 200 and full["images"] == 18
    assert [h["step"] for h in full["history"]] == [100, 200]  # workers = 1: spawned reader

    out = cli["root"] / "killed" / "agg.safetensors"
    last = out.with_name("agg.last.safetensors")
    proc = subprocess.Popen(
        [DIFFEAT, "-q", *map(str, _train_args(cli, out, "--set", "train.workers=0"))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # kill once the first checkpoint is written, however long that takes
    wait_until(last.exists, f"{last.name} written", proc=proc)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run("-q", *_train_args(cli, out), "--json", env=env)
    assert "resuming from step" in resumed.stderr
    step = int(resumed.stderr.split("resuming from step")[1].split()[0])
    report = json.loads(resumed.stdout)
    assert 20 <= step < 200 and report["start_step"] == step and report["resumed"]

    for a, b in ((straight, out), (straight.with_name(last.name), last)):
        ca, cb = load_checkpoint(a), load_checkpoint(b)
        assert set(ca.state_dict) == set(cb.state_dict) and set(ca.tensors) == set(cb.tensors)
        for key in ca.state_dict:
            torch.testing.assert_close(ca.state_dict[key], cb.state_dict[key])
        for key in ca.tensors:  # AdamW state (only in the resume state)
            torch.testing.assert_close(ca.tensors[key], cb.tensors[key])
    assert report["history"] == full["history"] and report["best"] == full["best"]

    # the same --out with another [train] option: refused, naming the file and the way out
    proc = run(*_train_args(cli, out, "--set", "train.lr=0.01"), env=env, check=2)
    assert str(last) in proc.stderr and "--restart" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_train_no_extract_with_an_empty_store(cli, tmp_path):
    empty = tmp_path / "empty.zarr"
    args = _train_args(cli, tmp_path / "agg.safetensors")
    args[args.index(cli["store"])] = empty
    proc = run(*args, env=cli["env"], check=2)
    assert "18 of 18 images" in proc.stderr and "and 13 more" in proc.stderr
    assert f"diffeat extract {cli['config']} --dataset synthetic" in proc.stderr
    assert f"--store {empty}" in proc.stderr and "Traceback" not in proc.stderr


def test_scale_rounding_applies_a_padding_transform():
    from diffeat.core.geometry import ImageTransform
    from diffeat.train.loss import cells_scale

    # 500 x 250 fitted into 512 x 512: scale 1.024, 128 rows of padding above; grid 64
    pad = ImageTransform((500, 250), (512, 512), (512 / 500, 256 / 250), (0.0, 128.0))
    (idx,) = cells_scale(np.array([[0.0, 0.0]]), (500, 250), (64, 64), pad)
    assert divmod(int(idx), 64) == (16, 0)
    squash = ImageTransform.resize((500, 250), (512, 512))
    (plain,) = cells_scale(np.array([[250.0, 125.0]]), (500, 250), (64, 64), squash)
    assert divmod(int(plain), 64) == (32, 32)


def test_a_missing_configured_checkpoint_means_a_fresh_start(tmp_path):
    from diffeat.core.config import parse_config
    from diffeat.train.loop import training_stage

    cfg = parse_config(
        {
            "extractor": {"plugin": "stable-diffusion"},
            "aggregator": {"plugin": "hyperfeatures", "checkpoint": str(tmp_path / "preset.st")},
        }
    )
    stage, fresh = training_stage(cfg.aggregator, tmp_path / "other.safetensors")
    assert fresh and stage.options.checkpoint == ""
    (tmp_path / "preset.st").write_bytes(b"x")
    stage, fresh = training_stage(cfg.aggregator, tmp_path / "other.safetensors")
    assert not fresh and stage.options.checkpoint == str(tmp_path / "preset.st")
