"""The zarr v3 feature store (diffeat.store): format, completion marker, concurrency, keys."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from waiting import HANG_GUARD_S, wait_until

from diffeat.core.errors import StoreError
from diffeat.core.features import FeatureSet
from diffeat.store import FeatureStore, InvalidKeyError, MissingEntry, zarr_io

INFO = {
    "plugin": "dift",
    "config": {"t": 261, "up_ft_index": 1},
    "model": {"id": "tiny-sd", "revision": "abc"},
    "layers": [{"name": "up1", "channels": 8, "stride": 16.0}],
    "versions": {"diffeat": "0.1.0"},
}


def make_features(seed: int = 0, timesteps: tuple[int, ...] = (100, 500, 900)) -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    t = len(timesteps)
    layers = {
        "up0": torch.randn(t, 16, 4, 6, generator=gen) * 3,
        "up1.attn": torch.randn(t, 8, 8, 8, generator=gen),
        "mid:0": torch.randn(t, 4, 2, 3, generator=gen),
    }
    meta = {"transform": {"image_size": [64, 48], "model_size": [64, 64], "scale": [1.0, 4 / 3]}}
    return FeatureSet(layers, timesteps, meta)


def assert_float16_equal(got: FeatureSet, want: FeatureSet) -> None:
    assert list(got.layers) == list(want.layers)
    assert got.timesteps == want.timesteps
    for name, tensor in want.layers.items():
        assert got.layers[name].dtype == torch.float32
        torch.testing.assert_close(got.layers[name], tensor.half().float(), rtol=0, atol=0)


@pytest.fixture(params=["fast", "public"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeatureStore]:
    """A new store, used through zarr_io's fast path and through its public-API path."""
    fast = request.param == "fast"
    if fast and not zarr_io.fast_path_supported():
        pytest.skip(f"zarr {zarr_io.zarr_version()} is not a release the fast path was tested with")
    with zarr_io.use_fast_path(fast):
        yield FeatureStore(tmp_path / "features.zarr")


# ---------------------------------------------------------------- roundtrip


def test_roundtrip_values_layers_timesteps_meta(store: FeatureStore) -> None:
    fs = make_features(1)
    store.put("ck", "img0", fs, source="images/cat.png")
    got = store.get("ck", "img0")
    assert_float16_equal(got, fs)
    torch.testing.assert_close(got.layers["up0"], fs.layers["up0"], rtol=1e-3, atol=1e-3)
    assert got.meta == fs.meta
    assert got.transform.image_size == (64, 48)


def test_float32_store_is_exact_and_bfloat16_is_stored_as_float16(tmp_path: Path) -> None:
    fs = make_features(2)
    exact = FeatureStore(tmp_path / "s", dtype="float32")
    exact.put("ck", "img", fs)
    for name, tensor in fs.layers.items():
        assert torch.equal(exact.get("ck", "img").layers[name], tensor)
    assert exact.entry_info("ck", "img")["layers"]["up0"]["dtype"] == "float32"

    half = FeatureStore(tmp_path / "s")  # the default float16; same store, other entry
    bf16 = FeatureSet({k: v.bfloat16() for k, v in fs.layers.items()}, fs.timesteps)
    half.put("ck", "bf16", bf16)
    got = half.get("ck", "bf16", dtype=torch.bfloat16)
    for name, tensor in bf16.layers.items():  # bf16 -> fp16 is exact in the normal range
        assert torch.equal(got.layers[name], tensor)
    # the float32 entry written before is still read back exactly
    assert torch.equal(half.get("ck", "img").layers["up0"], fs.layers["up0"])


@pytest.mark.parametrize("dtype", ["int8", "float64", "uint16"])
def test_unsupported_store_dtype(tmp_path: Path, dtype: str) -> None:
    with pytest.raises(StoreError, match="float16"):
        FeatureStore(tmp_path / "s", dtype=dtype)


def test_float16_overflow_is_refused(store: FeatureStore) -> None:
    big = FeatureSet({"a": torch.tensor([1.0, 1e5]).view(1, 1, 1, 2)}, (0,))
    with pytest.raises(StoreError, match="dtype='float32'"):
        store.put("ck", "big", big)
    assert not store.has("ck", "big")
    # NaN and inf already in the features are stored as they are
    odd = FeatureSet({"a": torch.tensor([float("nan"), float("inf"), 1.0]).view(1, 1, 1, 3)}, (0,))
    store.put("ck", "odd", odd)
    got = store.get("ck", "odd").layers["a"].flatten()
    assert torch.isnan(got[0]) and torch.isinf(got[1]) and got[2] == 1.0


def test_get_dtype_device_and_layers_subset(store: FeatureStore) -> None:
    fs = make_features(3)
    store.put("ck", "img", fs)
    half = store.get("ck", "img", dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.layers.values())
    assert torch.equal(half.layers["up0"], fs.layers["up0"].half())
    f64 = store.get("ck", "img", dtype=torch.float64)
    assert f64.layers["mid:0"].dtype == torch.float64

    sub = store.get("ck", "img", layers=["mid:0", "up0"])
    assert list(sub.layers) == ["mid:0", "up0"]
    assert sub.timesteps == fs.timesteps
    with pytest.raises(StoreError, match="no layer 'nope'"):
        store.get("ck", "img", layers=["up0", "nope"])
    with pytest.raises(TypeError):
        store.get("ck", "img", layers="up0")

    meta = store.get("ck", "img", device="meta", dtype=torch.float32)  # the non-CPU path
    assert meta.layers["up0"].device.type == "meta"
    assert meta.layers["up0"].shape == fs.layers["up0"].shape
    assert meta.layers["up0"].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_get_to_cuda(store: FeatureStore) -> None:
    fs = make_features(4)
    store.put("ck", "img", fs)
    got = store.get("ck", "img", device="cuda", dtype=torch.float16)
    assert got.layers["up0"].is_cuda
    assert torch.equal(got.layers["up0"].cpu(), fs.layers["up0"].half())


def test_zero_timesteps(store: FeatureStore) -> None:
    store.put("ck", "none", FeatureSet({"a": torch.zeros(0, 3, 2, 2)}, ()))
    got = store.get("ck", "none")
    assert got.timesteps == () and got.layers["a"].shape == (0, 3, 2, 2)


# ---------------------------------------------------------------- bookkeeping


def test_has_entries_entry_info_delete(store: FeatureStore) -> None:
    assert not store.has("ck", "a")
    assert store.entries("ck") == []
    for key in ("b", "a", "c"):
        store.put("ck", key, make_features(), source=f"/data/{key}.jpg")
    assert store.entries("ck") == ["a", "b", "c"]
    assert store.has("ck", "a") and not store.has("other", "a")

    info = store.entry_info("ck", "a")
    assert info["source"] == "/data/a.jpg"
    assert info["timesteps"] == [100, 500, 900]
    assert info["layers"]["up1.attn"] == {"shape": [3, 8, 8, 8], "dtype": "float16", "nbytes": 3072}
    assert info["nbytes"] == sum(v["nbytes"] for v in info["layers"].values())
    assert 0 < info["stored_bytes"]
    assert info["meta"]["transform"]["image_size"] == [64, 48]

    store.delete("ck", "b")
    assert store.entries("ck") == ["a", "c"]
    assert not (store.path / "ck" / "b").exists()
    store.delete("ck", "b")  # nothing there: no error
    with pytest.raises(MissingEntry):
        store.get("ck", "b")
    with pytest.raises(MissingEntry):
        store.entry_info("ck", "b")


def test_missing_entry_is_a_readable_key_error(store: FeatureStore) -> None:
    with pytest.raises(KeyError) as exc:
        store.get("ck", "nothing")
    assert isinstance(exc.value, MissingEntry)
    assert str(exc.value) == "no complete entry for image 'nothing' under cache key 'ck'"


def test_put_overwrites_a_complete_entry(store: FeatureStore) -> None:
    store.put("ck", "img", make_features(5))
    new = FeatureSet({"only": torch.ones(1, 2, 3, 4)}, (7,), {"v": 2})
    store.put("ck", "img", new, source="second")
    got = store.get("ck", "img")
    assert list(got.layers) == ["only"] and got.timesteps == (7,) and got.meta == {"v": 2}
    assert not (store.path / "ck" / "img" / "up0").exists()  # nothing left of the old entry
    assert store.entry_info("ck", "img")["source"] == "second"


def test_register_extractor_and_info(store: FeatureStore) -> None:
    store.register_extractor("ck1", INFO)
    store.register_extractor("ck1", INFO)  # idempotent
    store.put("ck1", "img0", make_features())
    store.put("ck1", "img1", make_features())
    store.put("ck2", "img0", make_features())  # never registered: empty info
    assert store.extractors() == {"ck1": INFO, "ck2": {}}

    summary = store.info()
    # a new store on disk is format 2; this diffeat reads up to 5 (3: object storage; 4 and
    # 5: 2 and 3 with bfloat16 layers)
    assert summary["format_version"] == 2 and FeatureStore.FORMAT_VERSION == 5
    assert summary["path"] == str(store.path)
    ck1 = summary["extractors"]["ck1"]
    assert {k: ck1[k] for k in INFO} == INFO
    assert ck1["entries"] == 2 and ck1["incomplete"] == 0
    assert ck1["bytes"] > 0
    ck2 = summary["extractors"]["ck2"]
    assert ck2["entries"] == 1 and ck2.get("plugin") is None
    assert summary["bytes"] > ck1["bytes"] + ck2["bytes"]
    json.dumps(summary)  # JSON all the way
    assert store.cache_key_bytes("ck1") == ck1["bytes"] > store.cache_key_bytes("ck2")
    assert store.cache_key_bytes("ck2") == ck2["bytes"]
    # the bytes are every file's size below each folder, as a plain walk adds them up
    for prefix, reported in (("ck1", ck1["bytes"]), ("", summary["bytes"])):
        walked = sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(store.path / prefix)
            for f in files
        )
        assert reported == walked


def test_register_extractor_later_and_changes(store: FeatureStore) -> None:
    store.put("ck", "img", make_features())  # creates the cache-key group without info
    store.register_extractor("ck", INFO)
    assert store.extractors()["ck"] == INFO
    assert store.entries("ck") == ["img"]  # re-registering leaves the entries alone

    newer = dict(INFO, versions={"diffeat": "0.2.0"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.register_extractor("ck", newer)  # only versions differ: the first record stays
    assert store.extractors()["ck"]["versions"] == {"diffeat": "0.1.0"}

    changed = dict(INFO, config={"t": 1})
    with pytest.warns(UserWarning, match="config"):
        store.register_extractor("ck", changed)
    assert store.extractors()["ck"]["config"] == {"t": 1}

    store.register_extractor("tuples", {"plugin": "x", "layers": ({"name": "a"},)})
    assert store.extractors()["tuples"]["layers"] == [{"name": "a"}]
    with pytest.raises(StoreError, match="JSON"):
        store.register_extractor("bad", {"plugin": object()})
    with pytest.raises(StoreError, match="JSON"):
        store.put("ck", "badmeta", FeatureSet({"a": torch.zeros(1, 1, 1, 1)}, (0,), {"x": {1, 2}}))


def test_pickle_reopens_by_path(store: FeatureStore) -> None:
    store.put("ck", "img", make_features())
    again = pickle.loads(pickle.dumps(store))
    assert again.path == store.path and again.has("ck", "img")


# ---------------------------------------------------------------- half-written entries


def _image_json(store: FeatureStore, key: str = "img") -> Path:
    return store.path / "ck" / key / "zarr.json"


def test_entry_without_marker_is_invisible_and_rewritten(store: FeatureStore) -> None:
    fs = make_features(6)
    store.put("ck", "img", fs)
    # arrays all there, marker flipped off, as after a kill just before the last write
    zarr.open_group(store.path, path="ck/img", mode="r+").attrs["complete"] = False
    # and an entry written with plain zarr only (no diffeat attributes at all)
    plain = zarr.open_group(store.path, mode="r+").create_group("ck/plain")
    plain.create_array("up0/features", data=np.zeros((1, 2, 2, 2), dtype="float16"))

    assert not store.has("ck", "img") and not store.has("ck", "plain")
    assert store.entries("ck") == []
    with pytest.raises(MissingEntry):
        store.get("ck", "img")
    assert store.info()["extractors"]["ck"]["incomplete"] == 2

    store.put("ck", "img", fs)
    store.put("ck", "plain", fs)
    assert store.entries("ck") == ["img", "plain"]
    assert_float16_equal(store.get("ck", "plain"), fs)
    assert sorted(p.name for p in (store.path / "ck" / "plain").iterdir()) == sorted(
        ["zarr.json", *fs.layers]
    )


def test_truncated_metadata_is_incomplete(store: FeatureStore) -> None:
    fs = make_features(7)
    store.put("ck", "img", fs)
    store.put("ck", "other", fs)
    path = _image_json(store)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # as after a crash in the middle of a write
    assert not store.has("ck", "img")
    assert store.entries("ck") == ["other"]
    with pytest.raises(MissingEntry):
        store.get("ck", "img")
    assert store.info()["extractors"]["ck"]["incomplete"] == 1
    path.write_bytes(b"")
    assert not store.has("ck", "img")
    store.put("ck", "img", fs)
    assert_float16_equal(store.get("ck", "img"), fs)


def test_get_retries_when_the_entry_is_rewritten_while_read(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = make_features(10)
    store.put("ck", "img", fs)
    marker = _image_json(store)
    original = FeatureStore._aread_layer
    rewrites = {"left": 1}

    async def racing(self, prefix, name, spec, cast):
        if rewrites["left"]:  # another process rewrites the entry under our feet
            rewrites["left"] -= 1
            doc = json.loads(marker.read_text())
            doc["attributes"]["write_id"] = os.urandom(8).hex()
            marker.write_text(json.dumps(doc))
        return await original(self, prefix, name, spec, cast)

    monkeypatch.setattr(FeatureStore, "_aread_layer", racing)
    assert_float16_equal(store.get("ck", "img"), fs)  # read again, consistently
    assert rewrites["left"] == 0
    rewrites["left"] = 1000
    with pytest.raises(MissingEntry, match="kept changing"):
        store.get("ck", "img")


def test_damaged_array_of_a_complete_entry_is_reported(store: FeatureStore) -> None:
    store.put("ck", "img", make_features())
    array_json = store.path / "ck" / "img" / "up0" / "features" / "zarr.json"
    array_json.write_bytes(array_json.read_bytes()[:40])
    assert store.has("ck", "img")  # the marker is there ...
    with pytest.raises(StoreError, match="damaged"):
        store.get("ck", "img")  # ... but the data cannot be read: say so
    assert store.get("ck", "img", layers=["mid:0"]).layers["mid:0"].shape == (3, 4, 2, 3)


def test_missing_chunk_is_an_error_not_nan(store: FeatureStore) -> None:
    fs = make_features()
    store.put("ck", "img", fs)
    (store.path / "ck" / "img" / "up0" / "features" / "c.1.0.0.0").unlink()
    assert store.has("ck", "img")
    with pytest.raises(StoreError) as exc:
        store.get("ck", "img")
    msg = str(exc.value)
    assert "up0/features" in msg and "c.1.0.0.0" in msg and "missing" in msg
    assert "'img'" in msg and "'ck'" in msg and "diffeat store verify --repair" in msg
    other = store.get("ck", "img", layers=["mid:0"]).layers["mid:0"]  # the intact layers read
    assert torch.equal(other, fs.layers["mid:0"].half().float())


@pytest.mark.parametrize("edited", ["int16", "uint16", "float32"])
def test_array_dtype_edited_in_its_metadata_is_an_error(store: FeatureStore, edited: str) -> None:
    store.put("ck", "img", make_features())
    meta = store.path / "ck" / "img" / "up1.attn" / "features" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = edited
    if edited == "float32":
        doc["codecs"][1]["configuration"]["typesize"] = 4
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"up1\.attn/features is damaged.*verify --repair"):
        store.get("ck", "img")


def test_flipped_bits_in_a_chunk_fail_the_checksum(store: FeatureStore) -> None:
    store.put("ck", "img", make_features())
    chunk = store.path / "ck" / "img" / "up0" / "features" / "c.2.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"up0/features is damaged: a chunk's crc32c checksum"):
        store.get("ck", "img")
    assert "checksum" in (store.check_entry("ck", "img") or "")


def test_format_1_stores_stay_readable_and_writable_without_checksums(tmp_path: Path) -> None:
    path = tmp_path / "v1"
    path.mkdir()
    (path / "zarr.json").write_text(
        json.dumps(
            {
                "zarr_format": 3,
                "node_type": "group",
                "attributes": {"diffeat": {"format_version": 1}},
            }
        )
    )
    fs = make_features(2)
    store = FeatureStore(path)
    assert store.format_version == 1
    store.put("ck", "img", fs)
    meta = json.loads((path / "ck/img/up0/features/zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc"]  # as format 1 writes
    assert_float16_equal(FeatureStore(path, mode="r").get("ck", "img"), fs)
    assert json.loads((path / "zarr.json").read_text())["attributes"]["diffeat"] == {
        "format_version": 1
    }


def test_failed_put_leaves_no_entry(store: FeatureStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = make_features()
    store.put("ck", "img", fs)
    original = FeatureStore._awrite_layer

    async def failing(self, prefix, name, array, timesteps):
        if name == "mid:0":
            raise OSError(28, "No space left on device")
        await original(self, prefix, name, array, timesteps)

    monkeypatch.setattr(FeatureStore, "_awrite_layer", failing)
    with pytest.raises(StoreError, match="No space left"):
        store.put("ck", "img", make_features(1))
    with pytest.raises(StoreError, match="No space left"):
        store.put("ck", "new", fs)
    # the entry that was there is untouched; nothing of the failed writes is left
    assert_float16_equal(store.get("ck", "img"), fs)
    assert not store.has("ck", "new")
    assert sorted(p.name for p in (store.path / "ck").iterdir()) == ["img", "zarr.json"]


def test_put_keeps_an_entry_another_writer_completed_meanwhile(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = make_features(3)
    original = FeatureStore._awrite_layer
    other = FeatureStore(store.path)
    done = {"n": 0}

    async def other_writer_meanwhile(self, prefix, name, array, timesteps):
        await original(self, prefix, name, array, timesteps)
        if not done["n"]:  # another process completes the same entry while we write
            done["n"] += 1
            monkeypatch.setattr(FeatureStore, "_awrite_layer", original)
            await other._aput(
                "ck",
                "ck/img",
                {n: t.half().numpy() for n, t in theirs.layers.items()},
                np.asarray(theirs.timesteps),
                _attrs(theirs, "theirs"),
                True,
            )

    monkeypatch.setattr(FeatureStore, "_awrite_layer", other_writer_meanwhile)
    assert store.put("ck", "img", make_features(4), source="ours") is False
    assert store.entry_info("ck", "img")["source"] == "theirs"
    assert_float16_equal(store.get("ck", "img"), theirs)  # theirs, whole, not a mixture
    assert sorted(p.name for p in (store.path / "ck").iterdir()) == ["img", "zarr.json"]

    # replace=True replaces the entry that was there when put began ...
    assert store.put("ck", "img", make_features(5), source="again") is True
    assert store.entry_info("ck", "img")["source"] == "again"
    # ... and replace=False keeps any complete entry, writing nothing
    assert store.put("ck", "img", make_features(6), replace=False) is False
    assert_float16_equal(store.get("ck", "img"), make_features(5))
    assert store.put("ck", "fresh", make_features(6), replace=False) is True


def test_put_moves_an_incomplete_leftover_aside(store: FeatureStore) -> None:
    fs = make_features(8)
    store.put("ck", "img", make_features(9))
    marker = _image_json(store)
    doc = json.loads(marker.read_text())
    doc["attributes"]["complete"] = False  # e.g. left by an older diffeat killed mid-write
    marker.write_text(json.dumps(doc))
    assert store.put("ck", "img", fs, replace=False) is True
    assert_float16_equal(store.get("ck", "img"), fs)
    assert sorted(p.name for p in (store.path / "ck").iterdir()) == ["img", "zarr.json"]


def _attrs(fs: FeatureSet, source: str) -> dict:
    return {
        "complete": True,
        "write_id": os.urandom(16).hex(),
        "timesteps": list(fs.timesteps),
        "source": source,
        "layers": {n: {"shape": list(t.shape), "dtype": "float16"} for n, t in fs.layers.items()},
        "meta": fs.meta,
    }


# ---------------------------------------------------------------- opening


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    FeatureStore(path).put("ck", "img", make_features())
    zarr.open_group(path, mode="r+").attrs["diffeat"] = {"format_version": 6}
    for mode in ("a", "r"):
        with pytest.raises(StoreError, match="upgrade diffeat") as exc:
            FeatureStore(path, mode=mode)
        assert str(path) in str(exc.value) and "format 6" in str(exc.value)


def test_plain_zarr_group_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    zarr.open_group(path, mode="w").attrs["something"] = 1
    with pytest.raises(StoreError, match="not a diffeat feature store") as exc:
        FeatureStore(path)
    assert str(path) in str(exc.value) and "another path" in str(exc.value)
    assert json.loads((path / "zarr.json").read_text())["attributes"] == {"something": 1}


def test_other_folders_are_refused(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a zarr store"):
        FeatureStore(busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        FeatureStore(a_file)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zarr.json").write_text('{"zarr_format": 3, "node_')
    with pytest.raises(StoreError, match="not a readable zarr v3 group"):
        FeatureStore(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert FeatureStore(empty).entries("ck") == []  # an empty folder becomes a store


def test_store_being_created_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "racing"
    path.mkdir()
    (path / "zarr.0123abcd.partial").write_text('{"zarr_format": 3')  # its temporary file
    store = FeatureStore(path)
    assert store.format_version == 2 and FeatureStore(path, mode="r").entries("x") == []


def test_read_only_mode(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(StoreError, match="does not exist") as exc:
        FeatureStore(missing, mode="r")
    assert str(missing) in str(exc.value)
    assert not missing.exists()
    with pytest.raises(StoreError, match="mode"):
        FeatureStore(missing, mode="w")  # type: ignore[arg-type]

    fs = make_features()
    FeatureStore(tmp_path / "s").put("ck", "img", fs)
    ro = FeatureStore(tmp_path / "s", mode="r")
    assert_float16_equal(ro.get("ck", "img"), fs)
    for write in (
        lambda: ro.put("ck", "x", fs),
        lambda: ro.delete("ck", "img"),
        lambda: ro.register_extractor("ck", INFO),
    ):
        with pytest.raises(StoreError, match="read-only"):
            write()
    assert ro.has("ck", "img")


def test_root_metadata_and_plain_zarr_access(store: FeatureStore) -> None:
    fs = make_features(8)
    store.register_extractor("ck", INFO)
    store.put("ck", "img", fs, source="a.png")
    root = zarr.open_group(store.path, mode="r")
    assert root.attrs["diffeat"] == {"format_version": 2}
    assert root["ck"].attrs.asdict() == INFO
    entry = root["ck/img"].attrs.asdict()
    assert entry["complete"] is True and entry["source"] == "a.png"
    arr = root["ck/img/up1.attn/features"]
    assert arr.metadata.dimension_names == ("timestep", "channel", "y", "x")
    assert arr.chunks == (1, 8, 8, 8) and arr.dtype == np.float16
    codecs = json.loads((store.path / "ck/img/up1.attn/features/zarr.json").read_text())["codecs"]
    assert codecs[1]["name"] == "blosc" and codecs[1]["configuration"]["cname"] == "lz4"
    assert codecs[2] == {"name": "crc32c"}  # a checksum per chunk, from format 2 on
    np.testing.assert_array_equal(arr[...], fs.layers["up1.attn"].half().numpy())
    np.testing.assert_array_equal(root["ck/img/up1.attn/timestep"][...], [100, 500, 900])
    assert (store.path / "ck/img/up1.attn/features/c.2.0.0.0").is_file()


# ---------------------------------------------------------------- keys

BAD_KEYS = [
    "../evil",
    "..",
    "a/../../b",
    "/abs/path",
    "a/b",
    "a\\b",
    "",
    ".hidden",
    "-dash",
    "a..b",
    "a b",
    "zarr.json",
    "x.partial",
    "x" * 129,
    "caf\u00e9",
    None,
    3,
]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_keys_are_refused(store: FeatureStore, tmp_path: Path, bad: object) -> None:
    fs = make_features()
    calls = [
        lambda: store.put(bad, "img", fs),  # type: ignore[arg-type]
        lambda: store.put("ck", bad, fs),  # type: ignore[arg-type]
        lambda: store.get("ck", bad),  # type: ignore[arg-type]
        lambda: store.has(bad, "img"),  # type: ignore[arg-type]
        lambda: store.delete("ck", bad),  # type: ignore[arg-type]
        lambda: store.entries(bad),  # type: ignore[arg-type]
        lambda: store.entry_info(bad, "img"),  # type: ignore[arg-type]
        lambda: store.register_extractor(bad, INFO),  # type: ignore[arg-type]
        lambda: store.open_xarray("ck", bad, "up0"),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(InvalidKeyError) as exc:
            call()
        assert isinstance(exc.value, StoreError) and isinstance(exc.value, ValueError)
        assert repr(bad) in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.zarr"]
    assert sorted(p.name for p in store.path.iterdir()) == ["zarr.json"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "/abs", "zarr.json", "x" * 129, ".."])
def test_bad_layer_names_are_refused(store: FeatureStore, bad: str) -> None:
    fs = make_features()
    fs.layers[bad] = torch.zeros(3, 1, 1, 1)  # bypasses FeatureSet's own check
    with pytest.raises(InvalidKeyError):
        store.put("ck", "img", fs)
    assert not (store.path / "ck" / "img").exists()
    with pytest.raises(InvalidKeyError):
        store.get("ck", "img", layers=[bad])


def test_good_keys(store: FeatureStore) -> None:
    for key in ("a", "0", "img_001.jpg", "A-b.c_d", "x" * 128, "sha256-0123abcdef"):
        store.put("ck.v1", key, FeatureSet({"l": torch.ones(1, 1, 1, 1)}, (0,)))
        assert store.has("ck.v1", key)


# ---------------------------------------------------------------- xarray


def test_open_xarray(store: FeatureStore) -> None:
    xr = pytest.importorskip("xarray")
    fs = make_features(9)
    store.put("ck", "img", fs, source="x.png")
    ds = store.open_xarray("ck", "img", "up1.attn")
    assert ds["features"].dims == ("timestep", "channel", "y", "x")
    assert list(ds["timestep"].values) == [100, 500, 900]
    assert "timestep" in ds.coords
    np.testing.assert_array_equal(ds["features"].values, fs.layers["up1.attn"].half().numpy())
    sel = ds["features"].sel(timestep=500).values
    np.testing.assert_array_equal(sel, fs.layers["up1.attn"][1].half().numpy())
    assert ds.attrs["source"] == "x.png"

    plain = xr.open_zarr(store.path, group="ck/img/up0", zarr_format=3, consolidated=False)
    assert plain["features"].dims == ("timestep", "channel", "y", "x")
    assert list(plain["timestep"].values) == [100, 500, 900]

    with pytest.raises(MissingEntry):
        store.open_xarray("ck", "nothing", "up0")
    with pytest.raises(StoreError, match="no layer"):
        store.open_xarray("ck", "img", "nope")


def test_open_xarray_without_xarray(store: FeatureStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put("ck", "img", make_features())
    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray -> ImportError
    with pytest.raises(StoreError, match=r"pip install diffeat\[xarray\]"):
        store.open_xarray("ck", "img", "up0")


# ---------------------------------------------------------------- processes


def _concurrent_writer(path: str, worker: int, n: int) -> None:
    store = FeatureStore(path)  # the first of them creates the store
    store.register_extractor("ck", INFO)
    for i in range(n):
        store.put("ck", f"w{worker}-img{i}", make_features(100 * worker + i), source=str(worker))


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared"  # does not exist yet: the workers race to create it
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_concurrent_writer, args=(str(path), w, 4)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_GUARD_S)  # a hang guard, not a speed budget
        assert p.exitcode == 0
    store = FeatureStore(path, mode="r")
    expected = sorted(f"w{w}-img{i}" for w in range(3) for i in range(4))
    assert store.entries("ck") == expected
    assert store.extractors() == {"ck": INFO}
    for w in range(3):
        for i in range(4):
            got = store.get("ck", f"w{w}-img{i}")
            assert_float16_equal(got, make_features(100 * w + i))
            assert store.entry_info("ck", f"w{w}-img{i}")["source"] == str(w)
    assert store.info()["extractors"]["ck"]["incomplete"] == 0


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, torch
    from diffeat.core.features import FeatureSet
    from diffeat.store import FeatureStore
    def layers(seed):
        gen = torch.Generator().manual_seed(seed)
        return {f"l{j}": torch.randn(3, 64, 32, 32, generator=gen) for j in range(6)}
    store = FeatureStore(sys.argv[1])
    sets = [FeatureSet(layers(seed), (1, 2, 3)) for seed in range(3)]
    i = 0
    while True:  # most of the time goes into put(), so the kill lands inside one
        store.put("ck", f"img{i:05d}", sets[i % 3], source=str(i))
        i += 1
    """
)


@pytest.mark.slow
def test_store_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "killed"
    FeatureStore(path)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)])
    try:
        store = FeatureStore(path, mode="r")

        def writing_after_three() -> bool:  # 3 complete entries and the next one's staging
            done = store.entries("ck")
            return len(done) >= 3 and bool(
                list((path / "ck").glob(f"img{len(done):05d}.*.partial"))
            )

        # kill once an entry is being written, however long that takes (no speed budget)
        wait_until(writing_after_three, "an entry being written after 3", proc=proc, poll_s=0.002)
        assert proc.poll() is None, "the writer died on its own"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = FeatureStore(path)
    done = store.entries("ck")
    assert len(done) >= 3
    for key in done:
        i = int(key[3:])
        gen = torch.Generator().manual_seed(i % 3)
        want = {f"l{j}": torch.randn(3, 64, 32, 32, generator=gen) for j in range(6)}
        got = store.get("ck", key)
        assert store.entry_info("ck", key)["source"] == str(i)
        for name, tensor in want.items():
            assert torch.equal(got.layers[name], tensor.half().float())
    assert store.info()["extractors"]["ck"]["incomplete"] <= 1
    # resuming overwrites whatever the kill left behind
    nxt = f"img{len(done):05d}"
    store.put("ck", nxt, make_features())
    assert store.has("ck", nxt)


def test_store_bytes_follow_os_walk_rules(tmp_path: Path) -> None:
    """A link to a folder is not followed (or counted), a link to a file counts its target,
    a missing or file prefix is 0: the rules of the plain ``os.walk`` sum."""
    from diffeat.store.featurestore import _bytes_by_top_folder

    root = tmp_path / "root"
    (root / "ck" / "entry").mkdir(parents=True)
    (root / "ck" / "entry" / "a").write_bytes(b"x" * 100)
    (root / "zarr.json").write_bytes(b"y" * 7)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"z" * 5000)
    (root / "ck" / "linked").symlink_to(outside, target_is_directory=True)
    (root / "ck" / "file-link").symlink_to(root / "zarr.json")
    assert _bytes_by_top_folder(root) == {"ck": 107, "zarr.json": 7}
    assert _bytes_by_top_folder(root / "missing") == {}
    assert _bytes_by_top_folder(root / "zarr.json") == {}
