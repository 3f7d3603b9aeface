"""A third party's trainable aggregator trains with ``diffeat.train`` unchanged.

The aggregator below is not hyperfeatures: a 1x1 convolution over every layer
and timestep concatenated, with its own checkpoint format and its own name for
the option naming the checkpoint (``start``). It is registered the way any
plugin registers, and training writes, resumes and reloads its checkpoints
through the :class:`~diffeat.core.components.TrainableAggregator` capability
alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_train import make_bench

from diffeat.core.components import (
    Aggregator,
    TrainableAggregator,
    TrainingCheckpoint,
    is_trainable,
)
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.features import FeatureSet
from diffeat.core.hookspecs import hookimpl
from diffeat.core.options import opt
from diffeat.core.pipeline import Pipeline
from diffeat.plugins.datasets.spair import SPairOptions
from diffeat.plugins.datasets.synthetic import Synthetic
from diffeat.train.loop import train, training_stage
from diffeat.train.options import TrainOptions

GRID = (16, 16)


@dataclass
class MixOptions:
    start: str = opt("", "checkpoint to start from; empty: a fresh network from seed")
    channels: int = opt(16, "descriptor channels")
    seed: int = opt(0, "initialisation seed")


class MixNet(torch.nn.Module):
    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Mix1x1(Aggregator):
    """Every layer and timestep resized to one grid, concatenated, then a 1x1 convolution."""

    Options = MixOptions
    checkpoint_option = "start"

    def __init__(self, options: MixOptions | None = None) -> None:
        self.options = options or MixOptions()
        self.device = torch.device("cpu")
        self.network: MixNet | None = None

    def network_for(
        self, layers: Sequence[tuple[str, int]], timesteps: Sequence[int]
    ) -> torch.nn.Module:
        if self.network is None:
            in_channels = sum(c for _, c in layers) * len(timesteps)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.options.seed)
                network = MixNet(in_channels, self.options.channels)
            if self.options.start:
                network.load_state_dict(self.read_checkpoint(self.options.start).state_dict)
            self.network = network.to(self.device)
        return self.network

    def _inputs(self, fs: FeatureSet) -> torch.Tensor:
        maps = []
        for t in fs.layers.values():
            flat = t.to(self.device, torch.float32).reshape(1, -1, *t.shape[-2:])
            maps.append(torch.nn.functional.interpolate(flat, size=GRID, mode="bilinear"))
        return torch.cat(maps, dim=1)

    def forward_features(self, batch: Sequence[FeatureSet]) -> torch.Tensor:
        first = batch[0]
        layers = [(name, int(t.shape[1])) for name, t in first.layers.items()]
        network = self.network_for(layers, list(first.timesteps))
        return network(torch.cat([self._inputs(fs) for fs in batch]))

    def __call__(self, features: FeatureSet) -> torch.Tensor:
        with torch.no_grad():
            return self.forward_features([features])[0].cpu()

    def save(
        self,
        path: str | os.PathLike[str],
        extra: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        from safetensors.torch import save_file

        assert self.network is not None
        data = {
            f"net.{k}": v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()
        }
        data.update(
            {f"more.{k}": v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(data, str(path), metadata={"mix-1x1": json.dumps(extra or {})})
        return Path(path)

    def read_checkpoint(self, path: str | os.PathLike[str]) -> TrainingCheckpoint:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = (f.metadata() or {}).get("mix-1x1")
            if meta is None:
                raise DiffeatError(f"{path} is not a mix-1x1 checkpoint")
            data = {key: f.get_tensor(key) for key in f.keys()}
        return TrainingCheckpoint(
            {k[4:]: v for k, v in data.items() if k.startswith("net.")},
            {k[5:]: v for k, v in data.items() if k.startswith("more.")},
            json.loads(meta),
        )


class MixPlugin:
    @hookimpl
    def register_aggregators(self, register: Any) -> None:
        register("mix-1x1", Mix1x1)


@pytest.fixture
def mix_manager(manager):
    manager.add_plugin(MixPlugin(), "third-party-mix")
    return manager


def _pipeline(manager, store: Path, start: str = "") -> Pipeline:
    config = {
        "extractor": {"plugin": "color-blur-multi", "image_size": [64, 64]},
        "aggregator": {"plugin": "mix-1x1", "start": start},
    }
    return Pipeline.from_dict(config, manager=manager, store=store)


def test_the_third_party_aggregator_declares_the_capability():
    assert is_trainable(Mix1x1())
    assert isinstance(Mix1x1(), TrainableAggregator)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_third_party_aggregator_trains_writes_and_resumes(mix_manager, tmp_path, one_thread):
    bench = make_bench(tmp_path)
    pairs = list(Synthetic(SPairOptions(root=str(bench))).pairs())
    store = tmp_path / "feats.zarr"
    options = TrainOptions(steps=40, lr=1e-2, val_every=20, checkpoint_every=10, workers=0)

    straight = tmp_path / "straight" / "mix.safetensors"
    notes: list[str] = []
    # the configured checkpoint (its own option name) is this run's output: a fresh start
    pipe = _pipeline(mix_manager, store, start=str(straight))
    full = train(pipe, pairs, pairs, options, straight, log=notes.append)
    assert any("training a fresh network (seed 0)" in n for n in notes), notes
    assert [h["step"] for h in full.history] == [20, 40] and full.metric == "pck_bbox"
    losses = np.asarray(full.losses)
    assert len(losses) == 40 and losses[-10:].mean() < losses[:10].mean()
    reader = Mix1x1()
    best = reader.read_checkpoint(straight)
    assert (
        best.extra["train"]["kind"] == "best" and best.extra["train"]["step"] == full.best["step"]
    )
    last = reader.read_checkpoint(full.last)
    assert last.extra["train"]["kind"] == "resume-state" and last.extra["train"]["step"] == 40
    assert any(k.startswith("adamw.") for k in last.tensors)

    # stopped at step 20, then continued to 40: the weights of the uninterrupted run
    out = tmp_path / "resumed" / "mix.safetensors"
    half = train(
        _pipeline(mix_manager, store), pairs, pairs, dataclasses.replace(options, steps=20), out
    )
    assert half.start_step == 0 and [h["step"] for h in half.history] == [20]
    notes.clear()
    rest = train(_pipeline(mix_manager, store), pairs, pairs, options, out, log=notes.append)
    assert rest.start_step == 20 and any("resuming from step 20" in n for n in notes)
    assert rest.history == full.history and rest.losses == full.losses
    for a, b in ((straight, out), (full.last, rest.last)):
        ca, cb = reader.read_checkpoint(a), reader.read_checkpoint(b)
        assert set(ca.state_dict) == set(cb.state_dict) and set(ca.tensors) == set(cb.tensors)
        for key in ca.state_dict:
            torch.testing.assert_close(ca.state_dict[key], cb.state_dict[key], rtol=0, atol=0)
        for key in ca.tensors:
            torch.testing.assert_close(ca.tensors[key], cb.tensors[key], rtol=0, atol=0)

    # the trained network is the pipeline's when the config names it
    trained = _pipeline(mix_manager, store, start=str(straight))
    view = trained.view(pairs[0].source)
    assert tuple(view.descriptors.shape) == (16, *GRID)


def test_the_checkpoint_option_must_be_an_option(mix_manager, tmp_path):
    class Broken(Mix1x1):
        checkpoint_option = "weights"

    stage = _pipeline(mix_manager, tmp_path / "s.zarr").config.aggregator
    with pytest.raises(ConfigError, match="'weights'.*no such field.*start"):
        training_stage(stage, tmp_path / "out.safetensors", Broken())
    assert training_stage(stage, tmp_path / "out.safetensors")[1] is False  # start = ""
