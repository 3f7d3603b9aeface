"""Reliability trials of the real ``diffeat`` command: crashes, concurrent writers, store
corruption and bad inputs, each counted and checked against what should happen.

Every trial runs ``python -m diffeat ...`` in subprocesses (the installed command, as a
user runs it) on a tiny random-weight Stable Diffusion model from ``diffeat.testing``
(built into a temporary folder, offline) and synthetic PNG images on disk. Features are
compared bit for bit with a clean single-process extraction of the same images (the
reference store); ``OMP_NUM_THREADS`` defaults to 1 in the subprocesses so that two runs
compute the same bits.

Families (``--only``, comma-separated):

- ``crashes``: ``--rounds`` SIGKILLs of ``diffeat extract`` at a random point, each
  followed by a rerun that is itself the next round's victim (so every rerun is a resume
  of a killed run), then a last rerun to the end. A round kills either after a random
  delay from the start (often while the model loads) or once the store holds 1-2 more
  complete entries than before, plus a random fraction of one image's time (so some kills
  land while an entry is being written). Counted: entries complete before a kill and gone
  after it (lost), entries that read as complete but are unreadable or differ from the
  clean run (half entries), the last rerun's report (only the missing images computed),
  every entry bitwise equal to the clean run, ``store verify`` clean.
- ``writers``: ``--writer-rounds`` rounds of ``--writers`` ``diffeat extract`` processes
  started together into one new store on overlapping random subsets of the images, in
  different orders. Counted: processes exiting non-zero, entries incomplete at the end,
  entries missing or differing from the clean run, ``computed`` (must add up to the
  number of distinct images: each entry written once) and ``found`` (an image another
  process stored while this one computed it: duplicated work, not an error).
- ``corruption``: damage done to copies of the reference store: a deleted chunk file,
  flipped bytes in a chunk, an array's ``data_type`` edited, a truncated chunk (four
  entries of one store), garbled cache-key metadata, the deleted root ``zarr.json``. Per
  kind: ``store verify`` reports it (exit 1, or exit 2 with the way out for the root),
  ``diffeat match`` on the damaged image refuses with exit 2 and a message naming
  ``store verify --repair`` and no traceback (garbled cache-key metadata: match works, the
  entries are sound and the info is rewritten), and ``store verify --repair`` then
  ``extract`` leaves every entry bitwise equal to the clean run and ``verify`` clean.
- ``inputs``: bad inputs: a decompression-bomb PNG (a real 30000 x 30000 1-bit PNG, 0.1 MB
  on disk, 900 megapixels) and a corrupt PNG in one folder with good images,
  ``--device cuda:7``, a folder without images, a dataset annotation whose image path
  escapes the dataset root, an unknown plugin name, a TOML syntax error. Per input: exit 2,
  a message naming the file or value, no traceback, and (bomb, corrupt image) the other
  images of the run stored.

Each row of the table is one check: trial, rounds, what happened, what should happen and
OK / FAIL. The script exits 1 when a row fails.

    python benchmarks/bench_reliability.py                         # ~5 min on 2 CPU cores
    python benchmarks/bench_reliability.py --rounds 40 --writer-rounds 3 --json out.json
    python benchmarks/bench_reliability.py --only corruption,inputs --markdown table.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import OUT, write_json

FAMILIES = ("crashes", "writers", "corruption", "inputs")
IMAGES = 24  # images of the crash and writer trials (64 x 48 PNGs)
CONFIG = """[extractor]
plugin = "stable-diffusion"
model = "{model}"
image_size = [128, 128]
layers = ["up_blocks.*.resnets.*.conv2"]
timesteps = [10, 300]
ensemble_size = 4
"""
DIFFEAT = [sys.executable, "-m", "diffeat"]
WORK: Path | None = None  # the work folder, shortened to <tmp> in the table


@dataclass
class Row:
    """One checked outcome."""

    family: str
    trial: str
    rounds: int
    outcome: str
    expected: str
    ok: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    """What every trial shares: the folder, the config, the images and the clean run."""

    root: Path
    config: Path
    images: list[Path]
    env: dict[str, str]
    cache_key: str = ""
    reference: dict[str, dict[str, Any]] = field(default_factory=dict)  # image key -> layers
    keys: dict[Path, str] = field(default_factory=dict)  # image file -> image key
    timeout: float = 600.0


# -- running the command -------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DIFFEAT_QUIET": "1"})
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("DIFFEAT_STORE", None)
    return env


def run(bench: Bench, *args: Any) -> subprocess.CompletedProcess:
    """``diffeat --quiet ARGS`` to the end; stdout and stderr captured."""
    return subprocess.run(
        [*DIFFEAT, "--quiet", *map(str, args)],
        capture_output=True,
        text=True,
        env=bench.env,
        timeout=bench.timeout,
    )


def start(bench: Bench, *args: Any, log: Path) -> subprocess.Popen:
    """``diffeat --quiet ARGS`` in the background, stdout and stderr into ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [*DIFFEAT, "--quiet", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=bench.env,
            text=True,
        )


def traceback_in(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def first_line(text: str, width: int = 160) -> str:
    """The first non-empty line of ``text`` (an error message), cut to ``width``; paths in
    the work folder are shortened to ``<tmp>/.../name`` (their last part)."""
    if WORK is not None:
        text = re.sub(re.escape(str(WORK)) + r"(/[^\s:'\"(),]+)", _short, text)
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= width else line[: width - 3] + "..."
    return ""


def _short(match: re.Match[str]) -> str:
    parts = match.group(1).strip("/").split("/")
    return "<tmp>/" + parts[0] if len(parts) == 1 else "<tmp>/.../" + parts[-1]


# -- the store, read from this process -----------------------------------------------------------


def open_store(path: Path) -> Any:
    from diffeat.store import FeatureStore

    return FeatureStore(path, mode="r")


def complete_entries(path: Path, cache_key: str) -> set[str]:
    """Image keys of the complete entries (an empty set while there is no store yet)."""
    try:
        return set(open_store(path).entries(cache_key))
    except Exception:  # no store or no cache key yet
        return set()


def compare(bench: Bench, path: Path, image_keys: set[str] | None = None) -> dict[str, list]:
    """Each complete entry of ``path`` (or ``image_keys`` of them) against the clean run:
    ``equal``, ``differ`` (values or layers not bit for bit the same), ``unreadable`` (``get``
    fails), ``missing`` (of ``image_keys``, not stored)."""
    result: dict[str, list] = {"equal": [], "differ": [], "unreadable": [], "missing": []}
    if image_keys is not None and not image_keys:  # e.g. killed before the store existed
        return result
    import torch

    store = open_store(path)
    stored = set(store.entries(bench.cache_key))
    wanted = stored if image_keys is None else set(image_keys)
    for key in sorted(wanted):
        if key not in stored:
            result["missing"].append(key)
            continue
        try:
            layers = store.get(bench.cache_key, key).layers
        except Exception as exc:  # a half entry that reads as complete
            result["unreadable"].append(f"{key}: {exc}")
            continue
        want = bench.reference[key]
        same = set(layers) == set(want) and all(torch.equal(layers[n], want[n]) for n in want)
        result["equal" if same else "differ"].append(key)
    return result


def verified(path: Path) -> tuple[bool, dict[str, Any]]:
    """``verify_store`` in this process (no command start): ok (damaged extractor info
    counts as not ok, as ``diffeat store verify`` exits 1 on it), and the report."""
    from diffeat.store import FeatureStore
    from diffeat.store.verify import verify_store

    report = verify_store(FeatureStore(path, mode="r"))
    return report.ok and not report.damaged_info, report.to_dict()


def verify_json(bench: Bench, path: Path) -> tuple[int, dict[str, Any] | None, str]:
    """``diffeat store verify PATH --json``: exit code, the report (None if unreadable), stderr."""
    proc = run(bench, "store", "verify", path, "--json")
    try:
        return proc.returncode, json.loads(proc.stdout), proc.stderr
    except ValueError:
        return proc.returncode, None, proc.stderr


# -- setup ---------------------------------------------------------------------------------------


def setup(root: Path, timeout: float) -> Bench:
    """The tiny model, the images, the pipeline file and the clean reference extraction."""
    from diffeat.core.images import as_input
    from diffeat.testing import build_tiny_stable_diffusion, smooth_texture

    model = build_tiny_stable_diffusion(root / "model")
    config = root / "tiny.toml"
    config.write_text(CONFIG.format(model=model.as_posix()))
    photos = root / "photos"
    photos.mkdir()
    images = []
    for i in range(IMAGES):
        images.append(photos / f"{i:02d}.png")
        smooth_texture((64, 48), seed=100 + i).save(images[-1])
    bench = Bench(root, config, images, cli_env(), timeout=timeout)
    bench.keys = {p: as_input(p).key for p in images}
    ref = root / "reference.zarr"
    t0 = time.perf_counter()
    proc = run(bench, "extract", config, photos, "--store", ref, "--json")
    if proc.returncode != 0:
        sys.exit(f"the clean reference extraction failed (exit {proc.returncode}):\n{proc.stderr}")
    bench.cache_key = json.loads(proc.stdout)["cache_key"]
    store = open_store(ref)
    bench.reference = {
        key: store.get(bench.cache_key, key).layers for key in store.entries(bench.cache_key)
    }
    if set(bench.reference) != set(bench.keys.values()):
        sys.exit("the clean reference extraction did not store every image")
    print(f"setup: clean reference run of {IMAGES} images in {time.perf_counter() - t0:.1f} s")
    return bench


# -- crashes -------------------------------------------------------------------------------------


def crashes(bench: Bench, rounds: int, rng: random.Random) -> list[Row]:
    """SIGKILL ``diffeat extract`` ``rounds`` times, each rerun being the next victim."""
    store = bench.root / "crash.zarr"
    photos = bench.images[0].parent
    before: set[str] = set()
    kills, ended, lost, half, differ = 0, 0, 0, 0, 0
    log: list[dict[str, Any]] = []
    per_image = 0.5  # seconds; updated from the rounds that extracted something
    for r in range(rounds):
        proc = start(
            bench, "extract", bench.config, photos, "--store", store, log=bench.root / "crash.log"
        )
        t0 = time.perf_counter()
        by_delay = rng.random() < 0.25
        if by_delay:  # anywhere from the start to about when extraction begins
            delay = rng.uniform(0.0, 8.0)
            while proc.poll() is None and time.perf_counter() - t0 < delay:
                time.sleep(0.02)
            point = f"{delay:.2f} s after start"
        else:
            want = len(before) + rng.randint(1, 2)
            first = None
            while proc.poll() is None and time.perf_counter() - t0 < bench.timeout:
                n = len(complete_entries(store, bench.cache_key))
                if n > len(before) and first is None:
                    first = (time.perf_counter(), n)
                if n >= want:
                    break
                time.sleep(0.02)
            extra = rng.uniform(0.0, per_image)
            time.sleep(extra)
            point = f"{want - len(before)} new entries + {extra:.2f} s"
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            killed = True
        else:
            ended += 1
            killed = False
        code = proc.wait()
        after = complete_entries(store, bench.cache_key)
        gone = before - after
        check = compare(bench, store, after - before)
        lost += len(gone)
        half += len(check["unreadable"])
        differ += len(check["differ"])
        new = len(after - before)
        if not by_delay and new >= 2 and first is not None:  # a rough time per image
            per_image = min(2.0, max(0.05, (time.perf_counter() - first[0]) / max(1, new - 1)))
        log.append(
            {
                "round": r,
                "killed": killed,
                "exit": code,
                "point": point,
                "new_entries": new,
                "lost": len(gone),
                "unreadable": check["unreadable"],
                "differ": check["differ"],
            }
        )
        print(
            f"  crash round {r + 1}/{rounds}: {'killed' if killed else f'ended (exit {code})'} "
            f"at {point}; {len(after)} entries complete, {len(gone)} lost"
        )
        before = after
    staging = sorted(p.name for p in store.rglob("*.partial")) if store.exists() else []
    early = sum(1 for entry in log if entry["killed"] and entry["new_entries"] == 0)
    proc = run(bench, "extract", bench.config, photos, "--store", store, "--json")
    report = json.loads(proc.stdout) if proc.returncode == 0 else {}
    final = compare(bench, store, set(bench.keys.values()))
    sound, vreport = verified(store)
    rows = [
        Row(
            "crashes",
            "SIGKILL during `diffeat extract`, then rerun",
            rounds,
            f"{kills} killed ({ended} ended first; {early} before any new entry); {lost} "
            f"entries lost, {half} half entries read as complete, {differ} entries differ "
            f"from a clean run; {len(staging)} staging folders of writes in flight left",
            "0 lost, 0 half, 0 differ",
            lost == 0 and half == 0 and differ == 0,
            {
                "kills": kills,
                "ended_before_kill": ended,
                "lost": lost,
                "half": half,
                "differ": differ,
                "rounds": log,
                "staging_left_by_kills": len(staging),
            },
        ),
        Row(
            "crashes",
            "last rerun after the kills",
            1,
            f"exit {proc.returncode}; {report.get('computed', '?')} computed, "
            f"{report.get('cached', '?')} already stored (of {len(before)} before it); "
            f"{len(final['equal'])}/{IMAGES} entries bitwise equal to a clean run; "
            f"verify {'ok' if sound else 'not ok'}",
            f"exit 0; only the missing computed; {IMAGES}/{IMAGES} equal; verify ok",
            proc.returncode == 0
            and report.get("cached") == len(before)
            and report.get("computed") == IMAGES - len(before)
            and len(final["equal"]) == IMAGES
            and sound,
            {"report": report, "compare": final, "verify": vreport, "stderr": proc.stderr[-2000:]},
        ),
    ]
    return rows


# -- concurrent writers --------------------------------------------------------------------------


def writers(bench: Bench, rounds: int, count: int, rng: random.Random) -> list[Row]:
    """``count`` ``diffeat extract`` processes at once into one store, ``rounds`` times."""
    failed, incomplete, differ, missing, processes = 0, 0, 0, 0, 0
    computed, found, cached, distinct = 0, 0, 0, 0
    over_once = 0
    log = []
    for r in range(rounds):
        store = bench.root / f"writers{r}.zarr"
        shares = [rng.sample(bench.images, k=IMAGES // 2) for _ in range(count)]
        union = {bench.keys[p] for share in shares for p in share}
        logs = [bench.root / f"writer{r}.{w}.json" for w in range(count)]
        procs = []
        for share, out in zip(shares, logs):
            with out.open("w") as fh:
                procs.append(
                    subprocess.Popen(
                        [
                            *DIFFEAT,
                            "--quiet",
                            "extract",
                            str(bench.config),
                            *map(str, share),
                            "--store",
                            str(store),
                            "--json",
                        ],
                        stdout=fh,
                        stderr=subprocess.PIPE,
                        env=bench.env,
                        text=True,
                    )
                )
        reports, errors = [], []
        for proc in procs:
            _, err = proc.communicate(timeout=bench.timeout)
            errors.append(err)
        for proc, out, err in zip(procs, logs, errors):
            processes += 1
            if proc.returncode != 0:
                failed += 1
                reports.append({"exit": proc.returncode, "stderr": err[-2000:]})
                continue
            reports.append(json.loads(out.read_text()))
        good = [rep for rep in reports if "computed" in rep]
        round_computed = sum(rep["computed"] for rep in good)
        computed += round_computed
        found += sum(rep["found"] for rep in good)
        cached += sum(rep["cached"] for rep in good)
        distinct += len(union)
        over_once += max(0, round_computed - len(union))
        info = open_store(store).info()["extractors"].get(bench.cache_key, {})
        incomplete += int(info.get("incomplete", 0))
        check = compare(bench, store, union)
        differ += len(check["differ"]) + len(check["unreadable"])
        missing += len(check["missing"])
        log.append({"round": r, "distinct": len(union), "reports": reports, "compare": check})
        print(
            f"  writers round {r + 1}/{rounds}: exits {[p.returncode for p in procs]}, "
            f"computed {round_computed} of {len(union)} distinct, "
            f"found {sum(rep['found'] for rep in good)}"
        )
    return [
        Row(
            "writers",
            f"{count} `diffeat extract` into one store, overlapping images",
            rounds,
            f"{failed}/{processes} processes failed; {incomplete} entries incomplete, "
            f"{missing} missing, {differ} differ from a single-process run; "
            f"computed {computed} for {distinct} distinct images, {found} found stored "
            f"meanwhile by another process, {cached} already stored",
            "0 failed, 0 incomplete, 0 missing, 0 differ; computed = distinct",
            failed == 0
            and incomplete == 0
            and missing == 0
            and differ == 0
            and over_once == 0
            and computed == distinct,
            {
                "processes": processes,
                "failed": failed,
                "incomplete": incomplete,
                "missing": missing,
                "differ": differ,
                "computed": computed,
                "distinct": distinct,
                "found": found,
                "cached": cached,
                "rounds": log,
            },
        )
    ]


# -- corruption ----------------------------------------------------------------------------------


def _chunk(entry: Path, index: int = 0) -> Path:
    """A chunk file of the entry's first layer."""
    layer = sorted(p for p in entry.iterdir() if p.is_dir())[0]
    return sorted((layer / "features").glob("c.*"))[index]


def damage_delete_chunk(entry: Path) -> None:
    _chunk(entry, -1).unlink()


def damage_flip_bytes(entry: Path) -> None:
    chunk = _chunk(entry)
    data = bytearray(chunk.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    chunk.write_bytes(bytes(data))


def damage_dtype(entry: Path) -> None:
    layer = sorted(p for p in entry.iterdir() if p.is_dir())[-1]
    meta = layer / "features" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "int16"
    meta.write_text(json.dumps(doc))


def damage_truncate(entry: Path) -> None:
    chunk = _chunk(entry)
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])


ENTRY_DAMAGE = {
    "deleted chunk file": damage_delete_chunk,
    "flipped bytes in a chunk": damage_flip_bytes,
    "dtype edited in array metadata": damage_dtype,
    "truncated chunk": damage_truncate,
}


def _match(bench: Bench, store: Path, source: Path, target: Path) -> subprocess.CompletedProcess:
    return run(bench, "match", bench.config, source, target, "-p", "20,20", "--store", store)


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> bool:
    return (
        proc.returncode == 2
        and not traceback_in(proc.stderr)
        and all(n in proc.stderr for n in needles)
    )


def _restored(bench: Bench, store: Path, recompute: int) -> tuple[bool, str, dict[str, Any]]:
    """``extract`` into the repaired store: ``recompute`` images computed, all entries bitwise
    equal to the clean run, ``verify`` ok."""
    proc = run(bench, "extract", bench.config, bench.images[0].parent, "--store", store, "--json")
    report = json.loads(proc.stdout) if proc.returncode == 0 else {}
    check = compare(bench, store, set(bench.keys.values()))
    sound, vreport = verified(store)
    ok = (
        proc.returncode == 0
        and report.get("computed") == recompute
        and len(check["equal"]) == IMAGES
        and sound
    )
    problems = [
        *(["entries damaged"] if vreport["damaged"] else []),
        *(["entries incomplete"] if any(vreport["incomplete"].values()) else []),
        *(["extractor info still damaged"] if vreport["damaged_info"] else []),
    ]
    text = (
        f"extract exit {proc.returncode}, {report.get('computed', '?')} recomputed, "
        f"{len(check['equal'])}/{IMAGES} equal, verify {'ok' if sound else ', '.join(problems)}"
    )
    return (
        ok,
        text,
        {"extract": report, "compare": check, "verify": vreport, "stderr": proc.stderr[-2000:]},
    )


def corruption(bench: Bench) -> list[Row]:
    """Damage copies of the clean store; verify, match, repair, extract."""
    rows = []
    reference = bench.root / "reference.zarr"
    sound = bench.images[-1]

    # four kinds of entry damage, one entry each, in one store
    store = bench.root / "damaged-entries.zarr"
    shutil.copytree(reference, store)
    victims = {}
    for (kind, damage), image in zip(ENTRY_DAMAGE.items(), bench.images):
        key = bench.keys[image]
        damage(store / bench.cache_key / key)
        victims[kind] = (image, key)
    vcode, vreport, _ = verify_json(bench, store)
    flagged = {d["image_key"]: d["problem"] for d in (vreport or {}).get("damaged", [])}
    matches = {kind: _match(bench, store, image, sound) for kind, (image, _k) in victims.items()}
    repair = run(bench, "store", "verify", "--repair", store, "--json")
    repaired = json.loads(repair.stdout) if repair.returncode == 0 else {}
    removed = {d["image_key"] for d in repaired.get("damaged", []) if d["removed"]}
    ok_restore, restore_text, restore = _restored(bench, store, len(victims))
    for kind, (image, key) in victims.items():
        proc = matches[kind]
        refused = _refused(proc, "verify --repair")
        detected = vcode == 1 and key in flagged
        ok = refused and detected and key in removed and ok_restore
        rows.append(
            Row(
                "corruption",
                kind,
                1,
                f"match exit {proc.returncode}{', traceback' if traceback_in(proc.stderr) else ''}: "
                f'"{first_line(proc.stderr)}"; verify exit {vcode}, '
                f"{'reports it' if detected else 'does not report it'}; --repair "
                f"{'removes it' if key in removed else 'keeps it'}; then {restore_text}",
                "match exit 2 naming `verify --repair`, no traceback; verify exit 1 naming the "
                "entry; repair + extract: all equal, verify ok",
                ok,
                {
                    "image": image.name,
                    "image_key": key,
                    "verify_problem": flagged.get(key),
                    "match_stderr": proc.stderr[-2000:],
                    "restore": restore,
                },
            )
        )

    # garbled cache-key metadata: the entries are sound, the info is rewritten by extract/match
    store = bench.root / "damaged-info.zarr"
    shutil.copytree(reference, store)
    (store / bench.cache_key / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_ty')
    vcode, vreport, _ = verify_json(bench, store)
    detected = vcode == 1 and bool(vreport and bench.cache_key in vreport["damaged_info"])
    proc = _match(bench, store, bench.images[0], sound)
    repair = run(bench, "store", "verify", "--repair", store)
    ok_restore, restore_text, restore = _restored(bench, store, 0)
    rows.append(
        Row(
            "corruption",
            "garbled cache-key metadata",
            1,
            f"match exit {proc.returncode}{', traceback' if traceback_in(proc.stderr) else ''} "
            f"(entries sound); verify exit {vcode}, "
            f"{'reports it' if detected else 'does not report it'}; "
            f"--repair exit {repair.returncode}; then {restore_text}",
            "match exit 0 (entries are sound, the info is rewritten); verify exit 1 naming it; "
            "repair + extract: all equal, verify ok",
            proc.returncode == 0 and detected and repair.returncode == 0 and ok_restore,
            {"verify": vreport, "match_stderr": proc.stderr[-2000:], "restore": restore},
        )
    )

    # the root zarr.json deleted
    store = bench.root / "damaged-root.zarr"
    shutil.copytree(reference, store)
    (store / "zarr.json").unlink()
    verify = run(bench, "store", "verify", store)
    detected = _refused(verify, "is missing", "verify --repair")
    proc = _match(bench, store, bench.images[0], sound)
    repair = run(bench, "store", "verify", "--repair", store, "--json")
    rewritten = repair.returncode == 0 and json.loads(repair.stdout).get("root_rewritten")
    ok_restore, restore_text, restore = _restored(bench, store, 0)
    rows.append(
        Row(
            "corruption",
            "deleted root zarr.json",
            1,
            f"match exit {proc.returncode}{', traceback' if traceback_in(proc.stderr) else ''}: "
            f'"{first_line(proc.stderr)}"; verify exit {verify.returncode}, '
            f"{'names it and the way out' if detected else 'misses it'}; --repair "
            f"{'rewrites it' if rewritten else 'does not rewrite it'}; then {restore_text}",
            "match and verify exit 2 naming `verify --repair`, no traceback; repair rewrites it; "
            "extract: nothing to recompute, all equal",
            _refused(proc, "verify --repair") and detected and bool(rewritten) and ok_restore,
            {
                "verify_stderr": verify.stderr[-2000:],
                "match_stderr": proc.stderr[-2000:],
                "restore": restore,
            },
        )
    )
    return rows


# -- bad inputs ----------------------------------------------------------------------------------


def bomb_png(path: Path, side: int = 30000) -> None:
    """A real, valid 1-bit greyscale PNG of side x side pixels, all black (tiny on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def _input_row(
    trial: str,
    proc: subprocess.CompletedProcess,
    needles: list[str],
    extra: str = "",
    extra_ok: bool = True,
    expected: str = "exit 2 naming it, no traceback",
) -> Row:
    ok = _refused(proc, *needles) and extra_ok
    outcome = (
        f"exit {proc.returncode}{', traceback' if traceback_in(proc.stderr) else ', no traceback'}"
        f': "{first_line(proc.stderr)}"{extra}'
    )
    return Row(
        "inputs",
        trial,
        1,
        outcome,
        expected,
        ok,
        {"stderr": proc.stderr[-3000:], "needles": needles},
    )


def inputs(bench: Bench) -> list[Row]:
    from diffeat.testing import smooth_texture

    root = bench.root / "inputs"
    root.mkdir()
    rows = []

    # a decompression bomb and a corrupt image among good images: one run
    mixed = root / "mixed"
    mixed.mkdir()
    for i in range(3):
        smooth_texture((64, 48), seed=500 + i).save(mixed / f"good{i}.png")
    bomb_png(mixed / "bomb.png")
    good = (mixed / "good0.png").read_bytes()
    (mixed / "broken.png").write_bytes(good[:33] + bytes(random.Random(0).randbytes(200)))
    store = root / "mixed.zarr"
    proc = run(bench, "extract", bench.config, mixed, "--store", store, "--json")
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    failed = {Path(f["image"]).name: f["error"] for f in report.get("failed", [])}
    others = len(complete_entries(store, bench.cache_key))
    tail = f"; the other images: {others}/3 stored"
    err = proc.stderr

    def lines_of(name: str) -> subprocess.CompletedProcess:  # the run, as seen by one file
        mine = "\n".join(line for line in err.splitlines() if name in line) or err
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, mine)

    bomb_proc, broken_proc = lines_of("bomb.png"), lines_of("broken.png")
    rows.append(
        _input_row(
            "decompression bomb PNG (30000 x 30000, 1-bit)",
            bomb_proc,
            ["bomb.png", "DIFFEAT_MAX_IMAGE_PIXELS"],
            tail,
            others == 3 and "bomb.png" in failed and not traceback_in(err),
            "exit 2 naming the file and the limit, no traceback; the others stored",
        )
    )
    rows.append(
        _input_row(
            "corrupt image file (same run)",
            broken_proc,
            ["broken.png"],
            tail,
            others == 3 and "broken.png" in failed and not traceback_in(err),
            "exit 2 naming the file, no traceback; the others stored",
        )
    )

    proc = run(
        bench,
        "match",
        bench.config,
        bench.images[0],
        bench.images[1],
        "-p",
        "5,5",
        "--no-store",
        "--device",
        "cuda:7",
    )
    rows.append(_input_row("`--device cuda:7`", proc, ["cuda:7"]))

    empty = root / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    proc = run(bench, "extract", bench.config, empty, "--store", root / "empty.zarr")
    rows.append(_input_row("folder with no images", proc, [str(empty)]))

    from diffeat.plugins.datasets.synthetic import make_synthetic

    dataset = root / "bench"
    make_synthetic(dataset, [mixed / "good0.png"], pairs=2, seed=0, kinds=["translate"], ext="png")
    (root / "secret.png").write_bytes(good)
    ann = sorted((dataset / "PairAnnotation" / "test").glob("*.json"))[0]
    doc = json.loads(ann.read_text())
    doc["src_imname"] = "../../../secret.png"
    ann.write_text(json.dumps(doc))
    proc = run(
        bench,
        "extract",
        bench.config,
        "--dataset",
        "synthetic",
        "--root",
        dataset,
        "--store",
        root / "escape.zarr",
    )
    escaped = not (root / "escape.zarr").exists() or not complete_entries(
        root / "escape.zarr", bench.cache_key
    )
    rows.append(
        _input_row(
            "dataset annotation path escaping the root",
            proc,
            ["outside the dataset root", ann.name],
            "",
            escaped,
            "exit 2 naming the annotation and the path, nothing stored",
        )
    )

    unknown = root / "unknown.toml"
    unknown.write_text(bench.config.read_text().replace("stable-diffusion", "no-such-extractor"))
    proc = run(bench, "extract", unknown, bench.images[0], "--store", root / "unknown.zarr")
    rows.append(_input_row("unknown plugin name", proc, ["no-such-extractor"]))

    bad = root / "bad.toml"
    bad.write_text('[extractor\nplugin = "stable-diffusion"\n')
    proc = run(bench, "extract", bad, bench.images[0], "--store", root / "bad.zarr")
    rows.append(_input_row("TOML syntax error", proc, [str(bad)]))
    return rows


# -- output --------------------------------------------------------------------------------------


def markdown(rows: list[Row]) -> str:
    lines = [
        "| family | trial | rounds | outcome | expected | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row.family,
            row.trial,
            str(row.rounds),
            row.outcome,
            row.expected,
            "OK" if row.ok else "**FAIL**",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        default=",".join(FAMILIES),
        help=f"comma-separated families of {', '.join(FAMILIES)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=8, help="SIGKILLs of the crash trial")
    parser.add_argument(
        "--writer-rounds", type=int, default=2, help="rounds of the concurrent-writer trial"
    )
    parser.add_argument("--writers", type=int, default=4, help="processes per writer round")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds any one diffeat command may take"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="work folder (default: a temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=OUT / "reliability.json",
        help="where to write the results as JSON (default: %(default)s)",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}: use some of {', '.join(FAMILIES)}")
    if args.rounds < 1 or args.writer_rounds < 1 or args.writers < 2:
        parser.error("--rounds and --writer-rounds must be >= 1, --writers >= 2")

    from _common import machine_info

    rng = random.Random(args.seed)
    started = time.perf_counter()
    global WORK
    work = WORK = Path(tempfile.mkdtemp(prefix="diffeat-reliability-", dir=args.dir))
    timings: dict[str, float] = {}
    rows: list[Row] = []
    try:
        t0 = time.perf_counter()
        bench = setup(work, args.timeout)
        timings["setup"] = time.perf_counter() - t0
        for family in families:
            t0 = time.perf_counter()
            print(f"{family} ...", flush=True)
            if family == "crashes":
                rows += crashes(bench, args.rounds, rng)
            elif family == "writers":
                rows += writers(bench, args.writer_rounds, args.writers, rng)
            elif family == "corruption":
                rows += corruption(bench)
            else:
                rows += inputs(bench)
            timings[family] = time.perf_counter() - t0
            print(f"{family}: {timings[family]:.1f} s", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    table = markdown(rows)
    total = time.perf_counter() - started
    print()
    print(table)
    failures = sum(not r.ok for r in rows)
    import resource

    cpu = sum(
        getattr(resource.getrusage(who), field)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for field in ("ru_utime", "ru_stime")
    )
    print(f"{len(rows)} checks, {failures} failed, {total:.0f} s wall, {cpu:.0f} s CPU")
    result = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": total,
        "cpu_seconds": cpu,  # this process and every diffeat process it ran
        "timings_s": timings,
        "settings": {
            "rounds": args.rounds,
            "writer_rounds": args.writer_rounds,
            "writers": args.writers,
            "seed": args.seed,
            "images": IMAGES,
        },
        "rows": [asdict(r) for r in rows],
        "failed": failures,
    }
    write_json(args.json, result)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
