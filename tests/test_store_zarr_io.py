"""The store's zarr adapter (diffeat.store.zarr_io): its two paths write the same bytes,
read each other's stores, and nothing else in the store package touches zarr."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from diffeat.core.features import FeatureSet
from diffeat.store import FeatureStore, zarr_io

STORE_SRC = Path(zarr_io.__file__).parent

needs_fast_path = pytest.mark.skipif(
    not zarr_io.fast_path_supported(),
    reason=f"zarr {zarr_io.zarr_version()} is not a release the fast path was tested with",
)


def features(timesteps: tuple[int, ...] = (0, 500, 900)) -> FeatureSet:
    gen = torch.Generator().manual_seed(3)
    t = len(timesteps)
    layers = {
        "up0": torch.randn(t, 16, 4, 6, generator=gen) * 3,
        "nan": torch.full((t, 2, 3, 3), float("nan")),  # chunks of fill value only
        "mid:0": torch.randn(t, 4, 2, 3, generator=gen),
    }
    return FeatureSet(layers, timesteps, {"note": "same"})


def write(path: Path, fast: bool, dtype: str) -> FeatureStore:
    with zarr_io.use_fast_path(fast):
        store = FeatureStore(path, dtype=dtype)
        store.register_extractor("ck", {"plugin": "dift", "layers": ["up0"]})
        store.put("ck", "img", features(), source="a.png")
        store.put("ck", "zeros", features((0,)))  # a timestep chunk of fill value only
        store.put("ck", "empty", features(()))  # zero timesteps: metadata, no chunks
        store.put("ck", "gone", features())
        store.delete("ck", "gone")
    return store


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; image groups without their random write_id."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        doc = json.loads(data) if path.name == "zarr.json" else None
        if isinstance(doc, dict) and "write_id" in doc.get("attributes", {}):
            doc["attributes"]["write_id"] = "-"
            data = json.dumps(doc).encode()
        out[str(path.relative_to(root))] = data
    return out


@needs_fast_path
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_both_paths_write_the_same_bytes(tmp_path: Path, dtype: str) -> None:
    fast = files(write(tmp_path / "fast", True, dtype).path)
    public = files(write(tmp_path / "public", False, dtype).path)
    assert list(fast) == list(public)
    assert fast == public
    assert "ck/img/up0/features/c.2.0.0.0" in fast
    assert "ck/img/nan/features/c.0.0.0.0" in fast  # write_empty_chunks: NaN chunks written too
    assert "ck/zeros/up0/timestep/c.0" not in fast  # [0] is the fill value: zarr skips it
    assert not any(name.startswith("ck/empty/up0/features/c.") for name in fast)
    assert not any(name.startswith("ck/gone") for name in fast)


@needs_fast_path
@pytest.mark.parametrize("writer", [True, False], ids=["fast-writes", "public-writes"])
def test_each_path_reads_what_the_other_wrote(tmp_path: Path, writer: bool) -> None:
    path = write(tmp_path / "s", writer, "float16").path
    results = []
    for fast in (True, False):
        with zarr_io.use_fast_path(fast):
            store = FeatureStore(path, mode="r")
            got = store.get("ck", "img")
            results.append(
                (
                    store.entries("ck"),
                    store.extractors(),
                    store.has("ck", "zeros"),
                    store.get("ck", "zeros").timesteps,
                    store.get("ck", "empty").layers["up0"].shape,
                    store.entry_info("ck", "img"),
                    got,
                )
            )
    (*meta_fast, got_fast), (*meta_public, got_public) = results
    assert meta_fast == meta_public
    assert meta_fast[0] == ["empty", "img", "zeros"]
    for name, tensor in features().layers.items():
        want = tensor.half().float()
        torch.testing.assert_close(got_fast.layers[name], want, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got_public.layers[name], want, rtol=0, atol=0, equal_nan=True)


def test_the_switch_and_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(zarr_io.FAST_PATH_ENV, raising=False)
    supported = zarr_io.fast_path_supported()
    assert zarr_io.fast_path_active() is supported
    with zarr_io.use_fast_path(False):
        assert not zarr_io.fast_path_active()
        with zarr_io.use_fast_path(True):
            assert zarr_io.fast_path_active() is supported
        assert not zarr_io.fast_path_active()
    monkeypatch.setenv(zarr_io.FAST_PATH_ENV, "0")
    assert not zarr_io.fast_path_active()
    with zarr_io.use_fast_path(True):  # the explicit switch wins over the environment
        assert zarr_io.fast_path_active() is supported


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("3.1.0", True),
        ("3.1.6", True),
        ("3.1.7.dev3+g1234", True),
        ("3.2.0", False),
        ("3.0.10", False),
        ("4.0.0", False),
        ("unknown", False),
    ],
)
def test_fast_path_only_on_tested_releases(
    monkeypatch: pytest.MonkeyPatch, version: str, supported: bool
) -> None:
    monkeypatch.setattr(zarr_io, "zarr_version", lambda: version)
    assert (zarr_io._load_internals() is not None) is supported


def test_requirement_matches_the_tested_range() -> None:
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml next to the tests (installed package)")
    (low_major, low_minor), (high_major, high_minor) = zarr_io.FAST_PATH_ZARR
    assert f'"zarr>={low_major}.{low_minor},<{high_major}.{high_minor}"' in pyproject.read_text()


def test_public_path_refuses_a_call_from_inside_its_own_loop(tmp_path: Path) -> None:
    with zarr_io.use_fast_path(False):
        store = FeatureStore(tmp_path / "s")

        async def nested() -> bool:
            return store.has("ck", "img")  # a synchronous call on the loop thread itself

        with pytest.raises(RuntimeError, match="inside the store's event loop"):
            zarr_io.run(nested())


def test_only_the_adapter_imports_zarr() -> None:
    offenders = []
    for module in sorted(STORE_SRC.glob("*.py")):
        if module.name == "zarr_io.py":
            continue
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{module.name}: {n}" for n in names if n.split(".")[0] == "zarr"]
    assert offenders == []
