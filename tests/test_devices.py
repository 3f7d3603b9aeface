"""Device names: a device this machine lacks is a message naming the ones it has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clihelp import run
from PIL import Image

from diffeat.core import devices
from diffeat.core.devices import available_devices, pick_device
from diffeat.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_and_auto():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" cpu ") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert available_devices()[0] == "cpu"


@pytest.mark.parametrize("name", ["cdua", "gpu0", "cuda:x", ""])
def test_a_typo_names_the_devices(name):
    with pytest.raises(ConfigError) as err:
        pick_device(name)
    message = str(err.value)
    assert repr(name) in message and "is not a torch device name" in message
    assert "this machine has: cpu" in message and "--device" in message and "'auto'" in message


def test_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:7"):
        with pytest.raises(ConfigError, match=r"needs a CUDA GPU.*this machine has: cpu"):
            pick_device(name)


def test_cuda_index_past_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]
    assert pick_device("cuda:1") == torch.device("cuda:1")
    assert pick_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError) as err:
        pick_device("cuda:7")
    assert "'cuda:7' is not here: torch sees 2 CUDA GPUs" in str(err.value)
    assert "cpu, cuda:0, cuda:1" in str(err.value)


def test_mps_unavailable(monkeypatch):
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match="Metal"):
        pick_device("mps")


def test_other_device_types_are_probed(monkeypatch):
    assert pick_device("meta") == torch.device("meta")
    monkeypatch.setattr(devices, "_probe", lambda device: False)
    with pytest.raises(ConfigError, match="'xpu' cannot be used on this machine"):
        pick_device("xpu")


@pytest.mark.parametrize("device", ["cdua", "cuda:7"])
def test_cli_device_error_is_a_message(tmp_path, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(image)
    proc = run(
        "extract",
        ROOT / "examples" / "dift-sd21.toml",
        image,
        "--store",
        tmp_path / "s",
        "--device",
        device,
        check=None,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"device {device!r}" in proc.stderr and "this machine has: cpu" in proc.stderr
