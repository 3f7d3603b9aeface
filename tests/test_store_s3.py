"""The feature store on object storage, against a real S3-compatible server on localhost
(moto's server mode): the store API, the commit by conditional requests, the entry
index, leftovers and repair, concurrent writer processes, and ``diffeat extract``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from waiting import HANG_GUARD_S

pytest.importorskip("obstore")
pytest.importorskip("moto.server")

from diffeat.core.errors import StoreError
from diffeat.core.features import FeatureSet
from diffeat.store import (
    DamagedEntry,
    FeatureStore,
    InvalidKeyError,
    MissingEntry,
    objectstore,
)
from diffeat.store.objectstore import IndexEvent, ObjectFeatureStore, merge_index
from diffeat.store.verify import verify_store
from diffeat.store.zarr_io import run
from diffeat.testing.s3 import LocalS3, local_s3_server


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with local_s3_server() as server:
        yield server


@pytest.fixture
def store(s3: LocalS3) -> ObjectFeatureStore:
    made = FeatureStore(s3.url())
    assert isinstance(made, ObjectFeatureStore)
    return made


def features(seed: int = 0, t: int = 2) -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    layers = {
        "up0": torch.randn(t, 8, 4, 6, generator=gen) * 3,
        "mid:0": torch.randn(t, 4, 2, 3, generator=gen),
    }
    return FeatureSet(layers, tuple(range(10, 10 + t)), {"transform": {"image_size": [6, 4]}})


def same(got: FeatureSet, want: FeatureSet) -> bool:
    return list(got.layers) == list(want.layers) and all(
        torch.equal(got.layers[k], want.layers[k].half().float()) for k in want.layers
    )


def objects(store: ObjectFeatureStore, prefix: str = "") -> list[str]:
    return sorted(m["path"] for m in run(store._store.list_objects(prefix)))


# ---------------------------------------------------------------- the store API


def test_put_get_has_entries_info_delete(store: ObjectFeatureStore) -> None:
    fs = features(1)
    assert store.format_version == 3 and not store.has("ck", "a")
    assert store.put("ck", "a", fs, source="cat.png") is True
    assert store.has("ck", "a") and same(store.get("ck", "a"), fs)
    assert store.get("ck", "a", layers=["mid:0"]).timesteps == (10, 11)
    store.put("ck", "b", features(2))
    store.register_extractor("ck", {"plugin": "p", "layers": []})
    assert store.entries("ck") == ["a", "b"]
    info = store.info()
    ex = info["extractors"]["ck"]
    assert ex["plugin"] == "p" and ex["entries"] == 2 and ex["incomplete"] is None
    # the index records each write's bytes: what is stored under its data prefixes
    data = sum(
        int(m["size"]) for m in run(store._store.list_objects("ck")) if m["path"].count("/") > 2
    )
    assert ex["bytes"] == info["bytes"] == data
    assert store.entry_info("ck", "a")["source"] == "cat.png"
    assert store.delete("ck", "a") is True and store.delete("ck", "a") is False
    assert not store.has("ck", "a") and store.entries("ck") == ["b"]
    assert not any(p.startswith("ck/a/") for p in objects(store, "ck"))
    with pytest.raises(MissingEntry):
        store.get("ck", "a")


def test_replace_and_keep(store: ObjectFeatureStore) -> None:
    store.put("ck", "a", features(1))
    first = store.write_id("ck", "a")
    assert store.put("ck", "a", features(2), replace=False) is False
    assert store.write_id("ck", "a") == first and same(store.get("ck", "a"), features(1))
    assert store.put("ck", "a", features(3)) is True
    assert same(store.get("ck", "a"), features(3)) and store.entries("ck") == ["a"]
    # the replaced write's data is gone: one data prefix per entry
    prefixes = {p.split("/")[2] for p in objects(store, "ck/a")} - {"zarr.json"}
    assert prefixes == {store.write_id("ck", "a")}


def test_entry_layout_marker_names_the_data_prefix(store: ObjectFeatureStore) -> None:
    store.put("ck", "a", features(1))
    marker = json.loads(run(store._store.read("ck/a/zarr.json")))
    attrs = marker["attributes"]
    assert attrs["complete"] is True and attrs["data"] == attrs["write_id"]
    wid = attrs["data"]
    assert f"ck/a/{wid}/up0/features/c.1.0.0.0" in objects(store, "ck/a")
    root = json.loads(run(store._store.read("zarr.json")))
    assert root["attributes"] == {"diffeat": {"format_version": 3}}


def test_data_without_marker_is_invisible_and_a_leftover(store: ObjectFeatureStore) -> None:
    store.put("ck", "a", features(1))
    # a killed writer: its data prefix is there, its marker never was
    prefix = f"ck/b/{'e' * 32}"
    run(store._store.write(f"{prefix}/zarr.json", b"{}"))
    run(store._store.write(f"{prefix}/up0/features/c.0.0.0.0", b"xx"))
    assert not store.has("ck", "b") and store.entries("ck") == ["a"]
    assert store.leftovers(3600.0) == []  # young: might be a live writer's
    assert store.leftovers(0.0) == [f"{store.path}/{prefix}"]
    report = verify_store(store)
    assert report.ok and report.checked == 1  # young leftovers are left alone
    store.remove_leftover(store.leftovers(0.0)[0])
    assert objects(store, "ck/b") == [] and same(store.get("ck", "a"), features(1))
    with pytest.raises(StoreError):
        store.remove_leftover(f"{store.path}/ck/a")


def test_failed_put_leaves_nothing(store: ObjectFeatureStore, monkeypatch) -> None:
    store.put("ck", "a", features(1))

    async def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(store, "_awrite_layer", broken)
    with pytest.raises(StoreError, match="disk on fire"):
        store.put("ck", "a", features(2))
    monkeypatch.undo()
    assert same(store.get("ck", "a"), features(1))
    assert store.leftovers(0.0) == []


def test_put_keeps_an_entry_another_writer_committed_meanwhile(
    store: ObjectFeatureStore, monkeypatch
) -> None:
    other = FeatureStore(store.path)
    real = store._acommit_marker

    async def late(marker, doc, got, replaceable):  # another writer commits first
        await other._aput("ck", "ck/a", *_put_args(other, features(9)), True)
        return await real(marker, doc, got, replaceable)

    monkeypatch.setattr(store, "_acommit_marker", late)
    assert store.put("ck", "a", features(1)) is False
    monkeypatch.undo()
    assert same(store.get("ck", "a"), features(9))
    assert store.leftovers(0.0) == [] and store.entries("ck") == ["a"]


def _put_args(store: FeatureStore, fs: FeatureSet) -> tuple:
    import uuid

    arrays = {n: t.half().numpy() for n, t in fs.layers.items()}
    attrs = {
        "complete": True,
        "write_id": uuid.uuid4().hex,
        "timesteps": list(fs.timesteps),
        "source": None,
        "layers": {n: {"shape": list(a.shape), "dtype": "float16"} for n, a in arrays.items()},
        "meta": {},
    }
    return arrays, np.asarray(fs.timesteps, dtype=np.int64), attrs


def test_verify_finds_and_repairs_damage_and_the_index(store: ObjectFeatureStore) -> None:
    for i in range(3):
        store.put("ck", f"im{i}", features(i))
    wid = store.write_id("ck", "im1")
    run(store._store.write(f"ck/im1/{wid}/up0/features/c.0.0.0.0", b"garbage"))
    with pytest.raises(DamagedEntry, match="crc32c|damaged"):
        store.get("ck", "im1")
    # the index lost an event (a writer killed between its marker and its event)
    run(store._store.delete_many([m for m in objects(store, "ck/_index/log") if "im2" in m]))
    assert store.entries("ck") == ["im0", "im1"] and store.has("ck", "im2")
    report = verify_store(store, repair=True)
    assert [d.image_key for d in report.damaged] == ["im1"] and report.damaged[0].removed
    assert store.entries("ck") == ["im0", "im2"] and not store.has("ck", "im1")
    assert verify_store(store).ok


def test_bad_keys_and_a_marker_pointing_outside(store: ObjectFeatureStore) -> None:
    for bad in ["../x", "a/b", "_index", "zarr.json", "x~y"]:
        with pytest.raises(InvalidKeyError):
            store.put("ck", bad, features(1))
    store.put("ck", "a", features(1))
    raw = json.loads(run(store._store.read("ck/a/zarr.json")))
    raw["attributes"]["data"] = "../../other"
    run(store._store.write("ck/a/zarr.json", json.dumps(raw).encode()))
    with pytest.raises(DamagedEntry, match="data prefix"):
        store.get("ck", "a")


def test_open_errors(s3: LocalS3) -> None:
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore(s3.url(), mode="r")
    url = s3.url()
    FeatureStore(url).put("ck", "a", features(1))
    reader = FeatureStore(url, mode="r")
    assert same(reader.get("ck", "a"), features(1))
    with pytest.raises(StoreError, match="read-only"):
        reader.put("ck", "b", features(1))
    with pytest.raises(StoreError, match="cannot open|Bucket|bucket"):
        FeatureStore("s3://no-such-bucket-here/x.zarr").put("ck", "a", features(1))


def test_pickle_reopens_by_url(store: ObjectFeatureStore) -> None:
    import pickle

    store.put("ck", "a", features(1))
    again = pickle.loads(pickle.dumps(store))
    assert isinstance(again, ObjectFeatureStore) and again.entries("ck") == ["a"]


def test_open_xarray_on_object_storage(store: ObjectFeatureStore) -> None:
    pytest.importorskip("xarray")
    store.put("ck", "a", features(1))
    ds = store.open_xarray("ck", "a", "up0")
    assert ds["features"].shape == (2, 8, 4, 6)
    assert list(ds["timestep"].values) == [10, 11]


def test_delete_cache_key(store: ObjectFeatureStore) -> None:
    store.put("ck", "a", features(1))
    store.put("ck", "b", features(2))
    store.put("other", "a", features(3))
    assert store.has_cache_key("ck") and store.delete_cache_key("ck") == 2
    assert not store.has_cache_key("ck") and list(store.extractors()) == ["other"]


# ---------------------------------------------------------------- the index


def test_has_is_one_request_and_entries_lists_only_the_index(
    store: ObjectFeatureStore, monkeypatch
) -> None:
    for i in range(5):
        store.put("ck", f"im{i}", features(i))
    calls: list[tuple[str, str]] = []
    backend = store._store
    for name in ("read", "read_versioned", "list_objects", "list_dir", "list_dirs"):
        real = getattr(backend, name)

        def spy(key, *a, _real=real, _name=name, **k):
            calls.append((_name, key))
            return _real(key, *a, **k)

        monkeypatch.setattr(backend, name, spy)
    assert store.has("ck", "im3") and calls == [("read", "ck/im3/zarr.json")]
    calls.clear()
    assert store.entries("ck") == [f"im{i}" for i in range(5)]
    assert calls == [
        ("list_objects", "ck/_index/log"),
        ("read_versioned", "ck/_index/manifest.json"),
    ]


def test_index_compaction(store: ObjectFeatureStore, monkeypatch) -> None:
    monkeypatch.setattr(objectstore, "COMPACT_AT", 4)
    monkeypatch.setattr(objectstore, "_CHECK_EVERY", 1)  # every put looks at the log
    for i in range(10):
        store.put("ck", f"im{i}", features(i))
    assert len(objects(store, "ck/_index/log")) < 4  # the writer compacted it
    monkeypatch.setattr(objectstore, "_CHECK_EVERY", 10**9)  # now only entries() does
    store.delete("ck", "im0")
    store.put("ck", "im1", features(20))
    want = [f"im{i}" for i in range(1, 10)]
    assert store.entries("ck") == want  # compacts (>= 4 events)
    assert len(objects(store, "ck/_index/log")) == 0
    manifest = json.loads(run(store._store.read("ck/_index/manifest.json")))
    assert sorted(manifest["entries"]) == want
    assert manifest["entries"]["im1"][0] == store.write_id("ck", "im1")
    assert FeatureStore(store.path, mode="r").entries("ck") == want
    assert store.scan("ck") == (want, [])


def test_merge_index_is_order_free_and_idempotent() -> None:
    def ev(t: int, op: str, key: str, wid: str, replaced: str = "-") -> IndexEvent:
        made = IndexEvent.parse(f"ck/_index/log/{t:020d}~{op}~{key}~{wid}~{t * 10}~{replaced}")
        assert made is not None
        return made

    events = [
        ev(1, "put", "a", "w1"),
        ev(2, "put", "b", "w2"),
        ev(5, "put", "a", "w3", "w1"),  # replaced w1
        ev(3, "delete", "b", "w2"),
        ev(4, "put", "c.png", "w4"),
    ]
    want = {"a": ["w3", 50], "c.png": ["w4", 40]}
    assert merge_index({}, events) == want
    assert merge_index({}, events[::-1]) == want
    assert merge_index(merge_index({}, events), events) == want
    # a stale manifest entry of a replaced write is dropped even if seen late
    assert merge_index({"a": ["w1", 10]}, events[2:3]) == {"a": ["w3", 50]}
    assert IndexEvent.parse("ck/_index/log/garbage") is None


# ---------------------------------------------------------------- several processes

_WRITER = textwrap.dedent(
    """
    import json, os, random, sys, time
    import torch
    from diffeat.core.features import FeatureSet
    from diffeat.store import FeatureStore

    url, go, writer, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = FeatureStore(url)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    order = list(range(keys))
    random.Random(writer).shuffle(order)
    out = []
    for r, replace in enumerate([False, True]):
        for k in order:
            gen = torch.Generator().manual_seed(1000 * writer + 100 * r + k)
            fs = FeatureSet({"l": torch.randn(2, 8, 6, 6, generator=gen)}, (1, 2), {"w": writer})
            mine = store.put(f"r{r}", f"img{k}", fs, replace=replace)
            out.append([r, k, bool(mine)])
    print(json.dumps(out), flush=True)
    """
)


@pytest.mark.slow
def test_concurrent_writer_processes(s3: LocalS3, tmp_path: Path) -> None:
    writers, keys = 3, 6
    url = s3.url()
    FeatureStore(url)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, url, str(go), str(w), str(keys)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    go.write_text("go")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    store = FeatureStore(url, mode="r")
    for k in range(keys):
        winners = [
            w for w in range(writers) for r, kk, mine in results[w] if r == 0 and kk == k and mine
        ]
        assert len(winners) == 1  # replace=False: exactly one write is kept
        got = store.get("r0", f"img{k}")
        gen = torch.Generator().manual_seed(1000 * winners[0] + k)
        assert torch.equal(got.layers["l"], torch.randn(2, 8, 6, 6, generator=gen).half().float())
        # replace=True: whichever is there is one writer's whole entry
        got = store.get("r1", f"img{k}")
        w = got.meta["w"]
        gen = torch.Generator().manual_seed(1000 * w + 100 + k)
        assert torch.equal(got.layers["l"], torch.randn(2, 8, 6, 6, generator=gen).half().float())
    for r in ("r0", "r1"):
        assert store.entries(r) == sorted(f"img{k}" for k in range(keys)) == store.scan(r)[0]
    assert store.leftovers(0.0) == []


@pytest.mark.slow
def test_multi_process_extract_through_the_cli(s3: LocalS3, tiny_sd: Path, tmp_path: Path) -> None:
    from clihelp import DIFFEAT, cli_env, run_json

    from diffeat.testing import smooth_texture

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        f'[extractor]\nplugin = "stable-diffusion"\nmodel = "{tiny_sd}"\nimage_size = [64, 64]\n'
        'layers = ["up_blocks.1.resnets.0.conv2"]\ntimesteps = [10]\nensemble_size = 1\n'
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        smooth_texture((48, 40), seed=200 + i).save(photos / f"{i}.png")
    url = s3.url()
    env = cli_env()
    # two extraction processes over the same images at once, onto one S3 store
    procs = [
        subprocess.Popen(
            [DIFFEAT, "--quiet", "extract", str(cfg), str(photos), "--store", url, "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    info = run_json("store", "info", url)
    (key,) = info["extractors"]
    assert info["format_version"] == 3 and info["extractors"][key]["entries"] == 6
    assert run_json("store", "verify", url)["ok"] is True
    # equal to a single-process extraction on a local disk, entry for entry
    local = tmp_path / "local.zarr"
    run_json("--quiet", "extract", cfg, photos, "--store", local)
    a, b = FeatureStore(url, mode="r"), FeatureStore(local, mode="r")
    assert a.entries(key) == b.entries(key) and len(b.entries(key)) == 6
    for image_key in b.entries(key):
        fa, fb = a.get(key, image_key), b.get(key, image_key)
        assert all(torch.equal(fa.layers[n], fb.layers[n]) for n in fb.layers)
    # every image was computed or found by one of the two, never lost; a rerun computes none
    for report in reports:
        assert (
            report["failed"] == [] and report["computed"] + report["found"] + report["cached"] == 6
        )
    again = run_json("--quiet", "extract", cfg, photos, "--store", url)
    assert again["cached"] == 6 and again["computed"] == 0
    # the store commands on the URL
    listed = run_json("store", "ls", url)
    assert sorted(row["image_key"] for row in listed) == b.entries(key)
    first = b.entries(key)[0]
    run_json("store", "delete", url, "--key", key, "--image", first)
    assert run_json("store", "info", url)["extractors"][key]["entries"] == 5
    assert not FeatureStore(url, mode="r").has(key, first)


# ---------------------------------------------------------------- formats across media


def test_a_format_3_store_copied_to_disk_reads_there(
    store: ObjectFeatureStore, tmp_path: Path
) -> None:
    store.put("ck", "a", features(1))
    store.put("ck", "b", features(2))
    folder = tmp_path / "copy.zarr"
    for key in objects(store):
        target = folder / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(run(store._store.read(key)))
    local = FeatureStore(folder, mode="r")
    assert local.format_version == 3 and local.entries("ck") == ["a", "b"]
    assert same(local.get("ck", "b"), features(2))
    with pytest.raises(StoreError, match="format 3 store"):
        FeatureStore(folder, mode="a")


def test_a_format_2_store_uploaded_reads_but_is_not_written(s3: LocalS3, tmp_path: Path) -> None:
    folder = tmp_path / "disk.zarr"
    FeatureStore(folder).put("ck", "a", features(1))
    url = s3.url()
    from diffeat.store.zarr_io import ZarrObjects

    backend = ZarrObjects(url, read_only=False)
    for path in folder.rglob("*"):
        if path.is_file():
            run(backend.write(path.relative_to(folder).as_posix(), path.read_bytes()))
    remote = FeatureStore(url, mode="r")
    assert remote.format_version == 2 and remote.entries("ck") == ["a"]
    assert same(remote.get("ck", "a"), features(1))
    assert remote.info()["extractors"]["ck"]["entries"] == 1
    with pytest.raises(StoreError, match="format 2 store"):
        FeatureStore(url, mode="a")


def test_a_failing_server_is_a_store_error(store: ObjectFeatureStore, monkeypatch) -> None:
    import obstore

    async def refused(*args, **kwargs):
        raise obstore.exceptions.GenericError("connection refused")

    monkeypatch.setattr(obstore, "put_async", refused)
    with pytest.raises(StoreError, match="connection refused"):
        store.put("ck", "a", features(1))
    monkeypatch.undo()
    assert not store.has("ck", "a") and store.leftovers(0.0) == []


def test_opening_while_another_process_creates_the_store(s3: LocalS3, monkeypatch) -> None:
    """The root zarr.json of a store another process is creating lands between this
    process's read of it and its listing: the open looks again instead of calling the
    prefix foreign (seen as a flaky two-process extraction)."""
    url = s3.url()
    FeatureStore(url)  # the other process: creates zarr.json
    reads = []
    real = ObjectFeatureStore._read_now

    def first_read_misses(self, key):
        reads.append(key)
        return None if len(reads) == 1 else real(self, key)

    monkeypatch.setattr(ObjectFeatureStore, "_read_now", first_read_misses)
    opened = FeatureStore(url)
    assert opened.format_version >= 3 and len(reads) >= 2

    # a slow creator (a loaded machine): the root is missing for several looks, not one
    import diffeat.store.objectstore as objectstore

    monkeypatch.setattr(objectstore, "OPEN_RETRY_DELAYS_S", (0.0,) * 6)
    reads.clear()

    def five_reads_miss(self, key):
        reads.append(key)
        return None if len(reads) <= 5 else real(self, key)

    monkeypatch.setattr(ObjectFeatureStore, "_read_now", five_reads_miss)
    assert FeatureStore(url).format_version >= 3 and len(reads) == 6


def test_opening_an_empty_prefix_while_another_process_creates_the_store(
    s3: LocalS3, monkeypatch
) -> None:
    """This process finds no root and an empty prefix; the other process's root lands
    before this one creates its own: the conditional create loses and the open reads
    the winner's root (the race behind the flaky two-process S3 extraction in CI)."""
    from diffeat.store.format import OBJECT_FORMAT_VERSION, ROOT_ATTR, group_json
    from diffeat.store.zarr_io import ZarrObjects

    url = s3.url()
    real_any = ZarrObjects.any_object
    looks: list[bool] = []

    async def empty_at_first_look(self, prefix: str = "") -> bool:
        if not looks:
            looks.append(False)
            # the other process creates the store right after our look
            theirs = {"format_version": OBJECT_FORMAT_VERSION, "creator": "other"}
            assert await self.create("zarr.json", group_json({ROOT_ATTR: theirs}))
            return False
        looks.append(await real_any(self, prefix))
        return looks[-1]

    monkeypatch.setattr(ZarrObjects, "any_object", empty_at_first_look)
    opened = FeatureStore(url)
    assert opened.format_version >= 3 and looks[0] is False
    root = json.loads(run(opened._store.read("zarr.json")))
    assert root["attributes"][ROOT_ATTR]["creator"] == "other"  # theirs, not overwritten


def test_objects_that_go_while_the_open_waits_leave_a_created_store(
    s3: LocalS3, monkeypatch
) -> None:
    """Objects without a root at every look but the last, where the prefix is empty: the
    open creates the root then and opens it (no false "holds objects" error)."""
    import diffeat.store.objectstore as objectstore
    from diffeat.store.zarr_io import ZarrObjects

    monkeypatch.setattr(objectstore, "OPEN_RETRY_DELAYS_S", (0.0,) * 6)
    looks: list[int] = []

    async def objects_until_the_last_look(self, prefix: str = "") -> bool:
        looks.append(1)
        return len(looks) <= 6

    monkeypatch.setattr(ZarrObjects, "any_object", objects_until_the_last_look)
    assert FeatureStore(s3.url()).format_version >= 3 and len(looks) == 7


def test_cache_key_bytes_is_what_info_reports_for_the_key(s3: LocalS3) -> None:
    store = FeatureStore(s3.url())
    for key, n in (("ck", 3), ("other", 1)):
        for i in range(n):
            store.put(key, f"img{i}", FeatureSet({"l": torch.ones(1, 4, 3, 3)}, [1]))
    info = store.info()["extractors"]
    assert store.cache_key_bytes("ck") == info["ck"]["bytes"] > 0
    assert store.cache_key_bytes("other") == info["other"]["bytes"] < info["ck"]["bytes"]
