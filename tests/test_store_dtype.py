"""Storage dtypes of the feature store: float16 (default), float32 (exact) and bfloat16 (the
raw bits in uint16 arrays, format 4/5), the storage dtype in the cache key, and
``--store-dtype`` on the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from clihelp import cli_env, run, run_json, tiny_dift_config

from diffeat.core.errors import StoreError
from diffeat.core.features import FeatureSet
from diffeat.core.sources import extractor_cache_key
from diffeat.store import DamagedEntry, FeatureStore, restore_root
from diffeat.store.format import FORMAT_VERSION, check_storage_dtype, layout_version
from diffeat.store.verify import verify_store
from diffeat.testing import smooth_texture


def wide_features(seed: int = 0) -> FeatureSet:
    """float32 maps over many orders of magnitude: beyond float16's range, below its
    smallest normal, negative, and a few exact values."""
    gen = torch.Generator().manual_seed(seed)
    mags = torch.pow(10.0, torch.empty(2, 6, 5, 7).uniform_(-30, 30, generator=gen))
    signs = torch.where(torch.rand(2, 6, 5, 7, generator=gen) < 0.5, -1.0, 1.0)
    big = (mags * signs).float()
    big[0, 0, 0, :3] = torch.tensor([0.0, 1.0, -2.5])
    small = torch.randn(2, 3, 4, 4, generator=gen)
    return FeatureSet({"up0": big, "mid:0": small}, (261, 500), {"transform": {"scale": [1, 1]}})


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a 16- or 32-bit float tensor (for bitwise comparisons, NaN included)."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


# ---------------------------------------------------------------- the store


def test_float32_store_round_trips_float32_features_bitwise(tmp_path: Path) -> None:
    fs = wide_features()
    store = FeatureStore(tmp_path / "s", dtype="float32")
    store.put("ck", "img", fs)
    got = FeatureStore(tmp_path / "s", mode="r").get("ck", "img")  # the reader's dtype: any
    for name, want in fs.layers.items():
        assert got.layers[name].dtype == torch.float32
        assert torch.equal(bits(got.layers[name]), bits(want))
    assert store.entry_info("ck", "img")["layers"]["up0"]["dtype"] == "float32"
    assert store.format_version == 2  # float32 needs no format extension


def test_bfloat16_entries_read_back_as_the_bfloat16_of_the_features(tmp_path: Path) -> None:
    fs = wide_features()
    fs.layers["mid:0"][0, 0, 0, 0] = float("nan")  # kept as stored, like float16 stores do
    fs.layers["mid:0"][0, 0, 0, 1] = float("-inf")
    store = FeatureStore(tmp_path / "s", dtype="bfloat16")
    assert store.format_version == 2  # nothing written yet: nothing changed
    store.put("ck", "img", fs)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        got = store.get("ck", "img", dtype=dtype)
        for name, x in fs.layers.items():
            want = x.to(torch.bfloat16).to(dtype)
            assert got.layers[name].dtype == dtype
            assert torch.equal(bits(got.layers[name]), bits(want)), (name, dtype)
    # the layout: uint16 arrays of the raw bits; the entry records bfloat16
    root = tmp_path / "s"
    meta = json.loads((root / "ck/img/up0/features/zarr.json").read_text())
    assert meta["data_type"] == "uint16" and meta["fill_value"] == 0x7FC0
    assert meta["attributes"] == {"diffeat": {"dtype": "bfloat16"}}
    assert meta["codecs"][1]["configuration"]["typesize"] == 2
    marker = json.loads((root / "ck/img/zarr.json").read_text())["attributes"]
    assert marker["layers"]["up0"] == {"shape": [2, 6, 5, 7], "dtype": "bfloat16"}
    # plain zarr sees the bits
    raw = zarr.open_array(root / "ck/img/up0/features", mode="r")[...]
    assert raw.dtype == np.uint16
    want_bits = fs.layers["up0"].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(raw, want_bits)
    # the store moved to format 4 (2 plus bfloat16 layers) with its first bfloat16 write
    root_attrs = json.loads((root / "zarr.json").read_text())["attributes"]
    assert root_attrs == {"diffeat": {"format_version": 4}}
    assert store.format_version == 4 and layout_version(4) == 2
    assert store.entry_info("ck", "img")["nbytes"] == (2 * 6 * 5 * 7 + 2 * 3 * 4 * 4) * 2


def test_a_format_4_store_stays_a_disk_store(tmp_path: Path) -> None:
    path = tmp_path / "s"
    FeatureStore(path, dtype="bfloat16").put("ck", "a", wide_features())
    again = FeatureStore(path)  # mode "a": a disk store of format 4 is writable here
    small = FeatureSet({"x": torch.randn(1, 2, 3, 4)}, (1,), {})
    again.put("ck16", "b", small)
    assert torch.equal(again.get("ck16", "b").layers["x"], small.layers["x"].half().float())
    assert again.format_version == 4
    assert FeatureStore(path, mode="r").get("ck", "a").layers["up0"].dtype == torch.float32
    assert FeatureStore.FORMAT_VERSION == FORMAT_VERSION == 5
    # the old check of a newer version still holds above it
    zarr.open_group(path, mode="r+").attrs["diffeat"] = {"format_version": 6}
    with pytest.raises(StoreError, match="upgrade diffeat"):
        FeatureStore(path, mode="r")


def test_a_format_1_store_refuses_bfloat16(tmp_path: Path) -> None:
    path = tmp_path / "s"
    FeatureStore(path, dtype="float32").put("ck", "a", wide_features())
    zarr.open_group(path, mode="r+").attrs["diffeat"] = {"format_version": 1}
    store = FeatureStore(path, dtype="bfloat16")
    with pytest.raises(StoreError, match="cannot hold bfloat16 layers"):
        store.put("ck", "b", wide_features())
    assert not store.has("ck", "b")


def test_bfloat16_needs_no_float16_range_guard(tmp_path: Path) -> None:
    fs = FeatureSet({"x": torch.tensor([[[[1e30, -3e38]]]])}, (1,), {})
    store = FeatureStore(tmp_path / "s", dtype="bfloat16")
    store.put("ck", "img", fs)  # far beyond float16, within bfloat16
    got = store.get("ck", "img").layers["x"]
    assert torch.equal(got, fs.layers["x"].to(torch.bfloat16).float()) and got.isfinite().all()
    with pytest.raises(StoreError, match="beyond the float16 range"):
        FeatureStore(tmp_path / "h").put("ck", "img", fs)
    # only float32's top rounding step (and float64 beyond it) leaves bfloat16's range
    top = FeatureSet({"x": torch.tensor([[[[torch.finfo(torch.float32).max]]]])}, (1,), {})
    with pytest.raises(StoreError, match="beyond the bfloat16 range.*float32"):
        store.put("ck", "top", top)


def test_bfloat16_reading_checks(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = FeatureStore(path, dtype="bfloat16")
    store.put("ck", "img", wide_features())
    store.put("ck", "gone", wide_features(1))
    (path / "ck/gone/up0/features/c.1.0.0.0").unlink()
    with pytest.raises(DamagedEntry, match="chunk files are missing"):
        store.get("ck", "gone")
    meta_path = path / "ck/img/up0/features/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["data_type"], meta["fill_value"] = "float16", "NaN"  # edited by hand
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DamagedEntry, match="dtype float16 is not the entry's recorded bfloat16"):
        store.get("ck", "img")


def test_verify_accepts_bfloat16_and_finds_nonfinite_values(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = FeatureStore(path, dtype="bfloat16")
    store.put("ck", "a", wide_features())
    report = verify_store(FeatureStore(path, mode="r"))
    assert report.ok and report.checked == 1 and not report.damaged
    bad = wide_features(1)
    bad.layers["up0"][1, 2, 3, 4] = float("inf")
    store.put("ck", "b", bad)
    report = verify_store(FeatureStore(path, mode="r"))
    assert [(d.image_key, d.problem) for d in report.damaged] == [
        ("b", "layer 'up0' holds 1 NaN or infinite values")
    ]
    proc = run("store", "verify", path, check=1)
    assert "2 entries checked, 1 damaged" in proc.stdout and "Traceback" not in proc.stderr


def test_restore_root_of_a_store_with_bfloat16_entries_writes_format_4(tmp_path: Path) -> None:
    path = tmp_path / "s"
    FeatureStore(path, dtype="bfloat16").put("ck", "a", wide_features())
    (path / "zarr.json").unlink()
    assert restore_root(path)
    assert FeatureStore(path, mode="r").format_version == 4


def test_store_dtype_names() -> None:
    assert check_storage_dtype(torch.bfloat16) == "bfloat16"
    assert check_storage_dtype("float32") == "float32"
    with pytest.raises(StoreError, match="'float16'.*'float32'.*'bfloat16'"):
        check_storage_dtype("float64")


def test_storage_dtype_enters_the_cache_key_unless_float16() -> None:
    args = ("stable-diffusion", None, {"model": "m"})
    plain = extractor_cache_key(*args)
    assert extractor_cache_key(*args, "float16") == plain  # existing stores keep their keys
    keys = {plain, extractor_cache_key(*args, "float32"), extractor_cache_key(*args, "bfloat16")}
    assert len(keys) == 3


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def config(tiny_sd, tmp_path_factory) -> Path:
    return tiny_dift_config(tiny_sd, tmp_path_factory.mktemp("cfg") / "tiny.toml")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for i in range(2):
        smooth_texture((72 + 8 * i, 64), seed=i).save(d / f"p{i}.png")
    return d


@pytest.mark.slow
def test_cli_store_dtype_keeps_entries_apart(config, photos, tmp_path):
    store = tmp_path / "feats.zarr"
    f32 = run_json("extract", config, photos, "--store", store, "--store-dtype", "float32")
    assert (f32["computed"], f32["cached"]) == (2, 0)
    info = run_json("store", "info", store)["extractors"]
    assert info[f32["cache_key"]]["dtype"] == "float32"
    assert "2 complete entries (float32)" in run("store", "info", store).stdout
    # a float16 run does not use the float32 entries: entries of its own, under its own key
    f16 = run_json("extract", config, photos, "--store", store)
    assert (f16["computed"], f16["cached"]) == (2, 0) and f16["cache_key"] != f32["cache_key"]
    info = run_json("store", "info", store)["extractors"]
    assert info[f16["cache_key"]]["dtype"] == "float16"
    # float32 again (here from the environment variable) finds its entries
    env = cli_env(DIFFEAT_STORE_DTYPE="float32")
    again = run_json("extract", config, photos, "--store", store, env=env)
    assert (again["computed"], again["cached"], again["cache_key"]) == (0, 2, f32["cache_key"])
    # the float32 entries hold what float16 rounds: the two differ, by float16's rounding
    s = FeatureStore(store, mode="r")
    image_key = s.entries(f32["cache_key"])[0]
    exact = s.get(f32["cache_key"], image_key).layers["up_blocks.1"]
    half = s.get(f16["cache_key"], image_key).layers["up_blocks.1"]
    assert not torch.equal(exact, half)
    assert torch.equal(exact.half().float(), half)
    # bfloat16 too, and verify accepts it
    bf = run_json("extract", config, photos, "--store", store, "--store-dtype", "bfloat16")
    assert bf["computed"] == 2 and bf["cache_key"] not in (f16["cache_key"], f32["cache_key"])
    got = FeatureStore(store, mode="r").get(bf["cache_key"], image_key).layers["up_blocks.1"]
    assert torch.equal(got, exact.to(torch.bfloat16).float())
    assert run_json("store", "info", store)["format_version"] == 4
    report = run_json("store", "verify", store)
    assert report["ok"] and report["checked"] == 6
    # match reads the float32 entries with --store-dtype float32 (nothing computed)
    match = run_json(
        "match",
        config,
        photos / "p0.png",
        photos / "p1.png",
        "--point",
        "10,10",
        "--store",
        store,
        "--store-dtype",
        "float32",
    )
    assert match is not None
    assert len(FeatureStore(store, mode="r").entries(f32["cache_key"])) == 2


def test_cli_invalid_store_dtype_is_a_click_error(tmp_path):
    for argv in (
        ("extract", "c.toml", "x.png", "--store", tmp_path / "s", "--store-dtype", "float64"),
        ("match", "c.toml", "a.png", "b.png", "--point", "1,1", "--store-dtype", "half"),
    ):
        proc = run(*argv, check=2)
        assert "Invalid value for '--store-dtype'" in proc.stderr, proc.stderr
        assert "'float16', 'float32', 'bfloat16'" in proc.stderr and "Traceback" not in proc.stderr
    env = cli_env(DIFFEAT_STORE_DTYPE="double")
    proc = run("extract", "c.toml", "x.png", "--store", tmp_path / "s", env=env, check=2)
    assert "Invalid value for '--store-dtype'" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_cli_help_shows_the_store_dtype_option():
    for command in ("extract", "match", "eval", "train", "propagate", "quickstart"):
        out = run(command, "--help").stdout
        assert "--store-dtype" in out and "DIFFEAT_STORE_DTYPE" in out, command


def test_bfloat16_on_object_storage_moves_format_3_to_5() -> None:
    pytest.importorskip("obstore")
    pytest.importorskip("moto.server")
    from diffeat.testing.s3 import local_s3_server

    with local_s3_server() as s3:
        url = s3.url()
        store = FeatureStore(url, dtype="bfloat16")
        assert store.format_version == 3
        fs = wide_features()
        store.put("ck", "img", fs)
        assert store.format_version == 5
        again = FeatureStore(url, mode="r")
        assert again.format_version == 5 and again.entries("ck") == ["img"]  # the index
        got = again.get("ck", "img", dtype=torch.bfloat16)
        assert torch.equal(bits(got.layers["up0"]), bits(fs.layers["up0"].to(torch.bfloat16)))
        assert again.info()["extractors"]["ck"]["dtype"] == "bfloat16"
        assert verify_store(again).ok
        FeatureStore(url, dtype="float32").put("ck32", "img", fs)  # still writable, format 5
        assert FeatureStore(url, mode="r").entries("ck32") == ["img"]


@pytest.mark.slow
def test_ray_actors_store_in_the_dtype_asked_for(config, photos, tmp_path, monkeypatch):
    """`ray_extract(..., store_dtype=...)` (what `extract --ray --store-dtype` calls): the
    actors open the store in that dtype, under that dtype's cache key."""
    pytest.importorskip("ray")
    from diffeat.core.pipeline import Pipeline
    from diffeat.distributed import ray_extract

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    files = sorted(photos.iterdir())
    ref_path = tmp_path / "ref.zarr"
    ref = Pipeline.from_file(config, store=FeatureStore(ref_path, dtype="bfloat16"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors: the comparison is bit for bit
    try:
        assert ref.extract(files).computed == 2
    finally:
        torch.set_num_threads(threads)
    store = tmp_path / "ray.zarr"
    report = ray_extract(config, files, store, workers=1, batch_size=2, store_dtype="bfloat16")
    assert report.computed == 2 and not report.failed
    got = FeatureStore(store, mode="r")
    assert list(got.extractors()) == [ref.cache_key]  # the bfloat16 key
    assert got.format_version == 4
    want = FeatureStore(ref_path, mode="r")
    for image_key in want.entries(ref.cache_key):
        info = got.entry_info(ref.cache_key, image_key)
        assert {spec["dtype"] for spec in info["layers"].values()} == {"bfloat16"}
        a = want.get(ref.cache_key, image_key, dtype=torch.bfloat16)
        b = got.get(ref.cache_key, image_key, dtype=torch.bfloat16)
        for name in a.layers:
            assert torch.equal(bits(a.layers[name]), bits(b.layers[name])), (image_key, name)


def test_train_hint_extracts_in_the_same_store_dtype() -> None:
    from diffeat.cli.datasets_common import extract_command

    common = {"dataset": "spair", "root": "data", "split": "trn", "options": (), "store": "s"}
    assert "--store-dtype" not in extract_command("c.toml", **common)
    line = extract_command("c.toml", **common, store_dtype="float32")
    assert line.endswith("--store s --store-dtype float32")
