"""One device near its limit: batches across images, workers, the bounded background writer,
the speed switches, and a run killed mid-write (through the real CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from clihelp import DIFFEAT, cli_env, run_json, tiny_dift_config
from waiting import HANG_GUARD_S, wait_until

from diffeat.cli.extract import WRITE_QUEUE_MB
from diffeat.core import sources
from diffeat.core.errors import StoreError
from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.core.pipeline import ExtractSettings, Pipeline
from diffeat.core.prefetch import DEFAULT_WRITE_QUEUE_MB
from diffeat.core.speed import compile_around
from diffeat.core.writer import BackgroundWriter
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.plugins.vit.dinov2 import Dinov2Extractor
from diffeat.store import FeatureStore
from diffeat.testing import smooth_texture

# -- the background writer --------------------------------------------------------------------


def test_writer_never_holds_more_than_its_bound_and_keeps_order():
    writer = BackgroundWriter(100)
    seen_at_start: list[int] = []
    done: list[int] = []

    def job(i: int) -> int:
        seen_at_start.append(writer.queued_bytes)
        time.sleep(0.01)
        done.append(i)
        return i * 10

    submitted_after: list[int] = []
    for i in range(12):
        writer.submit((i, f"img{i}"), 30, lambda i=i: job(i))
        submitted_after.append(len(done))
    results = writer.close()
    assert [r.value for r in results] == [i * 10 for i in range(12)]
    assert [r.tag for r in results] == [(i, f"img{i}") for i in range(12)]
    assert writer.peak_bytes == 90  # three 30-byte jobs fit under 100, a fourth never
    assert max(seen_at_start) <= 100
    assert submitted_after[-1] >= 12 - 3  # submit waited for the writer to make room
    assert writer.queued_bytes == 0


def test_writer_lets_an_oversized_job_in_alone():
    writer = BackgroundWriter(100)
    gate = threading.Event()
    writer.submit(0, 10, gate.wait)
    blocked = threading.Thread(target=writer.submit, args=(1, 500, lambda: "big"))
    blocked.start()
    time.sleep(0.05)
    assert blocked.is_alive()  # 10 + 500 > 100: waits until the queue is empty
    gate.set()
    blocked.join(HANG_GUARD_S)  # a hang guard: it ends once the gate opens
    assert [r.value for r in writer.close()] == [True, "big"]
    assert writer.peak_bytes == 500


def test_writer_errors_come_back_to_the_caller_and_later_jobs_still_run():
    def fail() -> None:
        raise StoreError("disk says no")

    with BackgroundWriter(1000) as writer:
        writer.submit(0, 1, lambda: 1)
        writer.submit(1, 1, fail)
        writer.submit(2, 1, lambda: 3)
    results = writer.results()
    assert [r.tag for r in results] == [0, 1, 2]
    assert isinstance(results[1].error, StoreError) and results[2].value == 3


def test_writer_abort_drops_queued_jobs_and_zero_bytes_is_synchronous():
    gate = threading.Event()
    ran: list[int] = []
    writer = BackgroundWriter(1000)
    writer.submit(0, 1, lambda: (gate.wait(), ran.append(0)))
    for i in range(1, 5):
        writer.submit(i, 1, lambda i=i: ran.append(i))
    threading.Timer(0.05, gate.set).start()
    writer.abort()
    assert ran[0] == 0 and len(ran) <= 2
    sync = BackgroundWriter(0)
    sync.submit("a", 10**9, lambda: threading.current_thread().name)
    (res,) = sync.results()
    assert res.value == threading.current_thread().name


# -- batches across images ---------------------------------------------------------------------


def _sd(model: Path, **opts) -> StableDiffusionExtractor:
    values = {
        "model": str(model),
        "image_size": [64, 64],
        "ensemble_size": 3,
        "timesteps": [100, 500],
        "device": "cpu",
        **opts,
    }
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


@pytest.fixture(scope="module")
def images():
    return [as_input(smooth_texture((90 - 7 * i, 70 + 5 * i), seed=20 + i)) for i in range(5)]


def test_sd_batch_of_images_times_ensemble_matches_one_image_per_call(tiny_sd, images):
    ex = _sd(tiny_sd)
    shapes: list[int] = []
    hook = ex.parts.unet.register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape[0]))
    batched = ex.extract(images[:4])
    hook.remove()
    assert shapes == [4 * 3, 4 * 3]  # one UNet pass per timestep: 4 images x 3 copies
    single = [ex.extract([im])[0] for im in images[:4]]
    for a, b in zip(batched, single):
        # same noise per image; the kernels round differently for another batch shape
        torch.testing.assert_close(a.layers["up_blocks.1"], b.layers["up_blocks.1"])
        assert a.meta == b.meta
    # an image's features do not depend on its batch-mates or its place (its own noise);
    # with several threads the kernels may round differently by place, so not bit for bit
    swapped = ex.extract([images[4], images[2], images[1], images[0]])
    close = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(
        swapped[3].layers["up_blocks.1"], batched[0].layers["up_blocks.1"], **close
    )
    torch.testing.assert_close(
        swapped[1].layers["up_blocks.1"], batched[2].layers["up_blocks.1"], **close
    )
    # the preprocessed entry point is the same computation, bit for bit
    pixels = torch.stack([ex.preprocessor()(im) for im in images[:4]])
    again = ex.extract_preprocessed(images[:4], pixels)
    for a, b in zip(batched, again):
        assert torch.equal(a.layers["up_blocks.1"], b.layers["up_blocks.1"])


def test_vit_batch_matches_one_image_per_call(tiny_dinov2_model, images):
    values = {"model": str(tiny_dinov2_model), "image_size": [56, 42], "device": "cpu"}
    ex = Dinov2Extractor(build_options(Dinov2Extractor, values, "test"))
    pixels = torch.stack([ex.preprocessor()(im) for im in images[:4]])
    batched = ex.extract_preprocessed(images[:4], pixels)
    single = ex.extract(images[:4])  # batch_size 1: one forward per image
    for a, b in zip(batched, single):
        (name,) = a.layers
        torch.testing.assert_close(a.layers[name], b.layers[name])
        assert a.meta == b.meta
    swapped = ex.extract_preprocessed(images[3::-1], pixels.flip(0))
    for a, b in zip(batched, swapped[::-1]):  # the place in the batch: float rounding only
        torch.testing.assert_close(a.layers[name], b.layers[name], rtol=1e-5, atol=1e-5)


# -- the extract path ---------------------------------------------------------------------------


def _sd_pipeline(model: Path, store: Path) -> Pipeline:
    data = {
        "extractor": {
            "plugin": "stable-diffusion",
            "model": str(model),
            "image_size": [64, 64],
            "ensemble_size": 2,
            "device": "cpu",
        }
    }
    return Pipeline.from_dict(data, store=store)


def _files(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"im{i}.png"
        smooth_texture((60 + 4 * i, 48), seed=40 + i).save(p)
        paths.append(p)
    return paths


def _entries(store_path: Path) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    store = FeatureStore(store_path, mode="r")
    out = {}
    for key in store.extractors():
        for image in store.entries(key):
            out[key, image] = store.get(key, image, dtype=torch.float16).layers
    return out


def test_workers_give_the_same_store_as_the_main_process(tiny_sd, tmp_path):
    files = _files(tmp_path / "in", 5)
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"not a png")
    inputs = [*files[:2], bad, *files[2:]]
    reports = {}
    for workers in (0, 2):
        pipe = _sd_pipeline(tiny_sd, tmp_path / f"w{workers}.zarr")
        settings = ExtractSettings(batch_size=2, workers=workers)
        reports[workers] = pipe.extract(inputs, settings=settings)
    assert reports[0] == reports[2]
    assert (reports[0].total, reports[0].computed, reports[0].cached) == (6, 5, 0)
    assert [item for item, _ in reports[0].failed] == [str(bad)]
    a, b = _entries(tmp_path / "w0.zarr"), _entries(tmp_path / "w2.zarr")
    assert sorted(a) == sorted(b) and len(a) == 5
    for k in a:
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name])


class _FlakyStore(FeatureStore):
    """A store whose ``put`` fails for chosen sources (with a store error or a crash)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail: dict[str, BaseException] = {}
        self.delay = 0.0

    def put(self, cache_key, image_key, features, *, source=None, replace=True):
        time.sleep(self.delay)
        for name, exc in self.fail.items():
            if source is not None and source.endswith(name):
                raise exc
        return super().put(cache_key, image_key, features, source=source, replace=replace)


def test_store_errors_are_reported_per_image_others_stop_the_run(manager, tmp_path):
    files = _files(tmp_path / "in", 5)
    data = {"extractor": {"plugin": "color-blur", "image_size": [16, 16]}}
    store = _FlakyStore(tmp_path / "s.zarr")
    store.fail = {"im1.png": StoreError("layer 'color' of image im1 is beyond float16")}
    pipe = Pipeline.from_dict(data, store=store, manager=manager)
    report = pipe.extract(files, settings=ExtractSettings(batch_size=2))
    assert (report.total, report.computed) == (5, 4)
    assert report.failed == [(str(files[1]), "layer 'color' of image im1 is beyond float16")]
    crashing = _FlakyStore(tmp_path / "t.zarr")
    crashing.fail = {"im3.png": RuntimeError("boom")}
    other = Pipeline.from_dict(data, store=crashing, manager=manager)
    with pytest.raises(RuntimeError, match="boom"):
        other.extract(files, settings=ExtractSettings(batch_size=2))
    stored = FeatureStore(tmp_path / "t.zarr", mode="r").entries(other.cache_key)
    assert 0 < len(stored) < 5  # what was written before the crash stays, complete


def test_extract_bounds_the_write_queue_and_counts_in_order(manager, tmp_path, monkeypatch):
    writers: list[BackgroundWriter] = []

    class Recording(BackgroundWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    monkeypatch.setattr(sources, "BackgroundWriter", Recording)
    files = _files(tmp_path / "in", 6)
    data = {"extractor": {"plugin": "color-blur", "image_size": [32, 32]}}
    store = _FlakyStore(tmp_path / "s.zarr")
    store.fail, store.delay = {}, 0.05
    pipe = Pipeline.from_dict(data, store=store, manager=manager)
    entry = 9 * 32 * 32 * 4  # 3 sigmas x RGB, float32
    ticks: list[int] = []

    class Bar:
        def update(self, n: int = 1) -> None:
            ticks.append(n)

    limit_mb = 2.5 * entry / 2**20
    report = pipe.extract(files, progress=Bar(), settings=ExtractSettings(1, 0, limit_mb))
    (writer,) = writers
    assert writer.max_bytes == int(2.5 * entry)
    assert writer.peak_bytes == 2 * entry  # two entries fit, a third waits
    assert (report.computed, len(ticks)) == (6, 6)
    assert DEFAULT_WRITE_QUEUE_MB == WRITE_QUEUE_MB  # the CLI's copy (no torch at --help)


# -- switches -----------------------------------------------------------------------------------


def test_attention_is_sdpa_by_default(tiny_sd, tiny_dinov2_model):
    ex = _sd(tiny_sd)
    procs = {type(p).__name__ for p in ex.parts.unet.attn_processors.values()}
    assert procs == {"AttnProcessor2_0"}  # torch's scaled_dot_product_attention
    values = {"model": str(tiny_dinov2_model), "image_size": [56, 56], "device": "cpu"}
    vit = Dinov2Extractor(build_options(Dinov2Extractor, values, "test"))
    assert vit.model.config._attn_implementation == "sdpa"


def test_compile_around_keeps_captured_modules_eager():
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4),
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)),
        torch.nn.ModuleList([torch.nn.Linear(4, 4)]),
    )
    compiled = compile_around(model, ["1.2"], backend="eager")
    assert compiled == ["0", "1.0", "2.0"]
    assert model[1][2]._compiled_call_impl is None and model[0]._compiled_call_impl is not None


def test_channels_last_keeps_sd_features_compile_wraps_uncaptured_blocks(tiny_sd, images):
    base = _sd(tiny_sd).extract(images[:2])
    fast = _sd(tiny_sd, channels_last=True).extract(images[:2])
    for a, b in zip(base, fast):
        torch.testing.assert_close(a.layers["up_blocks.1"], b.layers["up_blocks.1"])
    ex = _sd(tiny_sd, compile=True)
    assert ex.parts.unet.up_blocks[1]._compiled_call_impl is None  # captured: stays eager
    assert ex.parts.unet.down_blocks[0]._compiled_call_impl is not None


# -- a run killed mid-write, through the real CLI ----------------------------------------------


def _complete(store: Path) -> int:
    """Complete entries in the store now (0 while it does not exist yet)."""
    try:
        s = FeatureStore(store, mode="r")
        return sum(len(s.entries(key)) for key in s.extractors())
    except Exception:
        return 0


@pytest.mark.slow
def test_killed_extract_leaves_no_half_entry_and_resumes(tiny_sd, tmp_path):
    config = tiny_dift_config(tiny_sd, tmp_path / "tiny.toml")
    files = _files(tmp_path / "in", 30)  # enough that a fast machine is still at it
    store = tmp_path / "s.zarr"
    args = [DIFFEAT, "extract", config, tmp_path / "in", "--store", store, "--batch-size", "2"]
    proc = subprocess.Popen(
        [*map(str, args), "--workers", "1"],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # kill once 2 entries are complete, however long that takes on a loaded machine
        wait_until(lambda: _complete(store) >= 2, "2 complete entries", proc=proc, poll_s=0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    verify = json.loads(
        subprocess.run(
            [DIFFEAT, "store", "verify", str(store), "--json"],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=HANG_GUARD_S,
        ).stdout
    )
    assert verify["ok"] and not verify["damaged"] and verify["checked"] >= 2
    kept = verify["checked"]
    again = run_json(*args[1:])
    assert (again["computed"], again["cached"]) == (len(files) - kept, kept)
    final = run_json("store", "verify", store)
    assert final["ok"] and final["checked"] == len(files)


def test_switch_flags_set_the_extractor_option_or_say_which_lacks_it(manager):
    from diffeat.cli.extract import switch_on
    from diffeat.core.config import parse_config
    from diffeat.core.errors import DiffeatError

    sd = parse_config({"extractor": {"plugin": "stable-diffusion"}}, manager=manager)
    switch_on(sd, "channels_last", "--channels-last")
    switch_on(sd, "compile", "--compile")
    assert sd.extractor.options.channels_last and sd.extractor.options.compile
    blur = parse_config({"extractor": {"plugin": "color-blur"}}, manager=manager)
    with pytest.raises(DiffeatError, match="--compile: the extractor 'color-blur'.*no compile"):
        switch_on(blur, "compile", "--compile")


def test_an_extractor_error_still_stores_the_entries_computed_before(
    manager, tmp_path, monkeypatch
):
    from diffeat.testing import ColorBlurExtractor

    files = _files(tmp_path / "in", 6)
    original = ColorBlurExtractor.extract
    calls: list[int] = []

    def failing(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(self, images)

    monkeypatch.setattr(ColorBlurExtractor, "extract", failing)
    store = _FlakyStore(tmp_path / "s.zarr")
    store.delay = 0.1  # the first batch is still queued when the second fails
    pipe = Pipeline.from_dict(
        {"extractor": {"plugin": "color-blur", "image_size": [16, 16]}},
        store=store,
        manager=manager,
    )
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe.extract(files, settings=ExtractSettings(batch_size=3))
    assert len(FeatureStore(tmp_path / "s.zarr", mode="r").entries(pipe.cache_key)) == 3


def test_the_same_image_twice_in_a_run_is_computed_once(manager, tmp_path):
    files = _files(tmp_path / "in", 3)
    store = _FlakyStore(tmp_path / "s.zarr")
    store.delay = 0.05  # the first copy is still queued when the second comes
    pipe = Pipeline.from_dict(
        {"extractor": {"plugin": "color-blur", "image_size": [16, 16]}},
        store=store,
        manager=manager,
    )
    report = pipe.extract([*files, files[0], files[2]], settings=ExtractSettings(batch_size=2))
    assert (report.total, report.computed, report.cached, report.found) == (5, 3, 2, 0)
