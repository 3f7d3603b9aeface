"""Importing the official aggregation network's weights (state dict exported to safetensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clihelp import run, run_json
from safetensors.torch import save_file

from diffeat.core.features import FeatureSet
from diffeat.core.options import build_options
from diffeat.plugins.hyperfeatures.aggregator import Hyperfeatures
from diffeat.plugins.hyperfeatures.network import AggregationNetwork
from diffeat.plugins.hyperfeatures.official import official_layer_names

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "examples" / "hyperfeatures-sd15.toml"
TIMESTEPS = [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]
CHANNELS = [16] * 6 + [8] * 3 + [4] * 3  # small stand-ins for 1280 / 640 / 320


def official_like(path: Path) -> AggregationNetwork:
    """A network with the official layer order, its state dict saved as a plain safetensors file
    (what `safetensors.torch.save_file(torch.load(pt)["aggregation_network"], path)` gives)."""
    torch.manual_seed(0)
    net = AggregationNetwork(
        list(zip(official_layer_names(12), CHANNELS)), TIMESTEPS, projection_dim=32, norm_groups=8
    )
    with torch.no_grad():
        net.mixing_weights.copy_(torch.randn(len(TIMESTEPS) * 12))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net


def import_official(state: Path, out: Path, *overrides: str, check: int = 0):
    """``diffeat checkpoint import-official STATE --config PRESET --out OUT [--set ...]``."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return run(
        "checkpoint", "import-official", state, "--config", PRESET, "--out", out, *sets, check=check
    )


def test_imported_weights_give_the_official_networks_output(tmp_path):
    source = official_like(tmp_path / "official.safetensors")
    out = tmp_path / "aggnet.safetensors"
    proc = import_official(tmp_path / "official.safetensors", out, "aggregator.norm_groups=8")
    assert str(out) in proc.stdout
    options = build_options(
        Hyperfeatures, {"checkpoint": str(out), "norm_groups": 8, "device": "cpu"}, "test"
    )
    agg = Hyperfeatures(options)
    gen = torch.Generator().manual_seed(1)
    layers = {
        name: torch.randn(len(TIMESTEPS), c, 4, 4, generator=gen)
        for name, c in zip(official_layer_names(12), CHANNELS)
    }
    fs = FeatureSet(layers, tuple(TIMESTEPS), {})
    with torch.no_grad():
        expected = source.eval()({k: v[None] for k, v in layers.items()})[0]
    torch.testing.assert_close(agg(fs), expected)
    info = run_json("checkpoint", "info", out)
    assert info["source"] == "official" and info["network"]["timesteps"] == TIMESTEPS
    assert [d["channels"] for d in info["network"]["layers"]] == CHANNELS


@pytest.mark.parametrize(
    "override, message",
    [
        ("extractor.timesteps=[-1, 60]", "mixes 132 maps"),
        (
            "extractor.timesteps=[960, 860, 760, 660, 560, 460, 360, 260, 160, 60, -1]",
            "in that order",
        ),
        ('extractor.layers=["up_blocks.1"]', "official weights are for the layers"),
    ],
)
def test_mismatched_config_is_refused(tmp_path, override, message):
    official_like(tmp_path / "official.safetensors")
    proc = import_official(
        tmp_path / "official.safetensors", tmp_path / "x.safetensors", override, check=2
    )
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_not_a_state_dict(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"pickle, not safetensors")
    proc = import_official(bad, tmp_path / "x", check=2)
    assert "not a safetensors file" in proc.stderr
    save_file({"something": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    proc = import_official(tmp_path / "other.safetensors", tmp_path / "x", check=2)
    assert "official aggregation network" in proc.stderr
