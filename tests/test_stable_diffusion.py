"""The Stable Diffusion extractor against a written-out diffusers computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from diffeat.core.errors import ConfigError, ModelLoadError
from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.testing import smooth_texture

SIZE = 64  # model input; latent 8x8


def make(model, **opts) -> StableDiffusionExtractor:
    values = {
        "model": str(model),
        "image_size": [SIZE, SIZE],
        "ensemble_size": 3,
        "device": "cpu",
        **opts,
    }
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def written_out(
    folder, image: Image.Image, noise: dict, *, t: int, block: str, prompt: str = ""
) -> torch.Tensor:
    """DIFT's recipe step by step on plain diffusers components (VAE encoded per copy, full UNet)."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    img = image.resize((SIZE, SIZE))  # PIL's default filter, as the DIFT code
    x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0 - 0.5) * 2
    e = noise["posterior"].shape[0]
    with torch.no_grad():
        dist = vae.encode(x[None].repeat(e, 1, 1, 1)).latent_dist
        latents = (dist.mean + dist.std * noise["posterior"]) * vae.config.scaling_factor
        ids = tok(
            [prompt],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        context = enc(ids)[0].repeat(e, 1, 1)
        tt = torch.tensor(t, dtype=torch.long)
        noisy = sched.add_noise(latents, noise["noise"][0], tt)
        captured = {}
        module = dict(unet.named_modules())[block]
        handle = module.register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
        unet(noisy, tt, encoder_hidden_states=context)
        handle.remove()
    return captured["x"].mean(dim=0)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return smooth_texture((90, 70), seed=11)


@pytest.mark.parametrize("block", ["up_blocks.1", "up_blocks.2.resnets.1.conv2"])
def test_matches_written_out_computation(tiny_sd, image, block):
    ex = make(tiny_sd, layers=[block], timesteps=[261], prompt="a photo of a cat")
    inp = as_input(image)
    noise = ex.make_noise(inp.key)
    (fs,) = ex.extract([inp], noise=[noise])
    expected = written_out(tiny_sd, image, noise, t=261, block=block, prompt="a photo of a cat")
    torch.testing.assert_close(fs.layers[block][0], expected, atol=1e-5, rtol=1e-4)


def test_v_prediction_sd2_style(tiny_sd_v, image):
    ex = make(tiny_sd_v, layers=["up_blocks.1"], timesteps=[0])
    inp = as_input(image)
    noise = ex.make_noise(inp.key)
    (fs,) = ex.extract([inp], noise=[noise])
    expected = written_out(tiny_sd_v, image, noise, t=0, block="up_blocks.1")
    torch.testing.assert_close(fs.layers["up_blocks.1"][0], expected, atol=1e-5, rtol=1e-4)
    assert ex.model_identity()["prediction_type"] == "v_prediction"


def test_conv2_is_the_residual_branch(tiny_sd, image):
    """The captured conv2 output plus the (projected) input is the ResNet block's output."""
    ex = make(
        tiny_sd, layers=["up_blocks.2.resnets.0.conv2", "up_blocks.2.resnets.0"], ensemble_size=1
    )
    unet = ex.parts.unet
    block = unet.up_blocks[2].resnets[0]
    seen = {}

    def grab(module, args):
        seen["input"] = args[0]  # returns None: the arguments stay as they are

    handle = block.register_forward_pre_hook(grab)
    (fs,) = ex.extract([as_input(image)])
    handle.remove()
    skip = block.conv_shortcut(seen["input"]) if block.conv_shortcut is not None else seen["input"]
    residual = fs.layers["up_blocks.2.resnets.0.conv2"][0]
    out = (skip[0] + residual) / block.output_scale_factor
    torch.testing.assert_close(out, fs.layers["up_blocks.2.resnets.0"][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(residual, fs.layers["up_blocks.2.resnets.0"][0])


def test_once_vs_per_copy_encoding_and_early_stop(tiny_sd, image):
    inp = as_input(image)
    fast = make(tiny_sd, timesteps=[100, 500])
    naive = make(tiny_sd, timesteps=[100, 500], encode_per_copy=True, stop_early=False)
    a = fast.extract([inp])[0].layers["up_blocks.1"]
    b = naive.extract([inp])[0].layers["up_blocks.1"]
    assert a.shape[0] == 2
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_early_stop_skips_later_blocks(tiny_sd, image):
    ex = make(tiny_sd, layers=["up_blocks.1"])
    calls = []
    handle = ex.parts.unet.up_blocks[2].register_forward_hook(lambda *a: calls.append(1))
    ex.extract([as_input(image)])
    handle.remove()
    assert calls == []


def test_seed_batch_and_order_independence(tiny_sd, image):
    imgs = [as_input(image), as_input(smooth_texture((40, 60), seed=12))]
    one = make(tiny_sd, batch_size=1)
    two = make(tiny_sd, batch_size=2)
    a = [one.extract([im])[0].layers["up_blocks.1"] for im in imgs]
    b = [fs.layers["up_blocks.1"] for fs in two.extract(imgs[::-1])][::-1]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    other = make(tiny_sd, seed=1).extract([imgs[0]])[0].layers["up_blocks.1"]
    assert not torch.allclose(other, a[0])


def test_prompt_changes_features_and_is_cached(tiny_sd, image):
    inp = as_input(image)
    ex = make(tiny_sd, prompt="a photo of a dog")
    emb = ex.prompt_embeddings("a photo of a dog")
    assert ex.prompt_embeddings("a photo of a dog") is emb
    a = ex.extract([inp])[0].layers["up_blocks.1"]
    b = make(tiny_sd).extract([inp])[0].layers["up_blocks.1"]
    assert not torch.allclose(a, b)


def test_mean_latent_has_no_posterior_noise(tiny_sd, image):
    inp = as_input(image)
    ex = make(tiny_sd, latent="mean", timesteps=[0])
    n1, n2 = ex.make_noise(inp.key), ex.make_noise(inp.key)
    n2["posterior"] = torch.randn_like(n2["posterior"]) * 5
    a = ex.extract([inp], noise=[n1])[0].layers["up_blocks.1"]
    b = ex.extract([inp], noise=[n2])[0].layers["up_blocks.1"]
    torch.testing.assert_close(a, b)


def test_layer_infos(tiny_sd):
    ex = make(tiny_sd, layers=["up_blocks.*.resnets.*.conv2"])
    infos = ex.layers()
    assert len(infos) == 12
    assert [i.stride for i in infos[::3]] == [64.0, 32.0, 16.0, 8.0]
    assert infos[0].name == "up_blocks.0.resnets.0.conv2"


def test_unknown_layer_message(tiny_sd):
    with pytest.raises(ConfigError, match="no module of the model matches 'up_block.1'.*up_blocks"):
        make(tiny_sd, layers=["up_block.1"]).layers()


def test_offline_hub_id_says_how_to_use_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ex = make("nobody-here/no-such-model")
    with pytest.raises(ModelLoadError, match=r"--model DIR"):
        ex.model_identity()


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers Stable Diffusion folder"):
        make(tmp_path).model_identity()


def test_fingerprint_changes_with_weights(tiny_sd, tmp_path):
    from diffeat.testing import build_tiny_stable_diffusion

    other = build_tiny_stable_diffusion(tmp_path / "other", seed=7)
    assert (
        make(tiny_sd).model_identity()["fingerprint"] != make(other).model_identity()["fingerprint"]
    )
    assert make(tiny_sd).model_identity() == make(tiny_sd).model_identity()


def test_bfloat16_runs_on_cpu(tiny_sd, image):
    ex = make(tiny_sd, dtype="bfloat16", ensemble_size=2)
    (fs,) = ex.extract([as_input(image)])
    ref = make(tiny_sd, ensemble_size=2).extract([as_input(image)])[0]
    assert fs.layers["up_blocks.1"].dtype == torch.float32
    assert (
        torch.nn.functional.cosine_similarity(
            fs.layers["up_blocks.1"].flatten(), ref.layers["up_blocks.1"].flatten(), dim=0
        )
        > 0.98
    )


def test_category_prompt_template(tiny_sd, image, tmp_path):
    from diffeat.core.errors import DiffeatError
    from diffeat.core.pipeline import Pipeline

    data = {
        "extractor": {
            "plugin": "stable-diffusion",
            "model": str(tiny_sd),
            "image_size": [SIZE, SIZE],
            "ensemble_size": 2,
            "prompt": "a photo of a {category}",
        }
    }
    pipe = Pipeline.from_dict(data, store=tmp_path / "s.zarr")
    cat, dog = as_input(image).with_category("cat"), as_input(image).with_category("dog")
    assert pipe.image_key(cat) != pipe.image_key(dog)
    assert pipe.image_key(cat).startswith(cat.key)
    fc, fd = pipe.features([cat, dog])
    assert fc.meta["prompt"] == "a photo of a cat"
    assert not torch.allclose(fc.layers["up_blocks.1"], fd.layers["up_blocks.1"])
    # the template's result equals the fixed prompt's
    fixed = make(tiny_sd, prompt="a photo of a cat", ensemble_size=2)
    (ff,) = fixed.extract([cat])
    torch.testing.assert_close(
        ff.layers["up_blocks.1"], fc.layers["up_blocks.1"], atol=2e-3, rtol=2e-3
    )
    assert sorted(pipe.store.entries(pipe.cache_key)) == sorted(
        [pipe.image_key(cat), pipe.image_key(dog)]
    )
    with pytest.raises(DiffeatError, match=r"needs the image's category.*--category"):
        pipe.features([as_input(image)])
    plain = Pipeline.from_dict({"extractor": {**data["extractor"], "prompt": "x"}})
    assert plain.image_key(cat) == cat.key


def test_pad_size_rule_keeps_the_aspect_and_records_the_offset(tiny_sd, image):
    ex = make(tiny_sd, size_rule="pad", ensemble_size=1)
    inp = as_input(image)  # 90 x 70 into 64 x 64: scaled by 64/90 to 64 x 50, 7 rows above
    t = ex.transform_for(inp.size)
    assert t.offset == (0.0, 7.0) and t.scale == (64 / 90, 50 / 70)
    x = ex.preprocess(inp)
    assert torch.all(x[:, :7] == -1) and torch.all(x[:, 57:] == -1)  # black borders
    assert not torch.all(x[:, 7:57] == -1)
    # the image centre lands on the model-input centre
    centre = t.image_to_model(torch.tensor([[44.5, 34.5]]))
    torch.testing.assert_close(centre, torch.tensor([[31.5, 31.5]]))
    (fs,) = ex.extract([inp])
    assert fs.meta["transform"]["offset"] == [0.0, 7.0]
