"""``diffeat store verify [--repair]`` and ``diffeat store delete`` through the real CLI, and
what damaged metadata says (tests/test_store.py has the store's own reading checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clihelp import run, run_json

from diffeat.core.features import FeatureSet
from diffeat.store import DamagedRootError, FeatureStore
from diffeat.store.verify import verify_store

INFO = {"plugin": "color-blur", "config": {"s": 1}, "model": {"id": "none"}, "layers": []}


def _fs(seed: int, nan: bool = False) -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    layers = {
        "a": torch.randn(2, 4, 3, 3, generator=gen),
        "b": torch.randn(2, 2, 2, 2, generator=gen),
    }
    if nan:
        layers["a"][1, 0, 0, 0] = float("nan")
    return FeatureSet(layers, (10, 20), {})


def _damaged_store(path: Path) -> FeatureStore:
    """Entries: ok1, ok2 sound; chunk (a chunk file deleted), dtype (metadata edited),
    nan (non-finite values); plus an incomplete entry and a leftover of a killed writer."""
    store = FeatureStore(path)
    store.register_extractor("ck", INFO)
    for i, key in enumerate(["ok1", "ok2", "chunk", "dtype", "nan", "half"]):
        store.put("ck", key, _fs(i, nan=key == "nan"))
    (path / "ck" / "chunk" / "a" / "features" / "c.1.0.0.0").unlink()
    meta = path / "ck" / "dtype" / "b" / "features" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "int16"
    meta.write_text(json.dumps(doc))
    marker = path / "ck" / "half" / "zarr.json"
    doc = json.loads(marker.read_text())
    doc["attributes"]["complete"] = False
    marker.write_text(json.dumps(doc))
    (path / "ck" / "img9.0123abcd.deleted.partial" / "a").mkdir(parents=True)
    return store


def test_verify_reports_damage_and_repair_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _damaged_store(path)

    proc = run("store", "verify", path, check=1)
    out = proc.stdout
    assert "5 entries checked, 3 damaged: damaged" in out
    assert "ck/chunk" in out and "c.1.0.0.0" in out and "missing" in out
    assert "ck/dtype" in out and "int16" in out
    assert "ck/nan" in out and "1 NaN or infinite values" in out
    assert "1 incomplete entries under ck" in out and "deleted.partial" in out
    assert "diffeat store verify --repair" in proc.stderr

    report = run_json("store", "verify", path, "--repair")
    assert report["checked"] == 5 and report["repaired"]
    assert sorted(d["image_key"] for d in report["damaged"] if d["removed"]) == [
        "chunk",
        "dtype",
        "nan",
    ]
    store = FeatureStore(path, mode="r")
    assert store.entries("ck") == ["ok1", "ok2"]
    assert sorted(p.name for p in (path / "ck").iterdir()) == ["ok1", "ok2", "zarr.json"]
    assert torch.equal(store.get("ck", "ok2").layers["a"], _fs(1).layers["a"].half().float())

    assert "2 entries checked, 0 damaged: ok" in run("store", "verify", path).stdout


def test_repaired_entries_are_recomputed_by_the_next_extract(
    manager, tmp_path: Path, texture_files: list[Path]
) -> None:
    from diffeat.core.images import as_input
    from diffeat.core.pipeline import Pipeline

    pipe = Pipeline.from_dict(
        {"extractor": {"plugin": "color-blur", "image_size": [32, 32]}},
        store=tmp_path / "f.zarr",
        manager=manager,
    )
    pipe.extract(texture_files)
    key = as_input(texture_files[0]).key
    features = tmp_path / "f.zarr" / pipe.cache_key / key / "color" / "features"
    next(features.glob("c.*")).unlink()
    report = pipe.extract(texture_files)  # the marker says complete: counted as stored ...
    assert (report.cached, report.computed) == (3, 0)
    verify = verify_store(FeatureStore(tmp_path / "f.zarr"), repair=True)
    assert [d.image_key for d in verify.damaged] == [key]
    report = pipe.extract(texture_files)  # ... until verify --repair removed it
    assert (report.cached, report.computed) == (2, 1)
    assert verify_store(FeatureStore(tmp_path / "f.zarr", mode="r")).ok


def test_delete_an_entry_or_a_cache_key(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore(path)
    store.register_extractor("ck", INFO)
    store.register_extractor("other", INFO)
    for key in ("x", "y"):
        store.put("ck", key, _fs(0))
        store.put("other", key, _fs(1))

    assert (
        "removed entry ck/x" in run("store", "delete", path, "--key", "ck", "--image", "x").stdout
    )
    assert store.entries("ck") == ["y"]
    proc = run("store", "delete", path, "--key", "ck", "--image", "x", check=2)
    assert "no entry 'x' under cache key 'ck'" in proc.stderr and "store ls" in proc.stderr

    report = run_json("store", "delete", path, "--key", "other")
    assert report["removed"] == 2
    assert list(store.extractors()) == ["ck"] and not (path / "other").exists()
    proc = run("store", "delete", path, "--key", "other", check=2)
    assert "no cache key 'other'" in proc.stderr
    proc = run("store", "delete", tmp_path / "nowhere", "--key", "ck", check=2)
    assert "no feature store" in proc.stderr and not (tmp_path / "nowhere").exists()


def test_garbled_extractor_info_is_reported_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore(path)
    store.register_extractor("ck", INFO)
    store.put("ck", "x", _fs(0))
    (path / "ck" / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_ty')

    assert store.entries("ck") == ["x"]
    info = store.info()["extractors"]["ck"]
    assert info["entries"] == 1 and "not readable" in info["damaged"]
    out = run("store", "info", path).stdout
    assert "ck: extractor info damaged" in out and "1 complete entries" in out
    assert "rewrites it" in out and f"diffeat store delete {path} --key ck" in out
    proc = run("store", "verify", path, check=1)
    assert "damaged extractor info" in proc.stdout

    store.register_extractor("ck", INFO)  # what extract with the same config does
    assert store.extractors() == {"ck": INFO}
    assert verify_store(store).ok and not verify_store(store).damaged_info


def test_missing_root_metadata_says_what_is_damaged_and_how_to_recover(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore(path)
    store.register_extractor("ck", INFO)
    store.put("ck", "x", _fs(0))
    (path / "zarr.json").unlink()

    for mode in ("r", "a"):
        with pytest.raises(DamagedRootError) as exc:
            FeatureStore(path, mode=mode)  # type: ignore[arg-type]
        msg = str(exc.value)
        assert "root metadata" in msg and "is missing" in msg and "cache keys ck" in msg
        assert f"diffeat store verify --repair {path}" in msg
    proc = run("store", "info", path, check=2)
    assert "is missing" in proc.stderr and "verify --repair" in proc.stderr

    (path / "zarr.json").write_bytes(b"\x00garbage")
    with pytest.raises(DamagedRootError, match="is not readable"):
        FeatureStore(path)

    out = run("store", "verify", "--repair", path).stdout
    assert "rewrote" in out and "1 entries checked, 0 damaged: ok" in out
    assert FeatureStore(path, mode="r").entries("ck") == ["x"]


def test_extract_that_finds_everything_rewrites_garbled_extractor_info(
    manager, tmp_path: Path, texture_files: list[Path]
) -> None:
    """A cache key's zarr.json garbled after extraction: a rerun of `extract` that computes
    nothing (every entry found) still rewrites it, as `store verify` promises."""
    from diffeat.core.pipeline import Pipeline

    config = {"extractor": {"plugin": "color-blur"}, "matcher": {"plugin": "nearest"}}
    path = tmp_path / "s.zarr"
    Pipeline.from_dict(config, manager=manager, store=FeatureStore(path)).extract(texture_files)
    (key,) = FeatureStore(path).extractors()
    info = FeatureStore(path).extractors()[key]
    (path / key / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_ty')
    assert list(FeatureStore(path).damaged_extractors()) == [key]

    store = FeatureStore(path)
    report = Pipeline.from_dict(config, manager=manager, store=store).extract(texture_files)
    assert report.cached == len(texture_files) and report.computed == 0
    assert not store.damaged_extractors() and store.extractors()[key] == info
    assert verify_store(store).ok
    # a sound store opened read-only: found, nothing written, no error
    read_only = FeatureStore(path, mode="r")
    report = Pipeline.from_dict(config, manager=manager, store=read_only).extract(texture_files)
    assert report.cached == len(texture_files) and not report.failed
