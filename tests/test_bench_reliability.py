"""benchmarks/bench_reliability.py does not rot: its --help, argument checks, the
decompression-bomb PNG it writes, the damage it does to a store and its table.

(A real run takes minutes: see docs/reliability.md.)"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_reliability.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_reliability", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_reliability"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_reliability", None)
        sys.path.remove(str(SCRIPT.parent))


def test_help_lists_the_families_and_options():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("crashes", "writers", "corruption", "inputs", "--rounds", "--writer-rounds"):
        assert word in proc.stdout


def test_unknown_family_is_refused():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "crashes,floods"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown families floods" in proc.stderr


def test_bomb_png_is_a_real_image_too_large_to_decode(bench, tmp_path):
    path = tmp_path / "bomb.png"
    bench.bomb_png(path, side=14000)  # 196 megapixels: over Pillow's refusal threshold
    assert path.stat().st_size < 100_000
    head = path.read_bytes()[:33]  # signature and IHDR: 14000 x 14000, 1 bit, greyscale
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">IIBB", head[16:26]) == (14000, 14000, 1, 0)
    from diffeat.core.errors import ImageError
    from diffeat.core.images import load_image

    with pytest.raises(ImageError, match="too large"):  # ... and diffeat refuses to decode it
        load_image(path)
    small = tmp_path / "small.png"
    bench.bomb_png(small, side=20)  # the same writer makes a decodable PNG
    with Image.open(small) as img:
        img.load()
        assert img.size == (20, 20) and img.getextrema() == (0, 0)


def test_entry_damage_is_seen_by_the_store(bench, tmp_path):
    import torch

    from diffeat.core.features import FeatureSet
    from diffeat.store import FeatureStore
    from diffeat.store.verify import verify_store

    store = FeatureStore(tmp_path / "s.zarr")
    store.register_extractor("ck", {"plugin": "x", "config": {}, "model": {}, "layers": []})
    names = list(bench.ENTRY_DAMAGE)
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(i)
        layers = {f"l{j}": torch.randn(2, 8, 6, 6, generator=gen) for j in range(2)}
        store.put("ck", f"e{i}", FeatureSet(layers, (10, 10)))
        bench.ENTRY_DAMAGE[name](tmp_path / "s.zarr" / "ck" / f"e{i}")
    report = verify_store(FeatureStore(tmp_path / "s.zarr", mode="r"))
    assert sorted(d.image_key for d in report.damaged) == [f"e{i}" for i in range(len(names))]


def test_a_kill_before_the_store_exists_compares_nothing(bench, tmp_path):
    state = bench.Bench(tmp_path, tmp_path / "c.toml", [], {})
    assert bench.complete_entries(tmp_path / "none.zarr", "ck") == set()
    assert bench.compare(state, tmp_path / "none.zarr", set()) == {
        "equal": [],
        "differ": [],
        "unreadable": [],
        "missing": [],
    }


def test_markdown_table_escapes_pipes_and_marks_failures(bench):
    rows = [
        bench.Row("inputs", "a|b", 1, "exit 2", "exit 2", True),
        bench.Row("crashes", "kill", 3, "1 lost", "0 lost", False),
    ]
    table = bench.markdown(rows).splitlines()
    assert table[0].startswith("| family | trial | rounds |") and len(table) == 4
    assert "a\\|b" in table[2] and table[2].endswith("| OK |")
    assert table[3].endswith("| **FAIL** |")
    json.dumps([vars(r) for r in rows])  # the JSON output holds the rows as they are
