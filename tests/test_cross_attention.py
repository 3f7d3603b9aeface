"""The ``cross-attention`` matcher (Hedlin et al.): parity with a written-out copy of the
official optimisation and inference loops on the tiny SD, batching, conformance, bad input
and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clihelp import run, run_json

from diffeat.core.components import View
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.geometry import ImageTransform
from diffeat.plugins.cross_attention.crops import stream_seed
from diffeat.plugins.cross_attention.matcher import CrossAttentionMatcher
from diffeat.plugins.cross_attention.options import CrossAttentionOptions
from diffeat.testing import smooth_texture
from diffeat.testing.conformance import check_matcher

SIZE = 64  # the tiny model at 64 px: latent 8, up_blocks.1 at 2x2, up_blocks.2 at 4x4
TINY = {"size": SIZE, "steps": 2, "restarts": 2, "crops": 5, "device": "cpu", "return_maps": True}
ROOT = Path(__file__).resolve().parents[1]


def _view(size: tuple[int, int], seed: int) -> View:
    image = smooth_texture(size, seed=seed)
    return View(image, ImageTransform.resize(image.size, image.size))


@pytest.fixture(scope="module")
def views() -> tuple[View, View]:
    return _view((80, 60), 1), _view((48, 64), 2)


def _matcher(model: Path, **options: object) -> CrossAttentionMatcher:
    return CrossAttentionMatcher(CrossAttentionOptions(model=str(model), **{**TINY, **options}))


# -- the official loops, written out (utils/optimize_token.py and utils/optimize.py) -------------


class _Store:
    """Prompt-to-Prompt's AttentionStore as the official code uses it: every cross-attention
    map with at most ``max_tokens`` queries, in down, mid, up order, heads ``h//2:`` only."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.maps: dict[str, list[torch.Tensor]] = {"down": [], "mid": [], "up": []}

    def __call__(self, attn: torch.Tensor, place: str) -> None:
        h = attn.shape[0]
        if attn.shape[1] <= self.max_tokens:
            self.maps[place].append(attn[h // 2 :])

    def ordered(self) -> list[torch.Tensor]:
        return self.maps["down"] + self.maps["mid"] + self.maps["up"]


class _OfficialProcessor:
    """The official ``ca_forward``: softmax(q k^T * scale) computed here and handed to the store."""

    def __init__(self, place: str, holder: dict[str, _Store]) -> None:
        self.place = place
        self.holder = holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * attn.scale
        probs = torch.nn.Softmax(dim=-1)(sim).clone()
        if is_cross:
            self.holder["store"](probs, self.place)
        out = attn.batch_to_head_dim(torch.matmul(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def _official_unet(model: Path) -> tuple[torch.nn.Module, dict[str, _Store]]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
    unet.requires_grad_(False)
    holder: dict[str, _Store] = {}
    procs = {}
    for name in unet.attn_processors:
        place = "down" if name.startswith("down") else "mid" if name.startswith("mid") else "up"
        procs[name] = _OfficialProcessor(place, holder)
    unet.set_attn_processor(procs)
    return unet, holder


def _official_scheduler():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    s.set_timesteps(50)
    return s


def _crop_image(image, pixel, gen, crop_percent, margin=0.15):
    """The official ``crop_image`` (its ``torch.randint`` draws from ``gen``)."""
    height, width, _ = image.shape
    crop_height = int(height * crop_percent / 100)
    crop_width = int(width * crop_percent / 100)
    x, y = pixel
    safe_x, safe_y = int(crop_width * margin), int(crop_height * margin)
    x_min = min(max(0, x - crop_width + safe_x), width - crop_width)
    x_max = min(max(0, x - safe_x), width - crop_width)
    y_min = min(max(0, y - crop_height + safe_y), height - crop_height)
    y_max = min(max(0, y - safe_y), height - crop_height)
    x_start = torch.randint(int(x_min), int(x_max) + 1, (1,), generator=gen).item()
    y_start = torch.randint(int(y_min), int(y_max) + 1, (1,), generator=gen).item()
    cropped = image[y_start : y_start + crop_height, x_start : x_start + crop_width]
    cropped = F.interpolate(
        torch.tensor(cropped[None]).permute(0, 3, 1, 2),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )[0]
    new_pixel = torch.stack([x - x_start, y - y_start]) / crop_width
    return cropped.permute(1, 2, 0).numpy(), new_pixel, y_start, crop_height, x_start, crop_width


def _image2latent(vae, image):
    with torch.no_grad():
        x = torch.from_numpy(image).float() * 2 - 1
        return vae.encode(x.permute(2, 0, 1).unsqueeze(0))["latent_dist"].mean * 0.18215


def _upscale(store: _Store, layers: list[int], res: int) -> torch.Tensor:
    imgs = []
    for i, img in enumerate(store.ordered()):
        if i not in layers:
            continue
        side = int(img.shape[1] ** 0.5)
        img = img.reshape(img.shape[0], side, side, img.shape[2])[None, :, :, :, 1]
        imgs.append(F.interpolate(img, size=(res, res), mode="bilinear", align_corners=False))
    return torch.cat(imgs, dim=0)


def _gaussian_circle(pos, size, sigma):
    _pos = pos * size
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1)
    dist_sq = (grid[..., 1] - _pos[0]) ** 2 + (grid[..., 0] - _pos[1]) ** 2
    return torch.exp(-1 * dist_sq / (2.0 * sigma**2.0))


def _find_max(tens, img_size):
    height = tens.shape[0]
    loc = torch.argmax(tens.reshape(-1))
    return (
        torch.stack([loc % height, torch.div(loc, height, rounding_mode="floor")])
        / height
        * img_size
    )


def _official_optimise(unet, holder, vae, sched, image, pixel_loc, gen, o, layers, dim):
    context = torch.randn((1, o.context_length, dim), generator=gen)
    context.requires_grad = True
    optimizer = torch.optim.Adam([context], lr=o.lr)
    losses = []
    for _ in range(o.steps):
        with torch.no_grad():
            cropped, cropped_pixel, *_ = _crop_image(image, pixel_loc * SIZE, gen, o.crop_percent)
            latent = _image2latent(vae, cropped)
        noise = torch.rand(latent.shape, generator=gen)
        noisy = sched.add_noise(latent, noise, sched.timesteps[-8])
        holder["store"] = _Store(32**2)
        unet(noisy, sched.timesteps[-8], encoder_hidden_states=context)
        maps = _upscale(holder["store"], layers, SIZE).mean(dim=1)
        gt = _gaussian_circle(cropped_pixel, SIZE, o.sigma).reshape(1, -1).repeat(len(maps), 1)
        loss = torch.nn.MSELoss()(maps.reshape(len(maps), -1), gt)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return context.detach(), losses


@torch.no_grad()
def _official_inference(unet, holder, vae, sched, image, context, gen, o, layers):
    n_heads = None
    num = sum_ = None
    corners = torch.tensor([[0, 0], [0, SIZE], [SIZE, 0], [SIZE, SIZE]]).float()
    for i in range(o.crops):
        if i < 4:
            pixel_loc = corners[i]
        else:
            running = sum_ / num
            running[running != running] = 0
            running = running.mean(dim=0).mean(dim=0)
            pixel_loc = _find_max(running, SIZE) + 0.5
        cropped, _, y0, h, x0, w = _crop_image(image, pixel_loc, gen, o.crop_percent)
        latents = _image2latent(vae, cropped)
        latents = sched.add_noise(
            latents, torch.rand(latents.shape, generator=gen), sched.timesteps[-3]
        )
        holder["store"] = _Store(32**2)
        unet(latents, sched.timesteps[-3], encoder_hidden_states=context)
        maps = _upscale(holder["store"], layers, h)
        if num is None:
            n_heads = maps.shape[1]
            num = torch.zeros(len(layers), n_heads, SIZE, SIZE)
            sum_ = torch.zeros(len(layers), n_heads, SIZE, SIZE)
        num[:, :, y0 : y0 + h, x0 : x0 + w] += 1
        sum_[:, :, y0 : y0 + h, x0 : x0 + w] += maps
    return sum_ / num


def _squashed_hwc(view: View) -> np.ndarray:
    from PIL import Image

    img = view.image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return (torch.from_numpy(np.asarray(img).copy()).float() / 255).numpy()


# official indices of the tiny model's maps at 64 px (all are <= 32x32): down 0..5, mid 6,
# up_blocks.1 7..9, up_blocks.2 10..12, up_blocks.3 13..15; the default layers are 7..10
TINY_OFFICIAL_LAYERS = [7, 8, 9, 10]


def test_parity_with_official_loops(tiny_sd: Path, views: tuple[View, View]) -> None:
    source, target = views
    points = torch.tensor([[30.0, 20.0], [70.5, 41.25]])
    matcher = _matcher(tiny_sd)
    result = matcher.match(source, target, points)
    o = matcher.options

    unet, holder = _official_unet(tiny_sd)
    vae, sched = matcher.parts.vae, _official_scheduler()
    assert int(sched.timesteps[-8]) == o.optimise_timestep == 140
    assert int(sched.timesteps[-3]) == o.inference_timestep == 40
    src_img, tgt_img = _squashed_hwc(source), _squashed_hwc(target)
    dim = unet.config.cross_attention_dim
    sw, sh = source.image_size
    tw, th = target.image_size
    for n in range(len(points)):
        kps = (
            points[n] * (SIZE / torch.tensor([sw, sh], dtype=torch.float64)).float()
        )  # x * (imside / W)
        point = (float(kps[0]), float(kps[1]))
        contexts = []
        for r in range(o.restarts):
            gen = torch.Generator().manual_seed(stream_seed(o.seed, "optimise", point, r))
            ctx, losses = _official_optimise(
                unet, holder, vae, sched, src_img, kps / SIZE, gen, o, TINY_OFFICIAL_LAYERS, dim
            )
            torch.testing.assert_close(
                torch.tensor(losses), result.extras["losses"][n, r], atol=1e-6, rtol=1e-5
            )
            contexts.append(ctx)
        all_maps = []
        for r, ctx in enumerate(contexts):
            gen = torch.Generator().manual_seed(stream_seed(o.seed, "infer", point, r))
            attn = _official_inference(
                unet, holder, vae, sched, tgt_img, ctx, gen, o, TINY_OFFICIAL_LAYERS
            )
            all_maps.append(
                torch.stack([attn[k].mean(dim=0, keepdim=True) for k in range(len(attn))])
            )
        maps = torch.stack(all_maps).mean(dim=0)
        maps = torch.nn.Softmax(dim=-1)(maps.reshape(len(maps), SIZE * SIZE)).reshape(
            -1, SIZE, SIZE
        )
        ref_maps = result.extras["attention"][n]
        torch.testing.assert_close(maps, ref_maps, atol=1e-5, rtol=0)
        best = _find_max(maps.mean(dim=0), SIZE) + 0.5
        expected = best * torch.tensor([tw / SIZE, th / SIZE])
        torch.testing.assert_close(result.points[n], expected.float(), atol=1e-5, rtol=0)


def test_batched_equals_one_at_a_time(tiny_sd: Path, views: tuple[View, View]) -> None:
    source, target = views
    points = torch.tensor([[30.0, 20.0], [10.0, 50.0]])
    one = _matcher(tiny_sd, restarts=1).match(source, target, points)
    matcher = _matcher(tiny_sd, restarts=1, max_batch=2)
    encoded: list[int] = []
    matcher.parts.vae.encoder.register_forward_hook(lambda m, a, out: encoded.append(len(a[0])))
    batched = matcher.match(source, target, points)
    # 2 optimisation steps of both jobs in one call each, then each of the 4 corner crops
    # once for both jobs, then the crops at the argmax (once per distinct position)
    assert encoded[:6] == [2, 2, 1, 1, 1, 1] and 1 <= sum(encoded[6:]) <= 2
    torch.testing.assert_close(batched.extras["losses"], one.extras["losses"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        batched.extras["attention"], one.extras["attention"], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(batched.points, one.points)


def test_conformance(tiny_sd: Path) -> None:
    points = torch.tensor([[79.0, 59.0], [12.5, 47.25]])  # a corner and a fractional point
    check_matcher(lambda: _matcher(tiny_sd, steps=1, restarts=1, crops=4), points=points)


def test_empty_points_is_a_clear_error(tiny_sd: Path, views: tuple[View, View]) -> None:
    with pytest.raises(ValueError, match="no source points"):
        _matcher(tiny_sd).match(*views, torch.zeros((0, 2)))


def test_point_outside_the_source_is_a_clear_error(tiny_sd: Path, views: tuple[View, View]) -> None:
    with pytest.raises(DiffeatError, match=r"source point \(80, 5\) lies outside the 80x60 image"):
        _matcher(tiny_sd).match(*views, torch.tensor([[80.0, 5.0]]))


def test_layer_without_cross_attention_names_it(tiny_sd: Path, views: tuple[View, View]) -> None:
    with pytest.raises(ConfigError, match=r"'up_blocks.0' has no cross-attention"):
        _matcher(tiny_sd, layers=["up_blocks.0"]).match(*views, torch.tensor([[5.0, 5.0]]))
    with pytest.raises(ConfigError, match=r"'up_blocks.9.attentions.0' is not a module"):
        _matcher(tiny_sd, layers=["up_blocks.9.attentions.0"]).match(
            *views, torch.tensor([[5.0, 5.0]])
        )


def test_timestep_beyond_the_schedule_is_refused(tiny_sd: Path, views: tuple[View, View]) -> None:
    with pytest.raises(ConfigError, match="optimise_timestep = 1000 is beyond the model's 1000"):
        _matcher(tiny_sd, optimise_timestep=1000).match(*views, torch.tensor([[5.0, 5.0]]))


def test_no_weight_needs_gradients(tiny_sd: Path) -> None:
    matcher = _matcher(tiny_sd)
    modules = (matcher.parts.unet, matcher.parts.vae)
    assert not any(p.requires_grad for m in modules for p in m.parameters())


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        CrossAttentionOptions(token=77).validate()
    with pytest.raises(ValueError, match="size"):
        CrossAttentionOptions(size=100).validate()


@pytest.mark.parametrize("preset", ["hedlin-sd14.toml", "hedlin-sd15.toml"])
def test_presets_load(preset: str) -> None:
    from diffeat.core.config import load_config

    cfg = load_config(ROOT / "examples" / preset)
    assert cfg.matcher.plugin == "cross-attention"


def test_cli_match_end_to_end(tiny_sd: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    smooth_texture((80, 60), seed=1).save(a)
    smooth_texture((48, 64), seed=2).save(b)
    out = run_json(
        "match", ROOT / "examples" / "hedlin-sd14.toml", a, b, "--point", "30,20",
        "--model", str(tiny_sd), "--device", "cpu",
        "--set", "matcher.size=64", "--set", "matcher.steps=1", "--set", "matcher.restarts=1",
        "--set", "matcher.crops=5",
    )  # fmt: skip
    (row,) = out["matches"]
    assert row["source"] == [30.0, 20.0]
    x, y = row["target"]
    assert 0 <= x < 48 and 0 <= y < 64 and row["valid"]
    # --json gives each layer's peak softmax probability (a map of 64 x 64 pixels)
    assert list(row["layer_peaks"]) == list(CrossAttentionOptions().layers)
    assert all(1 / 64**2 <= v <= 1 for v in row["layer_peaks"].values())


def test_cli_plot_attention(tiny_sd: Path, tmp_path: Path) -> None:
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    smooth_texture((80, 60), seed=1).save(a)
    smooth_texture((48, 64), seed=2).save(b)
    png = tmp_path / "attention.png"
    out = run_json(
        "plot", "attention", ROOT / "examples" / "hedlin-sd14.toml", a, b,
        "--point", "30,20", "--point", "5,5", "--out", png,
        "--model", str(tiny_sd), "--device", "cpu",
        "--set", "matcher.size=64", "--set", "matcher.steps=1", "--set", "matcher.restarts=1",
        "--set", "matcher.crops=4",
    )  # fmt: skip
    assert out["layers"] == list(CrossAttentionOptions().layers) and len(out["matches"]) == 2
    with Image.open(png) as im:  # two rows of source + 4 layers + their mean
        assert im.width > im.height > 0
    proc = run(
        "plot", "attention", ROOT / "examples" / "dift-sd21.toml", a, b, "--point", "1,1",
        "--out", png, check=2,
    )  # fmt: skip
    assert "cross-attention matcher" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_names_a_layer_without_cross_attention(tiny_sd: Path, tmp_path: Path) -> None:
    a = tmp_path / "a.png"
    smooth_texture((80, 60), seed=1).save(a)
    proc = run(
        "match", ROOT / "examples" / "hedlin-sd14.toml", a, a, "--point", "30,20",
        "--set", f"matcher.model={json.dumps(str(tiny_sd))}", "--set", "matcher.size=64",
        "--set", 'matcher.layers=["up_blocks.0"]', "--set", 'matcher.device="cpu"',
        check=2,
    )  # fmt: skip
    assert "'up_blocks.0' has no cross-attention" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hedlin_preset_is_the_official_recipe() -> None:
    from dataclasses import asdict

    from diffeat.core.config import load_config

    cfg = load_config(ROOT / "examples" / "hedlin-sd14.toml")
    m = cfg.resolved()["matcher"]
    assert cfg.protocol == "hedlin"
    assert m["model"] == "CompVis/stable-diffusion-v1-4"
    assert m["layers"] == [
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
        "up_blocks.2.attentions.0",
    ]
    assert (m["token"], m["context_length"], m["size"]) == (1, 77, 512)
    assert (m["steps"], m["restarts"], m["crops"]) == (129, 5, 20)
    assert m["lr"] == pytest.approx(0.0023756, abs=1e-7)
    assert (m["optimise_timestep"], m["inference_timestep"]) == (140, 40)
    assert m["sigma"] == pytest.approx(27.98, abs=0.01)
    assert m["crop_percent"] == pytest.approx(93.17, abs=0.01)
    assert (m["noise"], m["heads"], m["margin"], m["offset"]) == (
        "uniform",
        "upper-half",
        0.15,
        0.5,
    )
    defaults = asdict(CrossAttentionOptions())
    assert {k: v for k, v in m.items() if k != "plugin"} == defaults
    # 477 px crops, 71 px margin at 512, as METHODS.md states
    from diffeat.plugins.cross_attention.crops import crop_side

    assert crop_side(512, m["crop_percent"]) == 477
    assert int(477 * m["margin"]) == 71


def test_crop_margin_rule_by_hand() -> None:
    from diffeat.plugins.cross_attention.crops import crop_bounds, gaussian_target

    # 477 px crops of 512 with a 71 px margin: the start ranges over [0, 35] where the slack allows
    assert crop_bounds(256.0, 512, 477, 0.15) == (0, 35)
    assert crop_bounds(10.0, 512, 477, 0.15) == (0, 0)  # near the left border: flush left
    assert crop_bounds(500.0, 512, 477, 0.15) == (35, 35)  # near the right border: flush right
    assert crop_bounds(100.0, 512, 200, 0.15) == (0, 70)  # 100 - 200 + 30 < 0; 100 - 30 = 70
    g = gaussian_target((110.0, 60.0), 10, 20, 200, 400, 5.0)  # the point at (200, 80) of 400
    assert g.shape == (400, 400) and g[80, 200] == 1.0 and g.argmax() == 80 * 400 + 200


def test_eval_runs_on_a_synthetic_benchmark(tiny_sd: Path, tmp_path: Path) -> None:
    from diffeat.core.pipeline import Pipeline
    from diffeat.eval.protocols import get_protocol
    from diffeat.eval.runner import evaluate
    from diffeat.plugins.datasets.spair import SPairOptions
    from diffeat.plugins.datasets.synthetic import Synthetic, make_synthetic

    photos = tmp_path / "photos" / "cat"
    photos.mkdir(parents=True)
    smooth_texture((64, 64), seed=0).save(photos / "t0.png")
    bench = tmp_path / "bench"
    make_synthetic(bench, [tmp_path / "photos"], pairs=1, points=2, kinds=["identity"], ext="png")
    pipe = Pipeline.from_file(
        ROOT / "examples" / "hedlin-sd14.toml",
        overrides=[
            f"matcher.model={json.dumps(str(tiny_sd))}",
            "matcher.size=64",
            "matcher.steps=1",
            "matcher.restarts=1",
            "matcher.crops=4",
            'matcher.device="cpu"',
        ],
    )
    dataset = Synthetic(SPairOptions(root=str(bench)))
    ev = evaluate(pipe, dataset, dataset_name="synthetic", protocol=get_protocol("hedlin"))
    (outcome,) = ev.outcomes
    assert len(outcome.distances()) == 2
    assert 0.0 <= ev.headline() <= 1.0


# -- contexts kept in the store ------------------------------------------------------------------


def _pipeline(tiny_sd: Path, store: Path, **options: object):
    from diffeat.core.pipeline import Pipeline

    matcher = {"plugin": "cross-attention", "model": str(tiny_sd), **TINY, **options}
    return Pipeline.from_dict({"matcher": matcher}, store=store)


def _count_optimised(pipe) -> list[int]:
    """Wrap the matcher's optimisation: the list gets the number of jobs of each call."""
    matcher = pipe.matcher
    calls: list[int] = []
    inner = matcher._optimise_chunk

    def counted(image, jobs):
        calls.append(len(jobs))
        return inner(image, jobs)

    matcher._optimise_chunk = counted
    return calls


def test_contexts_are_kept_and_reused_bit_for_bit(tiny_sd: Path, tmp_path: Path) -> None:
    source, target = _view((80, 60), 1), _view((48, 64), 2)
    other = _view((56, 40), 3)
    store = tmp_path / "feats.zarr"
    points = torch.tensor([[30.0, 20.0], [10.0, 50.0]])
    first = _pipeline(tiny_sd, store)
    calls = _count_optimised(first)
    fresh = first.match(source.image, target.image, points)
    assert sum(calls) == 2 * 2  # two points x two restarts
    # a new process-like pipeline on the same store: a rerun and a second target optimise nothing
    again = _pipeline(tiny_sd, store)
    calls = _count_optimised(again)
    rerun = again.match(source.image, target.image, points)
    again.match(source.image, other.image, points)
    assert calls == []
    assert torch.equal(rerun.points, fresh.points)
    assert torch.equal(rerun.extras["losses"], fresh.extras["losses"])
    assert torch.equal(rerun.extras["attention"], fresh.extras["attention"])
    # inference-only options share the contexts; an optimisation option does not
    more_crops = _pipeline(tiny_sd, store, crops=6)
    calls = _count_optimised(more_crops)
    more_crops.match(source.image, target.image, points)
    assert calls == []
    more_steps = _pipeline(tiny_sd, store, steps=3)
    calls = _count_optimised(more_steps)
    more_steps.match(source.image, target.image, points[:1])
    assert sum(calls) == 2
    from diffeat.store import FeatureStore

    info = FeatureStore(store).info()
    kept = {k: v for k, v in info["extractors"].items() if k.startswith("cross-attention-")}
    assert len(kept) == 2 and sorted(v["entries"] for v in kept.values()) == [1, 2]


def test_an_interrupted_run_resumes_with_the_points_it_finished(
    tiny_sd: Path, tmp_path: Path
) -> None:
    source, target = _view((80, 60), 1), _view((48, 64), 2)
    store = tmp_path / "feats.zarr"
    pipe = _pipeline(tiny_sd, store)
    calls = _count_optimised(pipe)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    pipe.matcher.attend = interrupted  # killed after the optimisation of both points
    with pytest.raises(KeyboardInterrupt):
        pipe.match(source.image, target.image, torch.tensor([[30.0, 20.0], [10.0, 50.0]]))
    assert sum(calls) == 4
    resumed = _pipeline(tiny_sd, store)
    calls = _count_optimised(resumed)
    resumed.match(source.image, target.image, torch.tensor([[30.0, 20.0], [5.0, 5.0]]))
    assert sum(calls) == 2  # only the new point's two restarts
