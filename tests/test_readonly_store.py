"""A feature store that cannot be written: its entries are read, what is missing is computed
and not kept, and ONE warning names the store and why (``match``, ``eval``, the library).

The CLI tests make the store really unwritable: ``chmod -R a-w``. Root ignores file modes, so
when the tests run as root the ``diffeat`` process drops the capabilities that let root write
anyway (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) before it starts; where that is not
allowed either, those tests are skipped (the in-process tests still cover the logic).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from clihelp import cli_env, run, run_json, tiny_dift_config
from test_eval import make_translate_bench, texture_folder
from waiting import HANG_GUARD_S

from diffeat.core.errors import StoreError
from diffeat.core.pipeline import Pipeline
from diffeat.core.query_cache import QueryCache
from diffeat.core.store_writes import StoreWriteWarning, write_refusal
from diffeat.store import FeatureStore
from diffeat.testing import ColorBlurExtractor, smooth_texture

ROOT = Path(__file__).resolve().parents[1]
COLOR_BLUR = {"extractor": {"plugin": "color-blur", "image_size": [32, 32]}}

PR_CAPBSET_DROP = 24
#: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: what lets root ignore file modes
ROOT_POWERS = (1, 2, 3)


def _as_plain_user() -> None:
    """In the child, before exec: give up root's power to ignore file modes."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in ROOT_POWERS:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


def make_read_only(path: Path) -> None:
    """``chmod -R a-w path``."""
    for p in [path, *path.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(stat.S_IMODE(p.stat().st_mode) | stat.S_IWUSR)


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``path`` with its size and modification time."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in [path, *path.rglob("*")]
    }


@pytest.fixture(scope="module")
def unwritable_enforced(tmp_path_factory) -> None:
    """Skip unless a folder made read-only refuses writes of a ``diffeat`` process here."""
    folder = tmp_path_factory.mktemp("probe")
    make_read_only(folder)
    code = f"open({str(folder / 'x')!r}, 'w')"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            preexec_fn=_as_plain_user,
            capture_output=True,
            timeout=HANG_GUARD_S,
        )
    except subprocess.SubprocessError as exc:  # not allowed to drop root's powers
        pytest.skip(f"cannot run a process that respects file modes here: {exc}")
    finally:
        make_writable(folder)
    if proc.returncode == 0:
        pytest.skip("a read-only folder is writable here (root with its powers kept)")


def diffeat(*args, check: int | None = 0) -> subprocess.CompletedProcess:
    return run(*args, check=check, preexec_fn=_as_plain_user)


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def config(tiny_sd, tmp_path_factory) -> Path:
    return tiny_dift_config(tiny_sd, tmp_path_factory.mktemp("cfg") / "tiny.toml")


@pytest.fixture
def photos(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        smooth_texture((80 + 8 * i, 64), seed=i).save(d / f"p{i}.png")
    return d


# ----------------------------------------------------------------------- the real CLI


@pytest.mark.slow
def test_match_on_a_read_only_store(config, photos, tmp_path, unwritable_enforced):
    store = tmp_path / "feats.zarr"
    first = run_json("extract", config, photos / "p0.png", "--store", store)
    assert first["computed"] == 1
    writable = tmp_path / "writable.zarr"
    shutil.copytree(store, writable)
    make_read_only(store)
    before = snapshot(store)
    try:
        # p0 is stored, p2 is not: p0 read, p2 computed and not kept
        match = (
            "match",
            config,
            photos / "p0.png",
            photos / "p2.png",
            "-p",
            "10,20",
            "-p",
            "40,30",
        )
        proc = diffeat(*match, "--store", store, "--json")
        assert "Traceback" not in proc.stderr
        (line,) = warning_lines(proc.stderr)  # one warning, naming the store and why
        assert str(store) in line and "read-only" in line and "not writable" in line
        assert "--no-store" in line
        reference = run_json(*match, "--store", writable)
        assert len(reference["matches"]) == 2
        assert json.loads(proc.stdout)["matches"] == reference["matches"]  # the same points
        assert snapshot(store) == before  # nothing written, nothing removed
    finally:
        make_writable(store)
    info = run_json("store", "info", store)
    assert [v["entries"] for v in info["extractors"].values()] == [1]


@pytest.mark.slow
def test_eval_on_a_read_only_store(config, tmp_path, unwritable_enforced):
    bench = tmp_path / "bench"
    photos = texture_folder(tmp_path / "photos")
    make_translate_bench(bench, photos, 3, cli_env())
    store = tmp_path / "feats.zarr"
    run_json("extract", config, photos, "--store", store)  # the sources; targets are missing
    writable = tmp_path / "writable.zarr"
    shutil.copytree(store, writable)
    make_read_only(store)
    before = snapshot(store)
    evaluate = ("eval", config, "--dataset", "synthetic", "--root", bench, "--no-plots")
    try:
        proc = diffeat(*evaluate, "--store", store, "--json")
        (line,) = warning_lines(proc.stderr)
        assert str(store) in line and "read-only" in line
        assert snapshot(store) == before
    finally:
        make_writable(store)
    got = json.loads(proc.stdout)
    reference = run_json(*evaluate, "--store", writable)
    assert got["summary"] == reference["summary"]  # the same points, the same PCK
    assert got["run"]["features"]["read_from_store"] > 0
    assert got["run"]["features"]["computed"] > 0


@pytest.mark.slow
def test_a_store_that_cannot_be_created(config, photos, tmp_path, unwritable_enforced):
    parent = tmp_path / "locked"
    parent.mkdir()
    make_read_only(parent)
    store = parent / "feats.zarr"
    try:
        match = ("match", config, photos / "p0.png", photos / "p1.png", "-p", "10,20", "--json")
        proc = diffeat(*match, "--store", store)
        (line,) = warning_lines(proc.stderr)
        assert str(store) in line and "cannot be created" in line
        assert not store.exists()
    finally:
        make_writable(parent)
    assert json.loads(proc.stdout)["matches"] == run_json(*match[:-1], "--no-store")["matches"]


@pytest.mark.slow
def test_extract_into_a_read_only_store_is_a_clear_error(
    config, photos, tmp_path, unwritable_enforced
):
    store = tmp_path / "feats.zarr"
    run_json("extract", config, photos / "p0.png", "--store", store)
    make_read_only(store)
    try:
        # another configuration: a new cache key, registered before any entry
        proc = diffeat(
            "extract",
            config,
            photos,
            "--store",
            store,
            "--set",
            "extractor.timesteps=[100]",
            check=2,
        )
    finally:
        make_writable(store)
    assert "Traceback" not in proc.stderr
    assert "cannot write into the feature store" in proc.stderr and str(store) in proc.stderr


# ------------------------------------------------------------------------- in process


def test_write_refusal_reads_the_chain_of_causes():
    denied = PermissionError(errno.EACCES, "Permission denied", "/s/x.partial")
    assert write_refusal(denied) == "Permission denied: /s/x.partial"
    assert write_refusal(OSError(errno.EROFS, "Read-only file system")) == "Read-only file system"
    try:
        try:
            raise denied
        except OSError as exc:
            raise StoreError("writing k/i into /s failed") from exc
    except StoreError as wrapped:
        assert write_refusal(wrapped) == "Permission denied: /s/x.partial"
    assert write_refusal(StoreError("the feature store /s is open read-only (mode 'r')"))
    assert write_refusal(OSError(errno.ENOSPC, "No space left on device")) is None
    assert write_refusal(StoreError("values beyond the float16 range")) is None


def test_mode_r_store_is_read_and_warned_about_once(manager, tmp_path, texture_files):
    path = tmp_path / "f.zarr"
    kept = Pipeline.from_dict(COLOR_BLUR, store=path, manager=manager).features(texture_files[:1])
    before = snapshot(path)
    store = FeatureStore(path, mode="r")
    pipe = Pipeline.from_dict(COLOR_BLUR, store=store, manager=manager)
    queries = QueryCache(store, "demo", None, dict)
    calls = ColorBlurExtractor.calls
    with pytest.warns(StoreWriteWarning) as caught:
        got = pipe.features(texture_files)
        assert ColorBlurExtractor.calls == calls + 2  # the stored image was read, not computed
        queries.put(smooth_texture((8, 8), seed=1), "q", kept[0])  # the same store: no 2nd
        pipe.features(texture_files[1:])  # computed again: nothing was kept
    assert len(caught) == 1 and "opened with mode 'r'" in str(caught[0].message)
    assert str(path) in str(caught[0].message)
    assert ColorBlurExtractor.calls == calls + 4  # the 2nd time as well: nothing was kept
    assert torch.equal(got[0].layers["color"], kept[0].layers["color"])
    # what is computed and not kept is rounded as if kept: a writable store gives the same
    fresh = Pipeline.from_dict(COLOR_BLUR, store=tmp_path / "w.zarr", manager=manager)
    for a, b in zip(got, fresh.features(texture_files)):
        assert torch.equal(a.layers["color"], b.layers["color"])
    assert snapshot(path) == before


def test_a_write_refused_mid_run_degrades_the_same_way(
    manager, tmp_path, texture_files, monkeypatch
):
    path = tmp_path / "f.zarr"
    pipe = Pipeline.from_dict(COLOR_BLUR, store=path, manager=manager)
    real_aput = FeatureStore._aput
    attempts = []

    async def refuse_after_first(self, cache_key, prefix, *args):
        attempts.append(prefix)
        if len(attempts) > 1:  # e.g. the folder made read-only while the run goes on
            raise PermissionError(errno.EACCES, "Permission denied", str(self.path / prefix))
        return await real_aput(self, cache_key, prefix, *args)

    monkeypatch.setattr(FeatureStore, "_aput", refuse_after_first)
    with pytest.warns(StoreWriteWarning, match="Permission denied") as caught:
        got = pipe.features(texture_files)
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    assert len(got) == 3 and len(attempts) == 2  # after the refusal no write is tried
    store = FeatureStore(path, mode="r")
    (key,) = store.extractors()
    assert len(store.entries(key)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.features(texture_files)  # warned once: silent now
    assert len(attempts) == 2


def test_other_write_failures_still_stop_the_run(manager, tmp_path, texture_files, monkeypatch):
    pipe = Pipeline.from_dict(COLOR_BLUR, store=tmp_path / "f.zarr", manager=manager)

    async def disk_full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FeatureStore, "_aput", disk_full)
    with pytest.raises(StoreError, match="No space left"):
        pipe.features(texture_files)


def test_values_beyond_float16_are_refused_with_a_read_only_store_too(
    manager, tmp_path, texture_files, monkeypatch
):
    """A writable float16 store refuses features it cannot hold (they would read back as
    inf); features computed and not kept (a read-only store) are refused the same way."""
    from diffeat.core.features import FeatureSet

    path = tmp_path / "f.zarr"
    Pipeline.from_dict(COLOR_BLUR, store=path, manager=manager).features(texture_files[:1])
    real = ColorBlurExtractor.extract

    def huge(self, images):
        out = real(self, images)
        return [
            FeatureSet({k: v * 1e6 for k, v in f.layers.items()}, f.timesteps, f.meta) for f in out
        ]

    monkeypatch.setattr(ColorBlurExtractor, "extract", huge)
    for store in (FeatureStore(tmp_path / "w.zarr"), FeatureStore(path, mode="r")):
        pipe = Pipeline.from_dict(COLOR_BLUR, store=store, manager=manager)
        with warnings.catch_warnings(), pytest.raises(StoreError, match="range"):
            warnings.simplefilter("ignore", StoreWriteWarning)
            pipe.features(texture_files[1:2])


@pytest.mark.slow
def test_match_on_a_store_copied_from_object_storage(config, photos, tmp_path):
    """A store whose layout is object storage's (format 3), copied to a disk: ``match`` reads
    its entries and computes the rest, with one warning, instead of refusing the store."""
    store = tmp_path / "feats.zarr"
    run_json("extract", config, photos / "p0.png", "--store", store)
    writable = tmp_path / "writable.zarr"
    shutil.copytree(store, writable)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["diffeat"]["format_version"] = 3  # as if written on object storage
    (store / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreError, match="format 3 store"):
        FeatureStore(store)
    before = snapshot(store)
    match = ("match", config, photos / "p0.png", photos / "p2.png", "-p", "10,20")
    proc = diffeat(*match, "--store", store, "--json")
    assert "Traceback" not in proc.stderr
    (line,) = warning_lines(proc.stderr)
    assert str(store) in line and "read-only" in line and "format 3" in line
    assert json.loads(proc.stdout)["matches"] == run_json(*match, "--store", writable)["matches"]
    assert snapshot(store) == before
