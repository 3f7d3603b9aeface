"""QueryCache: per (image, query) results of a query-conditioned matcher in the store."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffeat.core.features import FeatureSet
from diffeat.core.geometry import ImageTransform
from diffeat.core.options import opt
from diffeat.core.query_cache import QueryCache
from diffeat.store import FeatureStore
from diffeat.testing import smooth_texture


@dataclass
class Opts:
    steps: int = opt(3, "affects the result")
    device: str = opt("cpu", "does not", cache=False)


def _result(values: torch.Tensor) -> FeatureSet:
    meta = {"transform": ImageTransform.resize((8, 8), (8, 8)).to_dict()}
    return FeatureSet({"v": values.reshape(1, 1, 1, -1)}, (0,), meta)


def test_values_round_trip_exactly_in_a_float16_store(tmp_path: Path) -> None:
    image = smooth_texture((20, 10), seed=1)
    cache = QueryCache(FeatureStore(tmp_path / "s.zarr"), "demo", Opts(), lambda: {"w": "1"})
    values = torch.tensor([1.0 + 2**-20, -3.3, math.nan, math.inf])  # not float16 values
    cache.put(image, "point 1.0,2.0", _result(values))
    got = cache.get(image, "point 1.0,2.0")
    assert got is not None and torch.equal(got.layers["v"].reshape(-1)[:2], values[:2])
    assert math.isnan(got.layers["v"].reshape(-1)[2]) and got.layers["v"].reshape(-1)[3] == math.inf
    assert cache.get(image, "point 1.0,2.5") is None  # another query
    assert cache.get(smooth_texture((20, 10), seed=2), "point 1.0,2.0") is None  # another image
    # the key follows the result-affecting options, not the others
    same = QueryCache(
        FeatureStore(tmp_path / "s.zarr"), "demo", Opts(device="cuda"), lambda: {"w": "1"}
    )
    other = QueryCache(FeatureStore(tmp_path / "s.zarr"), "demo", Opts(steps=4), lambda: {"w": "1"})
    assert same.cache_key == cache.cache_key != other.cache_key
    assert other.get(image, "point 1.0,2.0") is None


def test_a_read_only_store_is_read_not_written(tmp_path: Path) -> None:
    image = smooth_texture((20, 10), seed=1)
    path = tmp_path / "s.zarr"
    QueryCache(FeatureStore(path), "demo", Opts(), dict).put(image, "a", _result(torch.ones(2)))
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    ro = QueryCache(FeatureStore(path, "r"), "demo", Opts(), dict)
    with pytest.warns(UserWarning, match="read-only"):
        assert ro.get(image, "a") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ro.put(image, "b", _result(torch.ones(2)))  # silently not kept (warned once)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before
