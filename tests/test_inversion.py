"""DDIM inversion mode of the Stable Diffusion extractor against a written-out computation.

The written-out inversion follows the Diffusion Hyperfeatures code step by
step on plain diffusers components: its own ``DDIMScheduler`` (scaled_linear
0.00085..0.012, steps_offset 0), ``seq_next = [-1] + seq[:-1]``, alpha 1 at
``t = -1``, and the residual branch read from every decoder ResNet's ``conv2``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from diffeat.core.errors import ConfigError
from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.plugins.stable_diffusion.ddim import generation_steps, inversion_steps
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.testing import smooth_texture

SIZE = 64
CONV2 = "up_blocks.*.resnets.*.conv2"
STEPS = 10  # t = -1, 0, 100, ..., 800: the 50-step schedule is the same code, 5x longer
KEPT = [-1, 100, 300, 800]


def make(model, **opts) -> StableDiffusionExtractor:
    values = {
        "model": str(model),
        "mode": "inversion",
        "image_size": [SIZE, SIZE],
        "ensemble_size": 1,
        "layers": [CONV2],
        "timesteps": KEPT,
        "resample": "bilinear",
        "latent": "mean",
        "inversion_steps": STEPS,
        "device": "cpu",
        **opts,
    }
    return StableDiffusionExtractor(build_options(StableDiffusionExtractor, values, "test"))


def official_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def plain_components(folder):
    """UNet, VAE, tokenizer and text encoder loaded with plain diffusers/transformers calls."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    return unet, vae, tok, enc


def written_out_inversion(folder, image: Image.Image, steps: int = STEPS, prediction="epsilon"):
    """Latents after each step and every decoder conv2 output at each step, the official way."""
    unet, vae, tok, enc = plain_components(folder)
    sched = official_scheduler()
    sched.set_timesteps(steps)
    img = image.resize((SIZE, SIZE), Image.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0 * 2 - 1
    seq = torch.flip(sched.timesteps, dims=(0,))
    seq_next = [-1, *seq[:-1].tolist()]
    alphas = (1 - sched.betas).cumprod(dim=0)
    captured: list[dict[str, torch.Tensor]] = []
    hooks = []
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            name = f"up_blocks.{i}.resnets.{j}.conv2"
            hooks.append(
                resnet.conv2.register_forward_hook(
                    lambda m, a, out, name=name: captured[-1].__setitem__(name, out)
                )
            )
    latents, per_step_t = [], []
    with torch.no_grad():
        xt = vae.encode(x[None]).latent_dist.mean * vae.config.scaling_factor
        ids = tok(
            [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids
        cond = enc(ids).last_hidden_state
        for t, next_t in zip(seq_next, seq.tolist()):
            at = torch.ones(1) if t == -1 else alphas[t].reshape(1)
            at_next = alphas[next_t].reshape(1)
            captured.append({})
            et = unet(xt, torch.ones(1) * t, encoder_hidden_states=cond).sample
            if prediction == "v_prediction":
                et = at.sqrt() * et + (1 - at).sqrt() * xt
            x0_t = (xt - et * (1 - at).sqrt()) / at.sqrt()
            xt = at_next.sqrt() * x0_t + (1 - at_next).sqrt() * et
            latents.append(xt)
            per_step_t.append(t)
    for h in hooks:
        h.remove()
    return per_step_t, latents, captured


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return smooth_texture((90, 70), seed=5)


def test_schedules_match_the_official_sequence():
    sched = official_scheduler()
    sched.set_timesteps(50)
    seq = torch.flip(sched.timesteps, dims=(0,)).tolist()
    steps = inversion_steps(50)
    assert [s.t for s in steps] == [-1, *seq[:-1]]
    assert [s.t_next for s in steps] == seq
    assert [s.t for s in steps[::5]][:3] == [-1, 80, 180]
    kept_official = [49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0]  # set_timestep index 49 - i
    assert [steps[49 - k].t for k in kept_official] == [-1, *range(60, 961, 100)]
    gen = generation_steps(50)
    assert gen[0].t == 980 and gen[-1].t == 0 and gen[-1].t_next == -1
    assert [(s.t, s.t_next) for s in inversion_steps(1)] == [(-1, 0)]


def test_inversion_matches_written_out(tiny_sd, image):
    ex = make(tiny_sd)
    inp = as_input(image)
    trajectory: list[torch.Tensor] = []
    with torch.no_grad():
        latents = ex.encode(torch.stack([ex.preprocess(inp)]), [ex.make_noise(inp.key)])
        maps = ex.invert(latents, ex.prompt_embeddings(""), trajectory)
    ts, ref_latents, ref_maps = written_out_inversion(tiny_sd, image)
    # the inversion stops after the last kept step (t = 800, the 10th and last pass)
    assert len(trajectory) == ts.index(800) == 9
    for mine, ref in zip(trajectory, ref_latents):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    assert set(maps) == set(ref_maps[0])
    for name, tensor in maps.items():
        assert tensor.shape[1] == len(KEPT)
        for k, t in enumerate(KEPT):
            torch.testing.assert_close(
                tensor[:, k], ref_maps[ts.index(t)][name], atol=1e-5, rtol=1e-5
            )
    # and through extract(): [T, C, h, w] per layer, timesteps as declared
    (fs,) = ex.extract([inp])
    assert fs.timesteps == tuple(KEPT)
    for name, tensor in fs.layers.items():
        torch.testing.assert_close(tensor, maps[name][0], atol=1e-6, rtol=1e-6)


def test_each_map_is_a_direct_unet_call_on_the_inverted_latent(tiny_sd, image):
    ex = make(tiny_sd, timesteps=[300])
    inp = as_input(image)
    trajectory: list[torch.Tensor] = []
    with torch.no_grad():
        latents = ex.encode(torch.stack([ex.preprocess(inp)]), [ex.make_noise(inp.key)])
        context = ex.prompt_embeddings("")
        maps = ex.invert(latents, context, trajectory)
        # step i runs the UNet at t = 100 * (i - 1): t = 300 is step 4, on the latent after step 3
        z = trajectory[3]
        unet = ex.parts.unet
        name = "up_blocks.2.resnets.1.conv2"
        got = {}
        module = dict(unet.named_modules())[name]
        h = module.register_forward_hook(lambda m, a, out: got.setdefault("x", out))
        unet(z, torch.tensor([300.0]), encoder_hidden_states=context)
        h.remove()
    torch.testing.assert_close(maps[name][:, 0], got["x"], atol=1e-6, rtol=1e-6)


def test_one_step_is_a_single_pass_on_the_clean_latent(tiny_sd, image):
    calls = {"n": 0}
    one = make(tiny_sd, inversion_steps=1, timesteps=[-1])
    hook = one.parts.unet.register_forward_pre_hook(
        lambda m, a, kw=None: calls.__setitem__("n", calls["n"] + 1)
    )
    (fs,) = one.extract([as_input(image)])
    hook.remove()
    assert calls["n"] == 1
    assert fs.timesteps == (-1,)
    # the same single pass is the first step of a longer inversion
    (full,) = make(tiny_sd, timesteps=[-1]).extract([as_input(image)])
    for name in fs.layers:
        torch.testing.assert_close(fs.layers[name], full.layers[name], atol=1e-6, rtol=1e-6)


def test_inversion_runs_only_up_to_the_last_kept_step(tiny_sd, image):
    ex = make(tiny_sd, timesteps=[-1, 300])
    calls = {"n": 0}
    hook = ex.parts.unet.register_forward_pre_hook(
        lambda m, a: calls.__setitem__("n", calls["n"] + 1)
    )
    ex.extract([as_input(image)])
    hook.remove()
    assert calls["n"] == inversion_steps(STEPS)[4].index + 1 == 5  # t = 300 is step 4


def test_v_prediction_model_is_inverted_with_epsilon(tiny_sd_v, image):
    ex = make(tiny_sd_v, timesteps=[-1, 800])
    inp = as_input(image)
    trajectory: list[torch.Tensor] = []
    with torch.no_grad():
        latents = ex.encode(torch.stack([ex.preprocess(inp)]), [ex.make_noise(inp.key)])
        ex.invert(latents, ex.prompt_embeddings(""), trajectory)
    _, ref_latents, _ = written_out_inversion(tiny_sd_v, image, prediction="v_prediction")
    for mine, ref in zip(trajectory, ref_latents):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_posterior_sample_is_seeded_per_image(tiny_sd, image):
    a = make(tiny_sd, latent="sample", timesteps=[-1]).extract([as_input(image)])[0]
    b = make(tiny_sd, latent="sample", timesteps=[-1]).extract([as_input(image)])[0]
    c = make(tiny_sd, latent="sample", timesteps=[-1], seed=3).extract([as_input(image)])[0]
    name = next(iter(a.layers))
    assert torch.equal(a.layers[name], b.layers[name])
    assert not torch.allclose(a.layers[name], c.layers[name])


def test_timesteps_outside_the_schedule_are_named(tiny_sd, image):
    ex = make(tiny_sd, timesteps=[-1, 61])
    with pytest.raises(ConfigError, match=r"timesteps \[61\].*-1, 0, 100"):
        ex.extract([as_input(image)])


def test_generation_mode_refuses_existing_images(tiny_sd, image):
    ex = make(tiny_sd, mode="generation", timesteps=[980])
    with pytest.raises(Exception, match="diffeat generate"):
        ex.extract([as_input(image)])


def written_out_generation(
    folder, seed: int, steps: int, guidance: float, prompt: str, negative: str
):
    """The official generalized_steps in generation mode with classifier-free guidance."""
    unet, vae, tok, enc = plain_components(folder)
    sched = official_scheduler()
    sched.set_timesteps(steps)
    seq = torch.flip(sched.timesteps, dims=(0,))
    seq_next = [-1, *seq[:-1].tolist()]
    alphas = (1 - sched.betas).cumprod(dim=0)

    def embed(text):
        ids = tok(
            [text], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        )
        return enc(ids.input_ids).last_hidden_state

    captured: dict[int, torch.Tensor] = {}
    current = {"t": None}
    hook = (
        unet.up_blocks[1]
        .resnets[2]
        .conv2.register_forward_hook(lambda m, a, out: captured.__setitem__(current["t"], out))
    )
    with torch.no_grad():
        cond, uncond = embed(prompt), embed(negative)
        shape = (1, unet.config.in_channels, SIZE // 8, SIZE // 8)
        xt = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        for t, next_t in zip(reversed(seq.tolist()), reversed(seq_next)):
            at = alphas[t].reshape(1)
            at_next = torch.ones(1) if next_t == -1 else alphas[next_t].reshape(1)
            tt = torch.ones(1) * t
            current["t"] = None
            et_u = unet(xt, tt, encoder_hidden_states=uncond).sample
            current["t"] = t  # the maps kept are the conditional pass's (the last call)
            et_c = unet(xt, tt, encoder_hidden_states=cond).sample
            et = et_u + guidance * (et_c - et_u)
            x0_t = (xt - et * (1 - at).sqrt()) / at.sqrt()
            xt = at_next.sqrt() * x0_t + (1 - at_next).sqrt() * et
        image = vae.decode(xt / vae.config.scaling_factor).sample
    hook.remove()
    image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return captured, (image * 255).round().astype("uint8")


def test_generation_matches_written_out_sampler(tiny_sd):
    ex = make(
        tiny_sd,
        mode="generation",
        timesteps=[900, 400, 0],
        layers=["up_blocks.1.resnets.2.conv2"],
        prompt="a photo",
        negative_prompt="blurry",
        guidance_scale=7.5,
    )
    image, fs = ex.generate(seed=7)
    ref_maps, ref_image = written_out_generation(tiny_sd, 7, STEPS, 7.5, "a photo", "blurry")
    got = fs.layers["up_blocks.1.resnets.2.conv2"]
    assert fs.timesteps == (900, 400, 0)
    for k, t in enumerate([900, 400, 0]):
        torch.testing.assert_close(got[k], ref_maps[t][0], atol=1e-4, rtol=1e-4)
    assert image.size == (SIZE, SIZE)
    assert np.abs(np.asarray(image).astype(int) - ref_image.astype(int)).max() <= 1


def test_load_size_resizes_in_two_stages_as_use_paper_size(tiny_sd, image):
    """PIL bilinear to load_size, [-1, 1], then F.interpolate to the model input (process_image
    followed by DiffusionExtractor.forward's interpolate in the official code)."""
    import torch.nn.functional as F

    ex = make(tiny_sd, load_size=[24, 24])
    small = np.asarray(image.resize((24, 24), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(small).permute(2, 0, 1) * 2 - 1
    expected = F.interpolate(x[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(ex.preprocess(as_input(image)), expected, atol=1e-6, rtol=1e-6)
    assert ex.transform_for(image.size).scale == (SIZE / 90, SIZE / 70)  # still a squash resize
    with pytest.raises(ConfigError, match="size_rule"):
        make(tiny_sd, load_size=[24, 24], size_rule="pad")
