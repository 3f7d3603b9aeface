"""Several extractors in one pipeline, combined by the fuse aggregator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffeat.core.config import load_config, to_toml
from diffeat.core.errors import ConfigError
from diffeat.core.features import FeatureSet
from diffeat.core.geometry import ImageTransform, resize_map
from diffeat.core.pipeline import Pipeline
from diffeat.plugins.fuse import Fuse, pca_project
from diffeat.testing import smooth_texture

TWO = {
    "extractor": [
        {"name": "fine", "plugin": "color-blur", "image_size": [64, 48], "sigmas": [0.0, 2.0]},
        {"name": "coarse", "plugin": "color-blur", "image_size": [32, 32], "stride": 2},
    ],
    "aggregator": {"plugin": "fuse"},
}


def _fs(t: torch.Tensor, image_size, model_size) -> FeatureSet:
    return FeatureSet(
        {"x": t[None]}, (0,), {"transform": ImageTransform.resize(image_size, model_size).to_dict()}
    )


def test_fuse_equals_written_out():
    torch.manual_seed(0)
    a, b = torch.randn(5, 6, 8), torch.randn(3, 3, 4)  # same squash-resize frame, two grids
    parts = {"a": _fs(a, (40, 30), (64, 48)), "b": _fs(b, (40, 30), (64, 48))}
    desc, transform = Fuse(Fuse.Options(weights=[1.0, 0.5], parts=["a", "b"])).fuse(parts)
    expected = torch.cat([F.normalize(a, dim=0), 0.5 * F.normalize(resize_map(b, (8, 6)), dim=0)])
    torch.testing.assert_close(desc, expected, atol=1e-5, rtol=1e-5)
    assert transform.model_size == (64, 48)


def test_pair_pca_written_out():
    torch.manual_seed(1)
    s, t = torch.randn(6, 4, 4), torch.randn(6, 3, 5)
    ps, pt = pca_project([s, t], 2)
    cells = torch.cat([s.reshape(6, -1).T, t.reshape(6, -1).T]).double()
    centred = cells - cells.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    proj = (centred @ vh[:2].T).float()
    torch.testing.assert_close(ps, proj[:16].T.reshape(2, 4, 4))
    torch.testing.assert_close(pt, proj[16:].T.reshape(2, 3, 5))
    assert pca_project([s], 8)[0] is s  # fewer channels than asked: unchanged


def test_two_extractors_recover_a_shift(manager, tmp_path):
    big = smooth_texture((140, 110), seed=8, cells=7)
    src = big.crop((10, 10, 110, 90))
    tgt = big.crop((17, 14, 117, 94))
    data = {**TWO, "matcher": {"plugin": "nearest"}}
    pipe = Pipeline.from_dict(data, store=tmp_path / "s.zarr", manager=manager)
    pts = torch.tensor(
        [[x, y] for x in range(20, 81, 15) for y in range(20, 61, 15)], dtype=torch.float32
    )
    res = pipe.match(src, tgt, pts)
    err = (res.points - (pts - torch.tensor([7.0, 4.0]))).norm(dim=1)
    assert (err <= 2.0).float().mean() >= 0.8, err
    # each extractor is stored under its own cache key
    assert len(pipe.store.extractors()) == 2
    assert [i.name for i in pipe.layers()] == ["fine:color", "coarse:color"]


def test_fuse_with_pair_pca_runs_through_the_pipeline(manager):
    img = smooth_texture((64, 64), seed=2)
    data = {**TWO, "aggregator": {"plugin": "fuse", "pca_dim": 3, "reference": "coarse"}}
    pipe = Pipeline.from_dict(data, manager=manager)
    src, _ = pipe.views(img, img)
    assert src.descriptors.shape == (3 + 3, 16, 16)  # fine: 6 -> 3 channels, coarse: 3 (<= 3)
    res = pipe.match(img, img, [(20.0, 30.0)])
    assert (res.points - torch.tensor([[20.0, 30.0]])).abs().max() <= 2.0


def test_multi_extractor_config_errors(manager, tmp_path):
    with pytest.raises(ConfigError, match=r"#2 needs name"):
        Pipeline.from_dict(
            {"extractor": [{"name": "a", "plugin": "color-blur"}, {"plugin": "color-blur"}]},
            manager=manager,
        )
    with pytest.raises(ConfigError, match="used twice"):
        Pipeline.from_dict(
            {"extractor": [{"name": "a", "plugin": "color-blur"}] * 2}, manager=manager
        )
    pipe = Pipeline.from_dict({**TWO, "aggregator": {"plugin": "select"}}, manager=manager)
    with pytest.raises(ConfigError, match=r"2 extractors.*fuse"):
        pipe.match(smooth_texture((32, 32)), smooth_texture((32, 32)), [(1, 1)])
    bad = Pipeline.from_dict(
        {**TWO, "aggregator": {"plugin": "fuse", "parts": ["fine", "nope"]}}, manager=manager
    )
    with pytest.raises(ConfigError, match="no extractor named 'nope'"):
        bad.view(smooth_texture((32, 32)))
    p = tmp_path / "two.toml"
    p.write_text(to_toml(Pipeline.from_dict(TWO, manager=manager).config.resolved()))
    assert "[[extractor]]" in p.read_text()
    cfg = load_config(p, ["extractor.coarse.stride=4"], manager=manager)
    assert cfg.extractors[1].options.stride == 4 and cfg.extractors[1].name == "coarse"
    with pytest.raises(ConfigError, match="extractor.NAME.OPTION"):
        load_config(p, ["extractor.stride=4"], manager=manager)


def test_sd_dino_preset_runs_on_tiny_models(tiny_sd, tmp_path):
    """The shipped SD-DINO preset, with tiny models swapped in, runs end to end."""
    from pathlib import Path

    from diffeat.testing import build_tiny_captioner
    from diffeat.testing.vit import build_tiny_dinov2, build_tiny_openclip

    dino = build_tiny_dinov2(tmp_path / "dinov2")
    clip_config, clip_weights = build_tiny_openclip(tmp_path / "clip")
    captioner = build_tiny_captioner(tmp_path / "captioner.safetensors", clip_dim=16)
    preset = Path(__file__).resolve().parents[1] / "examples" / "sd-dino.toml"
    overrides = [
        f"extractor.sd.model={tiny_sd}",
        f"extractor.sd.captioner={captioner}",
        f"extractor.sd.captioner_clip={clip_config}",
        f"extractor.sd.captioner_clip_pretrained={clip_weights}",
        "extractor.sd.image_size=[128, 128]",
        "extractor.sd.tile_size=[64, 64]",
        "extractor.sd.tile_stride=[64, 64]",
        f"extractor.dino.model={dino}",
        "extractor.dino.image_size=[56, 56]",
        "extractor.dino.blocks=[-1]",
        "aggregator.pca_dim=4",
    ]
    pipe = Pipeline.from_file(preset, overrides=overrides, store=tmp_path / "s.zarr")
    img = smooth_texture((70, 50), seed=4)
    src, tgt = pipe.views(img, smooth_texture((60, 60), seed=5))
    # sd: 3 layers x 4 PCA channels, dino: its hidden width; on DINOv2's grid
    dino_width = pipe.sources[1].layers()[0].channels
    assert src.descriptors.shape[0] == 3 * 4 + dino_width
    assert src.grid_size == tgt.grid_size == (4, 4)
    res = pipe.match(img, img, [(30.0, 20.0)])
    assert res.points.shape == (1, 2)


def _padded(t: torch.Tensor, image_size, canvas: int) -> FeatureSet:
    from diffeat.core.images import fit_transform

    transform = fit_transform(image_size, (canvas, canvas), "pad")
    return FeatureSet(
        {f"l{i}": m[None] for i, m in enumerate(t)}, (0,), {"transform": transform.to_dict()}
    )


def test_sd_dino_switches_equal_the_official_co_pca_and_fusion():
    """SD-DINO's co_pca + fusion written out: per layer a PCA on both images' cells, s5
    upsampled to s4 and put after it, that to s3 and put after it, the SD descriptor and
    the DINO tokens L2-normalised apart and concatenated, cells paired by index."""
    import numpy as np

    torch.manual_seed(5)
    sizes = {"s5": 2, "s4": 4, "s3": 8}
    sd = [{k: torch.randn(12, s, s) for k, s in sizes.items()} for _ in range(2)]
    dino = [torch.randn(6, 8, 8) for _ in range(2)]
    dim = 3

    reduced: list[dict[str, torch.Tensor]] = [{}, {}]
    for k, s in sizes.items():
        cells = np.concatenate([sd[0][k].reshape(12, -1).T, sd[1][k].reshape(12, -1).T]).astype(
            np.float64
        )
        centred = cells - cells.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = torch.from_numpy(centred @ vt[:dim].T).float()
        reduced[0][k] = proj[: s * s].T.reshape(dim, s, s)
        reduced[1][k] = proj[s * s :].T.reshape(dim, s, s)
    expected = []
    for r, d in zip(reduced, dino):
        s5 = F.interpolate(r["s5"][None], size=(4, 4), mode="bilinear", align_corners=False)[0]
        s45 = torch.cat([r["s4"], s5])
        s45 = F.interpolate(s45[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
        desc = torch.cat([r["s3"], s45]).reshape(3 * dim, -1).T
        expected.append(
            torch.cat([F.normalize(desc, dim=1), F.normalize(d.reshape(6, -1).T, dim=1)], 1)
        )

    parts = [
        {
            "sd": _padded([sd[i]["s5"], sd[i]["s4"], sd[i]["s3"]], size, 64),
            "dino": _padded([dino[i]], size, 56),
        }
        for i, size in enumerate([(90, 60), (70, 100)])
    ]
    options = Fuse.Options(
        parts=["sd", "dino"],
        reference="dino",
        pca_dim=dim,
        pca_parts=["sd"],
        pca="pair",
        upsample="cascade",
        alignment="cells",
    )
    (a, _), (b, _) = Fuse(options).fuse_pair(*parts)
    got = [m.reshape(m.shape[0], -1).T for m in (a, b)]
    # PCA signs are arbitrary: compare what matching sees, the cross similarities
    torch.testing.assert_close(got[0] @ got[1].T, expected[0] @ expected[1].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0] @ got[0].T, expected[0] @ expected[0].T, atol=1e-5, rtol=1e-5)


def test_lowrank_pca_is_seeded_and_leaves_the_random_state_alone():
    torch.manual_seed(6)
    basis = torch.randn(10, 3) * torch.tensor([9.0, 6.0, 4.0])  # three strong directions
    maps = [
        (basis @ torch.randn(3, n * n) + 0.01 * torch.randn(10, n * n)).reshape(10, n, n)
        for n in (5, 4)
    ]
    state = torch.random.get_rng_state()
    first = pca_project(maps, 3, "lowrank")
    assert torch.equal(torch.random.get_rng_state(), state)
    second = pca_project(maps, 3, "lowrank")
    torch.testing.assert_close(first[0], second[0])
    exact = pca_project(maps, 3)
    with pytest.raises(ConfigError, match=r"pca_dim = 50 needs at least 50 cells.*5x5 \+ 4x4"):
        pca_project([m.repeat(6, 1, 1) for m in maps], 50)  # 60 channels, 41 cells
    # the same leading subspace up to the randomised solver's accuracy
    gram = lambda ms: torch.cat([m.flatten(1) for m in ms], 1).T  # noqa: E731
    torch.testing.assert_close(
        gram(first) @ gram(first).T, gram(exact) @ gram(exact).T, atol=1e-3, rtol=1e-3
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lowrank_pca_on_cuda_repeats_and_leaves_the_cuda_random_state_alone():
    torch.manual_seed(7)
    maps = [torch.randn(10, 5, 5, device="cuda"), torch.randn(10, 4, 4, device="cuda")]
    state = torch.cuda.get_rng_state()
    first = pca_project(maps, 3, "lowrank")
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert first[0].device.type == "cuda"
    torch.testing.assert_close(first[0], pca_project(maps, 3, "lowrank")[0])
