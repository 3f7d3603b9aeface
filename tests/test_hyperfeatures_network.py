"""The hyperfeatures aggregation network, its checkpoints, the aggregator and the plot command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from clihelp import run, run_json
from safetensors.torch import save_file

from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.features import FeatureSet
from diffeat.core.geometry import ImageTransform
from diffeat.core.pipeline import Pipeline
from diffeat.plugins.hyperfeatures import (
    FORMAT,
    AggregationNetwork,
    Hyperfeatures,
    load_checkpoint,
    network_from_checkpoint,
    save_checkpoint,
)
from diffeat.plugins.hyperfeatures.plot import plot_mixing_weights
from diffeat.testing import smooth_texture

# (name, channels, (h, w)); "b" has as many channels as the projection: identity shortcut
LAYERS = [("a", 12, (4, 4)), ("b", 32, (8, 8)), ("c", 20, (6, 10))]
TIMESTEPS = [-1, 100, 500]
SMALL = {"projection_dim": 32, "norm_groups": 8, "size": (12, 10)}


def _net(**kw) -> AggregationNetwork:
    torch.manual_seed(0)
    net = AggregationNetwork([(n, c) for n, c, _ in LAYERS], TIMESTEPS, **{**SMALL, **kw})
    with torch.no_grad():
        net.mixing_weights.copy_(torch.randn(net.mixing_weights.shape) * 2)
    return net


def _maps(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, len(TIMESTEPS), c, h, w, generator=g) for n, c, (h, w) in LAYERS}


def _gn(x: torch.Tensor, conv: torch.nn.Module, groups: int) -> torch.Tensor:
    return F.group_norm(x, groups, conv.norm.weight, conv.norm.bias, eps=1e-5)


def _block_written_out(x: torch.Tensor, block: torch.nn.Module, groups: int) -> torch.Tensor:
    h = F.relu(_gn(F.conv2d(x, block.conv1.weight), block.conv1, groups))
    h = F.relu(_gn(F.conv2d(h, block.conv2.weight, padding=1), block.conv2, groups))
    h = _gn(F.conv2d(h, block.conv3.weight), block.conv3, groups)
    if block.shortcut is None:
        s = x
    else:
        s = _gn(F.conv2d(x, block.shortcut.weight), block.shortcut, groups)
    return F.relu(h + s)


def test_forward_equals_written_out_computation():
    net = _net()
    maps = _maps()
    weights = torch.softmax(net.mixing_weights.detach(), dim=0)
    assert weights.std() > 0.05  # non-uniform mixing weights
    n_layers = len(LAYERS)
    expected = 0
    for i in range(len(TIMESTEPS) * n_layers):
        layer, step = i % n_layers, i // n_layers  # timestep-major
        x = maps[LAYERS[layer][0]][:, step]
        x = F.interpolate(x, size=(10, 12), mode="bilinear", align_corners=False)
        block = net.bottleneck_layers[layer][0]
        expected = expected + weights[i] * _block_written_out(x, block, 8)
    with torch.no_grad():
        out = net(maps)
    assert out.shape == (2, 32, 10, 12)
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
    grid = net.mixing_weight_grid()
    assert grid.shape == (3, 3)
    torch.testing.assert_close(grid[1, 2], weights[2 * n_layers + 1])  # layer 1, timestep 2


def test_forward_refuses_mismatched_inputs():
    net = _net()
    maps = _maps()
    with pytest.raises(ValueError, match="layer 'c' is missing"):
        net({k: v for k, v in maps.items() if k != "c"})
    with pytest.raises(ValueError, match="layer 'a' has 5 channels"):
        net({**maps, "a": torch.randn(2, 3, 5, 4, 4)})
    with pytest.raises(ValueError, match="layer 'b' has 2 timesteps"):
        net({**maps, "b": torch.randn(2, 2, 32, 8, 8)})


def test_official_key_names():
    keys = set(_net().state_dict())
    per_conv = ["weight", "norm.weight", "norm.bias"]
    expected = {"mixing_weights"}
    for i, convs in enumerate(
        [
            ("conv1", "conv2", "conv3", "shortcut"),
            ("conv1", "conv2", "conv3"),
            ("conv1", "conv2", "conv3", "shortcut"),
        ]
    ):
        expected |= {f"bottleneck_layers.{i}.0.{conv}.{p}" for conv in convs for p in per_conv}
    assert keys == expected
    assert _net().mixing_weights.shape == (len(TIMESTEPS) * len(LAYERS),)


def test_init_statistics():
    torch.manual_seed(0)
    net = AggregationNetwork([("up", 640)], [0, 1])
    block = net.bottleneck_layers[0][0]
    for conv in (block.conv1, block.conv2, block.conv3, block.shortcut):
        w = conv.weight
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        assert conv.bias is None
        assert abs(w.std().item() / math.sqrt(2.0 / fan_out) - 1) < 0.05, conv
        assert abs(w.mean().item()) < 0.01
        assert torch.equal(conv.norm.weight, torch.ones_like(conv.norm.weight))
        assert torch.equal(conv.norm.bias, torch.zeros_like(conv.norm.bias))
        assert conv.norm.num_groups == 32
    assert block.conv1.weight.shape == (96, 640, 1, 1)
    assert block.conv2.weight.shape == (96, 96, 3, 3)
    assert torch.equal(net.mixing_weights.detach(), torch.ones(2))
    desc = net.describe()
    assert desc == {
        "format": FORMAT,
        "layers": [{"name": "up", "channels": 640}],
        "timesteps": [0, 1],
        "projection_dim": 384,
        "norm_groups": 32,
        "size": [64, 64],
    }
    json.dumps(desc)
    assert AggregationNetwork.from_description(desc).describe() == desc


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    net = _net()
    path = tmp_path / "agg.safetensors"
    save_checkpoint(path, net, extra={"epoch": 3}, tensors={"optimizer.step": torch.tensor([7.0])})
    assert [p.name for p in tmp_path.iterdir()] == ["agg.safetensors"]  # no temp file left
    ckpt = load_checkpoint(path)
    assert ckpt.network == net.describe()
    assert ckpt.extra == {"epoch": 3}
    assert torch.equal(ckpt.tensors["optimizer.step"], torch.tensor([7.0]))
    assert set(ckpt.state_dict) == set(net.state_dict())
    loaded = network_from_checkpoint(ckpt)
    maps = _maps()
    with torch.no_grad():
        assert torch.equal(loaded(maps), net(maps))


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "agg.safetensors", _net())
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DiffeatError, match=r"missing\.safetensors does not exist.*diffeat train"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04 this is a pickle, honestly")
    with pytest.raises(DiffeatError, match="not a diffeat hyperfeatures checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(DiffeatError, match="not a diffeat hyperfeatures checkpoint.*metadata"):
        load_checkpoint(plain)
    future = tmp_path / "future.safetensors"
    desc = {**_net().describe(), "format": "diffeat-hyperfeatures/9"}
    save_file({"x": torch.zeros(2)}, future, metadata={"diffeat": json.dumps({"network": desc})})
    with pytest.raises(DiffeatError, match="format 'diffeat-hyperfeatures/9'"):
        load_checkpoint(future)


# -- the aggregator ------------------------------------------------------------------------------


def _features(channels: int = 6, timesteps=(0,), size=(16, 16), seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    layer = torch.randn(len(timesteps), channels, size[1], size[0], generator=g)
    meta = {"transform": ImageTransform.resize((64, 64), (64, 64)).to_dict()}
    return FeatureSet({"color": layer}, timesteps, meta)


def _aggregator(**kw) -> Hyperfeatures:
    return Hyperfeatures(
        Hyperfeatures.Options(projection_dim=32, norm_groups=8, device="cpu", **kw)
    )


def test_aggregator_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = _aggregator(seed=3), _aggregator(seed=3)
    fs = _features()
    assert a.network is None
    out = a(fs)
    assert out.shape == (32, 64, 64) and out.dtype == torch.float32
    assert torch.equal(out, b(fs))
    assert not torch.equal(out, _aggregator(seed=4)(fs))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_forward_features_has_gradients():
    agg = _aggregator()
    out = agg.forward_features([_features(seed=0), _features(seed=1, size=(8, 8))])
    assert out.shape == (2, 32, 64, 64) and out.requires_grad
    out.sum().backward()
    assert agg.network.mixing_weights.grad is not None
    torch.testing.assert_close(out[1].detach(), agg(_features(seed=1, size=(8, 8))))


def test_aggregator_checkpoint_and_mismatch_refusal(tmp_path):
    agg = _aggregator(seed=5)
    fs = _features(timesteps=(-1, 50))
    expected = agg(fs)
    path = tmp_path / "aggnet.safetensors"
    agg.save(path, extra={"note": "test"})
    loaded = _aggregator(checkpoint=str(path))
    torch.testing.assert_close(loaded(fs), expected, atol=0, rtol=0)
    with pytest.raises(ConfigError) as wrong_layers:
        _aggregator(checkpoint=str(path))(_features(channels=9, timesteps=(-1, 50)))
    msg = str(wrong_layers.value)
    assert "aggnet.safetensors was trained on layers [color (6 ch)]" in msg
    assert "these features have layers [color (9 ch)]" in msg and "diffeat train" in msg
    with pytest.raises(ConfigError, match=r"at timesteps \[-1, 50\]; .* at timesteps \[0\]"):
        _aggregator(checkpoint=str(path))(_features(timesteps=(0,)))


def test_options_are_validated(manager):
    data = {
        "extractor": {"plugin": "color-blur"},
        "aggregator": {"plugin": "hyperfeatures", "projection_dim": 30},
    }
    with pytest.raises(ConfigError, match="multiple of 4 \\* norm_groups"):
        Pipeline.from_dict(data, manager=manager)


def test_aggregator_through_a_pipeline(manager):
    data = {
        "extractor": {"plugin": "color-blur", "image_size": [32, 32], "sigmas": [0.0, 2.0]},
        "aggregator": {
            "plugin": "hyperfeatures",
            "projection_dim": 32,
            "norm_groups": 8,
            "device": "cpu",
        },
        "matcher": {"plugin": "nearest"},
    }
    pipe = Pipeline.from_dict(data, manager=manager)
    img = smooth_texture((48, 40), seed=3)
    src, _ = pipe.views(img, img)
    assert src.descriptors.shape == (32, 64, 64)
    res = pipe.match(img, img, [(20.0, 18.0)])
    assert res.points.shape == (1, 2)


# -- the plot ------------------------------------------------------------------------------------


def test_plot_function_writes_a_png(tmp_path):
    out = plot_mixing_weights(_net(), tmp_path / "w.png", title="mix")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command(tmp_path):
    path = tmp_path / "agg.safetensors"
    save_checkpoint(path, _net())
    png = tmp_path / "plots" / "mix.png"
    table = run_json("plot", "mixing-weights", path, "--out", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table["layers"] == ["a", "b", "c"] and table["timesteps"] == TIMESTEPS
    grid = table["weights"]
    assert len(grid) == 3 and all(len(row) == 3 for row in grid)
    assert abs(sum(map(sum, grid)) - 1) < 1e-5
    text = run("plot", "mixing-weights", path, "--out", png).stdout
    assert "wrote" in text and "timesteps" in text


def test_plot_command_on_a_missing_checkpoint(tmp_path):
    proc = run(
        "plot",
        "mixing-weights",
        tmp_path / "nope.safetensors",
        "--out",
        tmp_path / "x.png",
        check=2,
    )
    assert "nope.safetensors does not exist" in proc.stderr and "diffeat train" in proc.stderr
    assert "Traceback" not in proc.stderr
