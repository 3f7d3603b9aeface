"""Several real processes writing the same entries of one store at once, many rounds.

Every writer of an image key must end well: exactly one write per key is the one in
the store (the others are told another writer's entry was kept), every entry is
complete and whole (one writer's values, never a mixture), nothing is left behind,
and no writer fails. The processes start together on a file written by the test
(an event, not a sleep).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from waiting import HANG_GUARD_S

from diffeat.core.features import FeatureSet
from diffeat.store import FeatureStore

WRITERS = 4
ROUNDS = 4
KEYS = 8

_WRITER = textwrap.dedent(
    """
    import json, os, random, sys, time
    import torch
    from diffeat.core.features import FeatureSet
    from diffeat.store import FeatureStore

    path, go, writer, rounds, keys = sys.argv[1:6]
    writer, rounds, keys = int(writer), int(rounds), int(keys)
    store = FeatureStore(path)
    print("ready", flush=True)
    while not os.path.exists(go):  # all writers start at once
        time.sleep(0.001)
    rng = random.Random(writer)
    out = []
    for r in range(rounds):
        order = list(range(keys))
        rng.shuffle(order)  # same keys, different orders: collisions everywhere
        for k in order:
            gen = torch.Generator().manual_seed(1000 * writer + 10 * r + k)
            fs = FeatureSet(
                {f"l{j}": torch.randn(2, 16, 24, 24, generator=gen) for j in range(3)},
                (1, 2),
                {"writer": writer},
            )
            # even rounds keep the first complete entry, odd rounds replace
            mine = store.put(f"round{r}", f"img{k}", fs, source=str(writer), replace=r % 2 == 1)
            out.append([r, k, bool(mine)])
    print(json.dumps(out), flush=True)
    """
)


def _features(writer: int, r: int, k: int) -> FeatureSet:
    gen = torch.Generator().manual_seed(1000 * writer + 10 * r + k)
    return FeatureSet(
        {f"l{j}": torch.randn(2, 16, 24, 24, generator=gen) for j in range(3)}, (1, 2)
    )


def _race(tmp_path: Path) -> tuple[Path, list[list[list]]]:
    path = tmp_path / "shared.zarr"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(go), str(w), str(ROUNDS), str(KEYS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WRITERS)
    ]
    try:
        for proc in procs:  # wait until every writer has opened the store
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()  # type: ignore[union-attr]
        go.write_text("")
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=HANG_GUARD_S)  # a hang guard
            assert proc.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return path, results


def _check_store(path: Path, results: list[list[list]]) -> None:
    store = FeatureStore(path, mode="r")
    wins: dict[tuple[int, int], list[int]] = {}
    for writer, rows in enumerate(results):
        assert len(rows) == ROUNDS * KEYS
        for r, k, mine in rows:
            if mine:
                wins.setdefault((r, k), []).append(writer)
    for r in range(ROUNDS):
        assert store.entries(f"round{r}") == [f"img{k}" for k in range(KEYS)]
        for k in range(KEYS):
            got = store.get(f"round{r}", f"img{k}")
            owner = int(store.entry_info(f"round{r}", f"img{k}")["source"])
            winners = wins.get((r, k), [])
            if r % 2:  # each put either replaced or kept; the last one in place is a winner
                assert owner in winners
            else:  # the first complete entry is kept: exactly one writer's put is in place
                assert winners == [owner]
            want = _features(owner, r, k)
            for name, tensor in want.layers.items():  # one writer's values, whole
                assert torch.equal(got.layers[name], tensor.half().float())
        # no staging or removal leftovers, nothing incomplete
        names = sorted(p.name for p in (path / f"round{r}").iterdir())
        assert names == sorted(["zarr.json", *(f"img{k}" for k in range(KEYS))])
    assert all(v["incomplete"] == 0 for v in store.info()["extractors"].values())


@pytest.mark.slow
def test_writers_of_the_same_entries_cooperate(tmp_path: Path) -> None:
    """Keeping rounds: the first complete entry stays, every other writer is told so;
    replacing rounds: every put succeeds, the entry left is one writer's, whole."""
    path, results = _race(tmp_path)
    _check_store(path, results)
    # the rounds really collided: more than one writer got to some key first
    winners = {w for w, rows in enumerate(results) for r, _k, mine in rows if mine and r % 2 == 0}
    assert len(winners) > 1


def test_a_source_uses_and_reports_entries_another_writer_stored_meanwhile(
    manager, tmp_path: Path, texture_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffeat.core.pipeline import Pipeline
    from diffeat.testing import ColorBlurExtractor

    data = {"extractor": {"plugin": "color-blur", "image_size": [32, 32]}}
    ours = Pipeline.from_dict(data, store=tmp_path / "f.zarr", manager=manager)
    other = Pipeline.from_dict(data, store=tmp_path / "f.zarr", manager=manager)
    original = ColorBlurExtractor.extract
    state = {"other_ran": False}

    def extract(self, images):  # another writer stores the same images while we compute
        if not state["other_ran"]:
            state["other_ran"] = True
            report = other.extract(texture_files)
            assert (report.computed, report.found) == (3, 0)
        return original(self, images)

    monkeypatch.setattr(ColorBlurExtractor, "extract", extract)
    report = ours.extract(texture_files)
    # the batch being computed was found stored; the rest was stored before we reached it
    found = report.found
    assert found >= 1
    assert (report.total, report.computed, report.cached) == (3, 0, 3 - found)
    assert report.failed == []

    # features() uses what is stored (the other writer's entry), read back from the store
    state["other_ran"] = False
    fresh = tmp_path / "g.zarr"
    ours = Pipeline.from_dict(data, store=fresh, manager=manager)
    other = Pipeline.from_dict(data, store=fresh, manager=manager)
    got = ours.features(texture_files)
    stored = FeatureStore(fresh, mode="r")
    for path, fs in zip(texture_files, got):
        from diffeat.core.images import as_input

        want = stored.get(ours.cache_key, as_input(path).key)
        assert torch.equal(fs.layers["color"].cpu(), want.layers["color"])


@pytest.mark.slow
def test_diffeat_extract_processes_with_overlapping_images(tiny_sd, tmp_path: Path) -> None:
    """The reported case through the real CLI: several `diffeat extract` runs into one store
    on overlapping images all succeed, each entry is computed and kept exactly once."""
    from clihelp import DIFFEAT, cli_env

    from diffeat.store.verify import verify_store
    from diffeat.testing import smooth_texture

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        f'[extractor]\nplugin = "stable-diffusion"\nmodel = "{tiny_sd}"\nimage_size = [64, 64]\n'
        'layers = ["up_blocks.1.resnets.0.conv2"]\ntimesteps = [10]\nensemble_size = 1\n'
    )
    images = []
    for i in range(8):
        images.append(tmp_path / f"{i}.png")
        smooth_texture((48, 40), seed=i).save(images[-1])
    store = tmp_path / "feats.zarr"
    shares = [images, images[::-1], images[2:] + images[:2]]  # all overlap, other orders
    procs = [
        subprocess.Popen(
            [
                DIFFEAT,
                "--quiet",
                "extract",
                str(cfg),
                *map(str, share),
                "--store",
                str(store),
                "--json",
            ],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for share in shares
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    for report in reports:
        assert report["computed"] + report["cached"] + report["found"] == report["images"] == 8
        assert report["failed"] == []
    assert sum(r["computed"] for r in reports) == 8  # each entry is written once, then used
    opened = FeatureStore(store, mode="r")
    (key,) = opened.extractors()
    assert len(opened.entries(key)) == 8
    assert verify_store(opened).ok


@pytest.mark.parametrize("held", ["an entry", "another folder"])
def test_a_root_that_lands_between_two_looks_opens_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: str
) -> None:
    """The first read of zarr.json misses (another process is creating the store) and by the
    time the folder is looked at it holds an entry or a cache-key folder: the open reads the
    root again instead of calling the store damaged or foreign."""
    path = tmp_path / "feats.zarr"
    store = FeatureStore(path)
    if held == "an entry":
        store.put("ck", "img", FeatureSet({"l": torch.ones(1, 2, 3, 3)}, [1]))
    else:
        (path / "ck").mkdir()
    real = FeatureStore._read_now
    reads: list[str] = []

    def first_root_read_misses(self, key):
        reads.append(key)
        return None if key == "zarr.json" and reads.count(key) == 1 else real(self, key)

    monkeypatch.setattr(FeatureStore, "_read_now", first_root_read_misses)
    assert FeatureStore(path).format_version == store.format_version
    assert reads.count("zarr.json") == 2
