"""Killing a real extraction process (SIGKILL) and rerunning finishes the job."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch
from clihelp import DIFFEAT, cli_env, run_json
from waiting import wait_until

from diffeat.core.pipeline import Pipeline
from diffeat.store import FeatureStore
from diffeat.testing import smooth_texture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_then_resume(tiny_sd, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        f'[extractor]\nplugin = "stable-diffusion"\nmodel = "{tiny_sd}"\nimage_size = [128, 128]\n'
        'layers = ["up_blocks.*.resnets.*.conv2"]\ntimesteps = [10, 300]\nensemble_size = 4\n'
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    n = 24
    for i in range(n):
        smooth_texture((64, 48), seed=100 + i).save(photos / f"{i:02d}.png")
    store_path = tmp_path / "feats.zarr"
    proc = subprocess.Popen(
        [DIFFEAT, "--quiet", "extract", str(cfg), str(photos), "--store", str(store_path)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def complete_entries() -> int:
        if not store_path.exists():
            return 0
        try:
            store = FeatureStore(store_path, mode="r")
            keys = list(store.extractors())
            return len(store.entries(keys[0])) if keys else 0
        except Exception:  # the store is being created
            return 0

    # kill once 3 entries are complete, however long that takes on a loaded machine
    wait_until(lambda: complete_entries() >= 3, "3 complete entries", proc=proc, poll_s=0.05)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = FeatureStore(store_path, mode="r")
    (key,) = store.extractors()
    finished = set(store.entries(key))
    assert 3 <= len(finished) < n

    report = run_json("--quiet", "extract", cfg, photos, "--store", store_path)
    assert report["cached"] == len(finished)
    assert report["computed"] == n - len(finished)
    store = FeatureStore(store_path, mode="r")
    assert len(store.entries(key)) == n

    # every stored entry, before and after the kill, equals a fresh extraction
    pipe = Pipeline.from_file(cfg)
    images = sorted(photos.iterdir())
    fresh = pipe.features([images[0], images[-1]])
    from diffeat.core.images import as_input

    for path, fs in zip([images[0], images[-1]], fresh):
        stored = store.get(key, as_input(path).key)
        for name, tensor in fs.layers.items():
            torch.testing.assert_close(stored.layers[name], tensor, atol=2e-3, rtol=2e-3)
