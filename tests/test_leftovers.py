"""Leftovers of killed writers are removed by the next writer once they are old enough:
the store's ``*.partial`` staging folders and temporary files, and the hidden ``.tmp``
files of interrupted checkpoint saves. Fresh ones (a live writer's) are kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from diffeat.core.features import FeatureSet
from diffeat.store import FeatureStore
from diffeat.store.featurestore import LEFTOVER_AGE_S, leftover_age

OLD = time.time() - LEFTOVER_AGE_S - 600


def _fs(seed: int) -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    return FeatureSet({"a": torch.randn(1, 2, 3, 3, generator=gen)}, (10,), {})


def _age_tree(path: Path, when: float) -> None:
    """Set the mtime of ``path`` and everything inside to ``when``."""
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for name in [*dirs, *files]:
            os.utime(Path(dirpath) / name, (when, when))
    os.utime(path, (when, when))


def _staging(folder: Path, name: str, when: float | None) -> Path:
    path = folder / name
    (path / "a" / "features").mkdir(parents=True)
    (path / "a" / "features" / "c.0.0.0.0").write_bytes(b"x" * 10)
    if when is not None:
        _age_tree(path, when)
    return path


def test_next_writer_removes_old_leftovers_and_keeps_fresh_ones(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    FeatureStore(path).put("ck", "img0", _fs(0))  # a store with the cache key's folder
    ck = path / "ck"
    old = _staging(ck, "img1.0123abcd.partial", OLD)  # a writer killed two hours ago
    fresh = _staging(ck, "img2.4567cdef.partial", None)  # a live writer's
    live = _staging(ck, "img3.89abcdef.partial", OLD)  # old folder, a chunk just written
    (live / "a" / "features" / "c.1.0.0.0").write_bytes(b"y")
    old_tmp = ck / "zarr.json.0a1b2c3d.partial"  # zarr's temporary file, killed mid-rename
    old_tmp.write_bytes(b"{")
    os.utime(old_tmp, (OLD, OLD))
    root_tmp = path / "zarr.json.9f8e7d6c.partial"
    root_tmp.write_bytes(b"{")
    os.utime(root_tmp, (OLD, OLD))
    fresh_tmp = ck / "zarr.json.feedbeef.partial"
    fresh_tmp.write_bytes(b"{")
    trash = ck / "img4.0badf00d.deleted.partial"  # a delete in progress: renamed just now
    (trash / "a").mkdir(parents=True)
    _age_tree(trash, OLD)  # its files are old, but the rename (ctime) is new

    store = FeatureStore(path)  # the next writer
    assert all(p.exists() for p in (old, old_tmp, root_tmp))  # opening alone removes nothing
    store.put("ck", "img5", _fs(5))
    assert not old.exists() and not old_tmp.exists() and not root_tmp.exists()
    assert fresh.exists() and live.exists() and fresh_tmp.exists() and trash.exists()
    assert torch.equal(store.get("ck", "img5").layers["a"], _fs(5).layers["a"].half())
    assert store.has("ck", "img0")


def test_own_writes_in_progress_are_never_swept(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore(path)
    store.put("ck", "img0", _fs(0))
    mine = _staging(path / "ck", "img1.0123abcd.partial", OLD)
    other = _staging(path / "ck", "img2.4567cdef.partial", OLD)
    store._writing.add("0123abcd")
    assert store.sweep_leftovers("ck") == [other]
    assert mine.exists() and not other.exists()


def test_leftover_age_is_the_newest_change_inside(tmp_path: Path) -> None:
    path = _staging(tmp_path, "x.partial", OLD)
    assert leftover_age(path) > LEFTOVER_AGE_S
    (path / "a" / "new").write_bytes(b"")
    assert leftover_age(path) < 60


def test_next_checkpoint_save_removes_old_temporary_files(tmp_path: Path) -> None:
    from diffeat.plugins.hyperfeatures.checkpoint import (
        STALE_TMP_AGE_S,
        load_checkpoint,
        save_checkpoint,
    )
    from diffeat.plugins.hyperfeatures.network import AggregationNetwork

    out = tmp_path / "agg.safetensors"
    old = tmp_path / ".agg.safetensors.k1ll3d.tmp"  # a save killed long ago
    fresh = tmp_path / ".agg.safetensors.l1v3.tmp"  # another process saving right now
    other = tmp_path / ".other.safetensors.k1ll3d.tmp"  # another checkpoint's: not ours
    for tmp in (old, fresh, other):
        tmp.write_bytes(b"partial")
    when = time.time() - STALE_TMP_AGE_S - 60
    os.utime(old, (when, when))
    os.utime(other, (when, when))
    net = AggregationNetwork([("a", 12)], [10], projection_dim=32, norm_groups=8, size=(12, 10))
    save_checkpoint(out, net)
    assert not old.exists()
    assert fresh.exists() and other.exists()
    assert load_checkpoint(out).layers == [("a", 12)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == sorted(
        [fresh.name, other.name]
    )  # the save's own temporary file is gone too


def test_verify_repair_uses_the_same_age_rule(tmp_path: Path) -> None:
    from diffeat.store.verify import verify_store

    path = tmp_path / "s.zarr"
    store = FeatureStore(path)
    store.put("ck", "img0", _fs(0))
    old = _staging(path / "ck", "img1.0123abcd.partial", OLD)
    live = _staging(path / "ck", "img3.89abcdef.partial", OLD)
    (live / "a" / "features" / "c.1.0.0.0").write_bytes(b"y")  # a live writer's new chunk
    report = verify_store(store, repair=True)
    assert report.leftovers == [str(old)]
    assert not old.exists() and live.exists()
