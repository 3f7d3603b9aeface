"""The ``diffusion-transformer`` extractor on tiny random SD3, FLUX and PixArt models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clihelp import run_json

from diffeat.core.errors import DiffeatError
from diffeat.core.images import as_input, fit_image, to_tensor
from diffeat.plugins.dit.extractor import DiffusionTransformerExtractor
from diffeat.plugins.dit.families import flow_sigma
from diffeat.plugins.dit.massive import ditf_normalise
from diffeat.plugins.dit.options import DiffusionTransformerOptions
from diffeat.testing import ExtractorConformance, smooth_texture
from diffeat.testing.dit import build_tiny_flux, build_tiny_pixart, build_tiny_sd3

ROOT = Path(__file__).resolve().parents[1]
BUILDERS = {
    "flux": build_tiny_flux,
    "sd3": build_tiny_sd3,
    "sd35": lambda p: build_tiny_sd3(p, sd35=True, seed=1),
    "pixart": build_tiny_pixart,
}
LAST = {"flux": "single_transformer_blocks.2", "sd3": "transformer_blocks.2"}
LAST["pixart"] = LAST["sd35"] = LAST["sd3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-dit")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def make(folder: Path, **kw) -> DiffusionTransformerExtractor:
    base = {"image_size": [64, 48], "ensemble_size": 2, "device": "cpu", "timesteps": [260]}
    return DiffusionTransformerExtractor(
        DiffusionTransformerOptions(model=str(folder), **{**base, **kw})
    )


IMAGE = as_input(smooth_texture((80, 64), seed=3))


def written_out(ex: DiffusionTransformerExtractor, name: str, noise: dict) -> torch.Tensor:
    """The block's output by hand: the VAE latent, the noise, the transformer call, one
    plain forward hook, image tokens reshaped to the token grid; ensemble mean."""
    p, fam = ex.parts, ex.family
    pixels = to_tensor(fit_image(IMAGE.image, (64, 48), "resize", "bicubic"))[None]
    dist = p.vae.encode(pixels).latent_dist
    z = dist.mean + dist.std * noise["posterior"]
    shift = p.vae.config.shift_factor or 0.0
    x0 = (z - shift) * p.vae.config.scaling_factor
    eps = noise["noise"][0]
    cfg = p.scheduler_config
    tf = p.transformer
    states = ex.prompt_states("")
    e = x0.shape[0]
    got = {}
    block = dict(tf.named_modules())[name]
    handle = block.register_forward_hook(lambda m, a, o: got.update(out=o))
    try:
        with torch.no_grad():
            if fam.name == "pixart":
                acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)[260]
                xt = acp.sqrt() * x0 + (1 - acp).sqrt() * eps
                tf(
                    xt,
                    encoder_hidden_states=states["encoder_hidden_states"].repeat(e, 1, 1),
                    encoder_attention_mask=states["encoder_attention_mask"].repeat(e, 1),
                    timestep=torch.full((e,), 260),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                )
                tokens = got["out"]
            else:
                k = cfg["shift"]
                s = 0.26
                if fam.name == "flux":  # dynamic shift, 3 x 4 tokens
                    m = (1.15 - 0.5) / (4096 - 256)
                    mu = 12 * m + 0.5 - m * 256
                    sigma = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
                else:
                    sigma = k * s / (1 + (k - 1) * s)
                xt = (1 - sigma) * x0 + sigma * eps
                if fam.name == "flux":
                    packed = xt.reshape(e, 16, 3, 2, 4, 2).permute(0, 2, 4, 1, 3, 5)
                    ids = torch.stack(
                        torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1
                    ).reshape(12, 2)
                    tf(
                        hidden_states=packed.reshape(e, 12, 64),
                        timestep=torch.full((e,), sigma),
                        guidance=torch.full((e,), 3.5),
                        pooled_projections=states["pooled_projections"].repeat(e, 1),
                        encoder_hidden_states=states["encoder_hidden_states"].repeat(e, 1, 1),
                        txt_ids=states["txt_ids"],
                        img_ids=torch.cat([torch.zeros(12, 1), ids], 1),
                    )
                else:
                    tf(
                        hidden_states=xt,
                        timestep=torch.full((e,), sigma * 1000),
                        encoder_hidden_states=states["encoder_hidden_states"].repeat(e, 1, 1),
                        pooled_projections=states["pooled_projections"].repeat(e, 1),
                    )
                tokens = got["out"][1]
    finally:
        handle.remove()
    maps = tokens.reshape(e, 3, 4, -1).permute(0, 3, 1, 2)
    return maps.mean(0)


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35", "pixart"])
def test_features_equal_the_written_out_block_output(tiny, family):
    """Noise, latents, the transformer call and the token reshape, against a hand computation;
    one token per 16 pixels (64 x 48 input -> 4 x 3 map)."""
    name = "transformer_blocks.1"
    ex = make(tiny[family], layers=[name], timestep_shift="scheduler")
    (info,) = ex.layers()
    assert ex._parts is None  # declared from the configs, no weights loaded
    noise = ex.make_noise(IMAGE.key)
    fs = ex.extract([IMAGE], noise=[noise])[0]
    assert ex.family.name == family.replace("sd35", "sd3")
    assert fs.layers[name].shape == (1, 16, 3, 4)
    expected = written_out(ex, name, noise)
    torch.testing.assert_close(fs.layers[name][0], expected, atol=1e-5, rtol=1e-4)
    assert (info.channels, info.stride) == (16, 16.0)
    assert 48 / info.stride == fs.layers[name].shape[-2] and 64 / info.stride == 4


def test_flux_single_blocks_drop_the_text_tokens(tiny):
    """A single-stream block sees text + image tokens; only the image tokens are kept."""
    ex = make(tiny["flux"], layers=["single_transformer_blocks.*"], ensemble_size=1)
    noise = ex.make_noise(IMAGE.key)
    fs = ex.extract([IMAGE], noise=[noise])[0]
    assert list(fs.layers) == [f"single_transformer_blocks.{i}" for i in range(3)]
    expected = written_out(ex, "single_transformer_blocks.1", noise)
    torch.testing.assert_close(
        fs.layers["single_transformer_blocks.1"][0], expected, atol=1e-5, rtol=1e-4
    )


def test_flow_sigma_follows_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert flow_sigma(sd3.config, 260, 1600, True) == pytest.approx(0.78 / 1.52)
    assert flow_sigma(sd3.config, 260, 1600, False) == pytest.approx(0.26)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    mu = calculate_shift(1600)
    expected = flux.time_shift(mu, 1.0, torch.tensor(0.26)).item()
    assert flow_sigma(flux.config, 260, 1600, True) == pytest.approx(expected)


def test_ditf_normalise_by_hand():
    """Channel 1 zeroed, LayerNorm over the 4 channels, then (1 + scale) x + shift."""
    x = torch.tensor([[1.0, 3.0], [1000.0, -500.0], [2.0, 5.0], [5.0, 7.0]])[:, None, :]  # 4,1,2
    shift = torch.tensor([0.5, 0.0, -1.0, 2.0])
    scale = torch.tensor([1.0, 0.5, 0.0, -0.5])
    out = ditf_normalise(x, shift, scale, [1])
    # pixel 0: values (1, 0, 2, 5): mean 2, var (1 + 4 + 0 + 9) / 4 = 3.5
    d = math.sqrt(3.5 + 1e-6)
    col0 = [(-1 / d) * 2 + 0.5, (-2 / d) * 1.5, (0 / d) * 1 - 1, (3 / d) * 0.5 + 2]
    # pixel 1: (3, 0, 5, 7): mean 3.75, var (0.5625 + 14.0625 + 1.5625 + 10.5625) / 4
    d1 = math.sqrt(26.75 / 4 + 1e-6)
    col1 = [(-0.75 / d1) * 2 + 0.5, (-3.75 / d1) * 1.5, (1.25 / d1) - 1, (3.25 / d1) * 0.5 + 2]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(col0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 0, 1], torch.tensor(col1), atol=1e-5, rtol=1e-5)
    assert x[1, 0, 0] == 1000.0  # the input is untouched


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35", "pixart"])
def test_ditf_uses_the_adaln_that_reads_the_block(tiny, family):
    """ditf = the raw ensemble mean normalised with the next block's shift_msa / scale_msa
    (after the last block: the output norm's), computed here from the model's modules."""
    layers = ["transformer_blocks.0", LAST[family]]
    if family == "flux":
        layers.insert(1, "transformer_blocks.1")  # read by single_transformer_blocks.0
    raw = make(tiny[family], layers=layers)
    noise = raw.make_noise(IMAGE.key)
    plain = raw.extract([IMAGE], noise=[noise])[0]
    normed = make(
        tiny[family], layers=layers, massive_activations="ditf", massive_channels=[3]
    ).extract([IMAGE], noise=[noise])[0]
    tf, states = raw.parts.transformer, raw.prompt_states("")
    with torch.no_grad():
        if family == "pixart":
            t_block, embedded = tf.adaln_single(
                torch.tensor([260]),
                {"resolution": None, "aspect_ratio": None},
                batch_size=1,
                hidden_dtype=torch.float32,
            )
        else:
            timestep = torch.tensor([0.0])  # replaced below
            sigma = flow_sigma(raw.parts.scheduler_config, 260, 12, True)
            if family == "flux":
                timestep = torch.tensor([sigma * 1000])
                temb = tf.time_text_embed(
                    timestep, torch.tensor([3500.0]), states["pooled_projections"]
                )
            else:
                temb = tf.time_text_embed(
                    torch.tensor([sigma * 1000]), states["pooled_projections"]
                )
        for name in layers:
            if family == "pixart":
                if name == LAST[family]:
                    sh, sc = (tf.scale_shift_table[None] + embedded[:, None])[0]
                else:
                    nxt = tf.transformer_blocks[int(name.split(".")[1]) + 1]
                    table = nxt.scale_shift_table + t_block.reshape(6, -1)
                    sh, sc = table[0], table[1]
            elif name == LAST[family]:
                sc, sh = tf.norm_out.linear(F.silu(temb))[0].chunk(2)
            elif name == "transformer_blocks.1" and family == "flux":
                sh, sc = tf.single_transformer_blocks[0].norm.linear(F.silu(temb))[0].chunk(3)[:2]
            else:
                nxt = tf.transformer_blocks[int(name.split(".")[1]) + 1]
                chunks = (
                    9 if getattr(nxt, "use_dual_attention", False) else 6
                )  # SD35AdaLayerNormZeroX: 9
                sh, sc = nxt.norm1.linear(F.silu(temb))[0].chunk(chunks)[:2]
            x = plain.layers[name][0].clone()
            x[3] = 0
            ln = F.layer_norm(x.permute(1, 2, 0), (16,), eps=1e-6).permute(2, 0, 1)
            expected = (1 + sc[:, None, None]) * ln + sh[:, None, None]
            torch.testing.assert_close(normed.layers[name][0], expected, atol=1e-5, rtol=1e-4)


def test_sd3_without_t5_uses_zeros(tiny):
    with_t5 = make(tiny["sd3"], layers=["transformer_blocks.0"])
    without = make(tiny["sd3"], layers=["transformer_blocks.0"], t5=False)
    assert "text_encoder_3" not in without.parts.text
    assert "text_encoder_3" in with_t5.parts.text
    a, b = with_t5.prompt_states("a cat"), without.prompt_states("a cat")
    assert a["encoder_hidden_states"].shape[1] == 77 + 256
    assert b["encoder_hidden_states"].shape[1] == 77 + 256  # the pipeline's zeros
    assert torch.all(b["encoder_hidden_states"][:, 77:] == 0)
    assert with_t5.model_identity()["fingerprint"] != without.model_identity()["fingerprint"]


def test_prompt_and_seed_change_features_batch_does_not(tiny):
    ex = make(tiny["flux"], layers=["transformer_blocks.0"], batch_size=2)
    other = as_input(smooth_texture((64, 64), seed=5))
    together = ex.extract([IMAGE, other])
    alone = make(tiny["flux"], layers=["transformer_blocks.0"]).extract([other])[0]
    torch.testing.assert_close(
        together[1].layers["transformer_blocks.0"], alone.layers["transformer_blocks.0"]
    )
    prompted = make(tiny["flux"], layers=["transformer_blocks.0"], prompt="a photo of a cat")
    assert not torch.allclose(
        prompted.extract([other])[0].layers["transformer_blocks.0"],
        alone.layers["transformer_blocks.0"],
    )


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_ensemble_batch_splits_the_forwards_not_the_result(tiny, family):
    """``ensemble_batch=3`` on 2 images x 2 copies: forwards of 3 and 1 rows per timestep,
    and the same maps, ditf normalisation included, as one forward (up to rounding)."""
    other = as_input(smooth_texture((64, 64), seed=5))
    layers = ["transformer_blocks.0", LAST[family]]
    kw = {"layers": layers, "timesteps": [260, 101], "massive_activations": "ditf"}
    whole = make(tiny[family], **kw).extract([IMAGE, other])
    split_ex = make(tiny[family], ensemble_batch=3, **kw)
    rows: list[int] = []
    split_ex.parts.transformer.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    split = split_ex.extract([IMAGE, other])
    assert rows == [3, 1, 3, 1]
    for a, b in zip(whole, split):
        for name in layers:
            torch.testing.assert_close(a.layers[name], b.layers[name], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="ensemble_batch must be >= 0"):
        DiffusionTransformerOptions(model=str(tiny[family]), ensemble_batch=-1).validate()


def test_join_passes_keeps_the_rows_in_order():
    """Maps and each ``(shift, scale)`` of consecutive row chunks joined as one forward's."""
    from diffeat.plugins.dit.extractor import cond_rows, join_passes

    rows = torch.arange(5.0)
    full_maps = {"b": rows[:, None, None, None].expand(5, 2, 3, 3)}
    full_mods = {"b": (rows[:, None].expand(5, 2), -rows[:, None].expand(5, 2))}
    passes = [
        ({"b": full_maps["b"][s]}, {"b": (full_mods["b"][0][s], full_mods["b"][1][s])})
        for s in (slice(0, 2), slice(2, 4), slice(4, 5))
    ]
    maps, mods = join_passes(passes)
    assert torch.equal(maps["b"], full_maps["b"])
    assert all(torch.equal(a, b) for a, b in zip(mods["b"], full_mods["b"]))
    cond = {"encoder_hidden_states": torch.arange(5.0)[:, None], "txt_ids": torch.zeros(7, 3)}
    part = cond_rows(cond, slice(1, 3))
    assert part["encoder_hidden_states"].flatten().tolist() == [1.0, 2.0]
    assert part["txt_ids"].shape == (7, 3)  # FLUX's text ids have no row per latent


def test_longest_side_rule_keeps_the_aspect_ratio(tiny):
    """DiTF's preprocessing: longer side to max(image_size), sides multiples of 16."""
    ex = make(
        tiny["sd3"], layers=["transformer_blocks.0"], size_rule="longest", image_size=[64, 64]
    )
    wide = as_input(smooth_texture((100, 50), seed=1))
    fs = ex.extract([wide, IMAGE])
    assert ex.input_size((100, 50)) == (64, 32)
    assert fs[0].layers["transformer_blocks.0"].shape[-2:] == (2, 4)
    assert fs[1].layers["transformer_blocks.0"].shape[-2:] == (3, 4)  # 80x64 -> 64x51 -> 64x48
    assert ex.transform_for((100, 50)).model_size == (64, 32)


def test_unsupported_family_and_bad_layer(tiny, tmp_path):
    from diffeat.testing import build_tiny_stable_diffusion

    sd = build_tiny_stable_diffusion(tmp_path / "sd", vocabulary="tiny")
    with pytest.raises(DiffeatError) as err:
        _ = make(sd).family
    msg = str(err.value)
    assert "UNet2DConditionModel" in msg and "stable-diffusion extractor" in msg
    assert "FluxTransformer2DModel" in msg and "PixArtTransformer2DModel" in msg
    with pytest.raises(DiffeatError) as err:
        _ = make(tiny["flux"], layers=["single_transformer_block.1"]).module_names
    assert "nearest: single_transformer_blocks.1" in str(err.value)
    with pytest.raises(DiffeatError, match="massive_channels"):
        make(
            tiny["flux"],
            layers=["transformer_blocks.0"],
            massive_activations="ditf",
            massive_channels=[16],
        ).layers()


def test_bfloat16_is_close_to_float32(tiny):
    name = "single_transformer_blocks.0"
    full = make(tiny["flux"], layers=[name]).extract([IMAGE])[0].layers[name]
    half = make(tiny["flux"], layers=[name], dtype="bfloat16").extract([IMAGE])[0].layers[name]
    assert half.dtype == torch.float32
    assert (half - full).norm() / full.norm() < 0.05


def test_pixart_with_resolution_conditions(tmp_path):
    """PixArt-alpha 1024 conditions on the pixel size and aspect ratio (added_cond_kwargs)."""
    from diffusers import PixArtTransformer2DModel

    folder = build_tiny_pixart(tmp_path / "pixart", heads=3)  # size embeddings: width / 3
    cfg = PixArtTransformer2DModel.load_config(folder / "transformer")
    model = PixArtTransformer2DModel.from_config({**cfg, "use_additional_conditions": True})
    model.save_pretrained(folder / "transformer")
    ex = make(folder, layers=["transformer_blocks.0"])
    assert ex.parts.transformer.use_additional_conditions
    fs = ex.extract([IMAGE])[0]
    assert fs.layers["transformer_blocks.0"].shape == (1, 24, 3, 4)
    assert torch.isfinite(fs.layers["transformer_blocks.0"]).all()


def test_only_the_needed_parts_load_and_the_forward_stops(tiny):
    ex = make(tiny["flux"], layers=["transformer_blocks.0"])
    assert set(ex.parts.text) == {"text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}
    assert ex.parts.vae.decoder is None
    ran = []
    later = ex.parts.transformer.single_transformer_blocks[0]
    handle = later.register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        ex.extract([IMAGE])
        assert ran == []  # stopped after transformer_blocks.0
        ex.options.stop_early = False
        ex.extract([IMAGE])
        assert len(ran) == 1  # the whole forward
    finally:
        handle.remove()


def test_stop_early_gives_the_same_features(tiny):
    a = make(tiny["flux"], layers=["transformer_blocks.0"]).extract([IMAGE])[0]
    b = make(tiny["flux"], layers=["transformer_blocks.0"], stop_early=False).extract([IMAGE])[0]
    torch.testing.assert_close(a.layers["transformer_blocks.0"], b.layers["transformer_blocks.0"])


# -- the real CLI -----------------------------------------------------------------------------


def cli_config(folder: Path, tmp: Path, family: str) -> Path:
    text = (ROOT / "examples" / "ditf-flux.toml").read_text()
    text = text.replace('"black-forest-labs/FLUX.1-dev"', f'"{folder}"')
    text = text.replace("[640, 640]", "[64, 64]").replace("ensemble_size = 8", "ensemble_size = 2")
    text = text.replace('prompt = "a photo of a {category}"', 'prompt = ""')
    if family != "flux":
        text = text.replace('["single_transformer_blocks.8"]', '["transformer_blocks.1"]')
        text = text.replace("massive_channels = [154, 1446]", "massive_channels = [0]")
    else:
        text = text.replace("single_transformer_blocks.8", "single_transformer_blocks.1")
        text = text.replace("massive_channels = [154, 1446]", "massive_channels = [2, 9]")
    p = tmp / f"{family}.toml"
    p.write_text(text)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_cli_layers_extract_store_match(tiny, tmp_path, family):
    config = cli_config(tiny[family], tmp_path, family)
    layer = "single_transformer_blocks.1" if family == "flux" else "transformer_blocks.1"
    listed = run_json("layers", config)
    assert listed["layers"] == [{"name": layer, "channels": 16, "stride": 16.0}]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        smooth_texture((80, 64 + 16 * i), seed=i).save(photos / f"p{i}.png")
    store = tmp_path / "feats.zarr"
    first = run_json("extract", config, photos, "--store", store)
    assert (first["images"], first["computed"]) == (2, 2)
    again = run_json("extract", config, photos, "--store", store)
    assert (again["computed"], again["cached"]) == (0, 2)
    rows = run_json("store", "ls", store, "--key", first["cache_key"])
    assert len(rows) == 2 and all(layer in row["layers"] for row in rows)
    out = run_json(
        "match", config, photos / "p0.png", photos / "p1.png", "-p", "10,20", "--store", store
    )
    assert len(out["matches"]) == 1
    x, y = out["matches"][0]["target"]
    assert 0 <= x < 80 and 0 <= y < 80
    # the listed channels and stride are those of actual maps (80 x 64 -> 64 x 48 -> 4 x 3)
    ex = make(tiny[family], layers=[layer], image_size=[64, 64], size_rule="longest")
    fs = ex.extract([as_input(smooth_texture((80, 64), seed=0))])[0]
    assert fs.layers[layer].shape[1:] == (16, 48 // 16, 64 // 16)


# -- the conformance mixin -------------------------------------------------------------------------


class TestFluxConformance(ExtractorConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, tiny):
        self.folder = tiny["flux"]

    def make_extractor(self):
        return make(
            self.folder,
            layers=["transformer_blocks.1", "single_transformer_blocks.0"],
            timesteps=[100, 500],
            massive_activations="ditf",
            size_rule="longest",
        )


class TestPixArtConformance(ExtractorConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, tiny):
        self.folder = tiny["pixart"]

    def make_extractor(self):
        return make(self.folder, layers=["transformer_blocks.*"], size_rule="pad")
