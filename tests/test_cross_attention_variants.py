"""The result-changing speed-ups of the ``cross-attention`` matcher (issue 11): a float16 or
bfloat16 UNet/VAE and a bank of pre-encoded crops. Both are off by default (the parity test in
``test_cross_attention.py`` covers the official float32 path); here: they validate, run on the
tiny SD, do what they promise (gradients reach a float32 context through a bfloat16 UNet; a bank
of N crops costs at most N VAE encodes per point) and have their own store keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cross_attention import SIZE, _view
from test_cross_attention import _matcher as _parity_matcher

from diffeat.core.components import View
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.options import build_options, options_dict
from diffeat.core.sources import extractor_cache_key
from diffeat.plugins.cross_attention.crops import crop_bounds, crop_side, squashed, stream_seed
from diffeat.plugins.cross_attention.matcher import CrossAttentionMatcher, _half_on_cpu
from diffeat.plugins.cross_attention.options import CrossAttentionOptions
from diffeat.testing import smooth_texture


@pytest.fixture(scope="module")
def views() -> tuple[View, View]:
    return _view((80, 60), 1), _view((48, 64), 2)


def _matcher(model: Path, **options: object) -> CrossAttentionMatcher:
    """The parity tests' tiny matcher, without the per-layer maps (not needed here)."""
    return _parity_matcher(model, **{"return_maps": False, **options})


def _count_encoded(matcher: CrossAttentionMatcher) -> list[int]:
    """The batch size of every VAE encoder call of ``matcher``."""
    encoded: list[int] = []
    matcher.parts.vae.encoder.register_forward_hook(lambda m, a, out: encoded.append(len(a[0])))
    return encoded


# -- options -------------------------------------------------------------------------------------


def test_defaults_are_the_official_recipe() -> None:
    o = CrossAttentionOptions()
    assert (o.dtype, o.crop_bank) == ("float32", 0)


def test_bad_values_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"dtype = 'float64' is not one of 'float32'"):
        CrossAttentionOptions(dtype="float64").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"crop_bank = -1 is out of range.*crop_bank: 0 \(off\)"):
        CrossAttentionOptions(crop_bank=-1).validate()
    # from a pipeline file: the key, the value and the choices
    with pytest.raises(ConfigError, match=r"matcher.dtype: 'fp16' is not one of 'float32'"):
        build_options(CrossAttentionMatcher, {"dtype": "fp16"}, "matcher")
    with pytest.raises(ConfigError, match=r"matcher.crop_bank: expected int, got 2.5"):
        build_options(CrossAttentionMatcher, {"crop_bank": 2.5}, "matcher")
    with pytest.raises(ConfigError, match=r"matcher: crop_bank = -3 is out of range"):
        build_options(CrossAttentionMatcher, {"crop_bank": -3}, "matcher")


def test_cache_keys_differ_for_dtype_and_crop_bank() -> None:
    ident = {"fingerprint": "abc"}

    def key(**options: object) -> str:
        return extractor_cache_key("cross-attention", CrossAttentionOptions(**options), ident)

    keys = {
        key(),
        key(dtype="bfloat16"),
        key(dtype="float16"),
        key(crop_bank=8),
        key(crop_bank=16),
        key(dtype="bfloat16", crop_bank=8),
    }
    assert len(keys) == 6
    # the bank is keyed only when on, so stores written before it keep their contexts
    default = options_dict(CrossAttentionOptions(), cache_only=True)
    assert "crop_bank" not in default and default["dtype"] == "float32"
    assert options_dict(CrossAttentionOptions(crop_bank=8), cache_only=True)["crop_bank"] == 8
    # inference-only options still share a key
    assert key(crops=4) == key()


# -- half precision ------------------------------------------------------------------------------


def test_bfloat16_runs_on_cpu_and_trains_a_float32_context(
    tiny_sd: Path, views: tuple[View, View]
) -> None:
    source, target = views
    points = torch.tensor([[30.0, 20.0], [70.5, 41.25]])
    half = _matcher(tiny_sd, dtype="bfloat16", steps=3)
    assert half.parts.unet.dtype == torch.bfloat16 and half.parts.vae.dtype == torch.bfloat16
    result = half.match(source, target, points)
    tw, th = target.image_size
    assert result.points.dtype == torch.float32 and torch.isfinite(result.points).all()
    assert ((result.points >= 0) & (result.points < torch.tensor([tw, th]))).all()
    losses = result.extras["losses"]
    assert losses.shape == (2, 2, 3) and torch.isfinite(losses).all()
    # the first step's loss (same initial context, crop and noise as float32) differs by
    # bfloat16 rounding only
    full = _matcher(tiny_sd, steps=1).match(source, target, points)
    torch.testing.assert_close(losses[..., 0], full.extras["losses"][..., 0], rtol=0.05, atol=0)

    # the context stays float32 and Adam moves it: gradients flow through the bfloat16 UNet
    point = (30.0, 20.0)
    jobs = half.jobs([point], "optimise")
    half.optimise(squashed(source.image, SIZE), jobs)
    width = half.parts.unet.config.cross_attention_dim
    for r, job in enumerate(jobs):
        g = torch.Generator().manual_seed(stream_seed(0, "optimise", point, r))
        start = torch.randn((77, width), generator=g)
        assert job.context is not None and job.context.dtype == torch.float32
        moved = (job.context[0] - start).abs().max()
        assert 0 < moved < 0.1  # Adam moves each entry by about lr (0.0024) a step


def test_float16_on_cpu_runs_or_says_what_to_use(tiny_sd: Path, views: tuple[View, View]) -> None:
    try:
        result = _matcher(tiny_sd, dtype="float16", steps=1, restarts=1, crops=4).match(
            *views, torch.tensor([[30.0, 20.0]])
        )
    except DiffeatError as exc:  # a torch without float16 CPU kernels
        assert "bfloat16" in str(exc)
    else:
        assert torch.isfinite(result.points).all()
    # the message a missing kernel gives, and that other errors pass through untouched
    with pytest.raises(DiffeatError, match=r"matcher.dtype = 'float16'.*use dtype = 'bfloat16'"):
        with _half_on_cpu("float16", torch.device("cpu")):
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
    with pytest.raises(RuntimeError, match="other"):
        with _half_on_cpu("float16", torch.device("cpu")):
            raise RuntimeError("other")
    with pytest.raises(RuntimeError, match="Half"):
        with _half_on_cpu("float32", torch.device("cpu")):
            raise RuntimeError("not implemented for 'Half'")


# -- the crop bank -------------------------------------------------------------------------------


def test_crop_bank_encodes_n_crops_per_point_not_one_a_step(
    tiny_sd: Path, views: tuple[View, View]
) -> None:
    source, _ = views
    image = squashed(source.image, SIZE)
    steps, restarts, n = 6, 3, 4
    # official: one encode per step and restart
    official = _matcher(tiny_sd, steps=steps, restarts=restarts)
    encoded = _count_encoded(official)
    official.optimise(image, official.jobs([(32.0, 30.0)], "optimise"))
    assert sum(encoded) == steps * restarts == 18
    # the bank: n crops drawn once for the point (shared by its restarts), each distinct
    # position encoded once, then every step draws from them
    banked = _matcher(tiny_sd, steps=steps, restarts=restarts, crop_bank=n)
    encoded = _count_encoded(banked)
    starts: list[list[tuple[int, int]]] = []
    inner = banked.crop_bank_of

    def recorded(img: torch.Tensor, point: tuple[float, float]):
        bank = inner(img, point)
        if not starts or starts[-1] is not bank.starts:
            starts.append(bank.starts)
        return bank

    banked.crop_bank_of = recorded  # type: ignore[method-assign]
    jobs = banked.jobs([(32.0, 30.0)], "optimise")
    banked.optimise(image, jobs)
    (bank,) = starts
    assert len(bank) == n and 1 <= sum(encoded) == len(set(bank)) <= n
    crop = crop_side(SIZE, banked.options.crop_percent)
    (xl, xh), (yl, yh) = (crop_bounds(p, SIZE, crop, banked.options.margin) for p in (32, 30))
    assert all(xl <= x <= xh and yl <= y <= yh for x, y in bank)  # the official rule
    assert all(len(j.losses) == steps and j.context is not None for j in jobs)
    assert banked._banks == {}  # dropped once the point is done

    # a point in the corner has a single valid crop: one encode for all 18 steps
    encoded.clear()
    banked.optimise(image, banked.jobs([(2.0, 2.0)], "optimise"))
    assert encoded == [1]
    # two points: one bank each
    encoded.clear()
    starts.clear()
    banked.optimise(image, banked.jobs([(2.0, 2.0), (32.0, 30.0)], "optimise"))
    assert len(starts) == 2 and sum(encoded) == 1 + len(set(bank))


def test_crop_bank_steps_use_the_banked_crops(
    tiny_sd: Path, views: tuple[View, View], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step's Gaussian target sits at the point in one of the bank's crops."""
    import diffeat.plugins.cross_attention.matcher as module

    source, _ = views
    matcher = _matcher(tiny_sd, steps=5, restarts=2, crop_bank=3)
    seen: list[tuple[int, int]] = []
    real = module.gaussian_target

    def spy(point, x0, y0, crop, size, sigma):
        seen.append((x0, y0))
        return real(point, x0, y0, crop, size, sigma)

    banks: list[list[tuple[int, int]]] = []
    inner = matcher.crop_bank_of

    def recorded(img, point):
        bank = inner(img, point)
        banks.append(bank.starts)
        return bank

    matcher.crop_bank_of = recorded  # type: ignore[method-assign]
    monkeypatch.setattr(module, "gaussian_target", spy)
    matcher.optimise(squashed(source.image, SIZE), matcher.jobs([(40.0, 25.0)], "optimise"))
    assert len(seen) == 10 and set(seen) <= set(banks[0])


def test_crop_bank_match_and_batching(tiny_sd: Path, views: tuple[View, View]) -> None:
    source, target = views
    points = torch.tensor([[30.0, 20.0], [10.0, 50.0]])
    one = _matcher(tiny_sd, crop_bank=4, return_maps=True).match(source, target, points)
    matcher = _matcher(tiny_sd, crop_bank=4, return_maps=True, max_batch=4)
    batched = matcher.match(source, target, points)
    tw, th = target.image_size
    assert ((one.points >= 0) & (one.points < torch.tensor([tw, th]))).all()
    # the bank's draws come from per-(seed, point) generators: batching changes no draw
    torch.testing.assert_close(batched.extras["losses"], one.extras["losses"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batched.points, one.points)
    # and the bank is not the official per-step crop (the losses differ)
    official = _matcher(tiny_sd).match(source, target, points)
    assert not torch.allclose(official.extras["losses"][..., 1], one.extras["losses"][..., 1])


def test_cli_takes_the_variants_and_names_a_bad_dtype(tiny_sd: Path, tmp_path: Path) -> None:
    from clihelp import run, run_json

    root = Path(__file__).resolve().parents[1]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    smooth_texture((80, 60), seed=1).save(a)
    smooth_texture((48, 64), seed=2).save(b)
    common = [
        "match", root / "examples" / "hedlin-sd14.toml", a, b, "--point", "30,20",
        "--model", str(tiny_sd), "--device", "cpu", "--set", "matcher.size=64",
        "--set", "matcher.steps=2", "--set", "matcher.restarts=1", "--set", "matcher.crops=4",
    ]  # fmt: skip
    out = run_json(
        *common, "--set", 'matcher.dtype="bfloat16"', "--set", "matcher.crop_bank=3", timeout=600
    )
    (row,) = out["matches"]
    assert 0 <= row["target"][0] < 48 and 0 <= row["target"][1] < 64
    proc = run(*common, "--set", 'matcher.dtype="half"', check=2, timeout=600)
    assert "(cross-attention).dtype: 'half' is not one of 'float32', 'float16', 'bfloat16'" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
