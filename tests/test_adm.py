"""The ``adm`` extractor (DIFT_adm) and ``diffeat convert adm`` on tiny official checkpoints.

Correctness is shown against :func:`diffeat.testing.adm.reference_blocks`, guided-diffusion's
forward written out on the official state dict (legacy per-head qkv attention), and against
the official code's own numbers (DIFT's stride table of the 18 output blocks, the float64
q_sample coefficients).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from clihelp import run, run_json
from PIL import Image

from diffeat.core.errors import DiffeatError
from diffeat.core.images import ImageInput, as_input
from diffeat.plugins.adm.architecture import AdmArchitecture, interleaved_qkv
from diffeat.plugins.adm.convert import convert_file, convert_state_dict
from diffeat.plugins.adm.extractor import AdmExtractor, q_sample_coefficients
from diffeat.plugins.adm.options import AdmOptions
from diffeat.testing import smooth_texture
from diffeat.testing.adm import (
    reference_blocks,
    tiny_adm_architecture,
    tiny_official_state_dict,
    write_tiny_official_state,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return tiny_official_state_dict(seed=0)


@pytest.fixture(scope="module")
def tiny_unet(tiny_state):
    unet, arch = convert_state_dict(tiny_state, num_head_channels=16, image_size=64)
    assert arch == tiny_adm_architecture()
    return unet


@pytest.fixture(scope="module")
def tiny_adm(tiny_adm_model) -> Path:
    return tiny_adm_model


# -- the qkv layout --------------------------------------------------------------------------


def test_legacy_qkv_is_split_per_head_by_hand():
    """C = 4 channels, 2 heads of 2: rows [q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1]."""
    w = torch.arange(12.0)[:, None].repeat(1, 4)
    q, k, v = interleaved_qkv(w, heads=2)
    assert q[:, 0].tolist() == [0, 1, 6, 7]
    assert k[:, 0].tolist() == [2, 3, 8, 9]
    assert v[:, 0].tolist() == [4, 5, 10, 11]
    q, k, v = interleaved_qkv(torch.arange(12.0), heads=2)  # a bias
    assert (q.tolist(), k.tolist(), v.tolist()) == ([0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11])
    q, k, v = interleaved_qkv(torch.arange(12.0), heads=2, order="new")
    assert (q.tolist(), v.tolist()) == ([0, 1, 2, 3], [8, 9, 10, 11])


# -- the architecture and its numbering ------------------------------------------------------


def test_the_256_model_official_keys():
    shapes = AdmArchitecture().official_shapes()
    assert shapes["input_blocks.0.0.weight"] == (256, 3, 3, 3)
    assert shapes["input_blocks.3.0.in_layers.2.weight"] == (256, 256, 3, 3)  # downsampler
    assert shapes["input_blocks.7.0.skip_connection.weight"] == (512, 256, 1, 1)
    assert shapes["input_blocks.10.1.qkv.weight"] == (1536, 512, 1)
    assert shapes["middle_block.1.qkv.weight"] == (3072, 1024, 1)
    assert shapes["output_blocks.0.0.in_layers.0.weight"] == (2048,)
    assert shapes["output_blocks.2.2.emb_layers.1.weight"] == (2048, 1024)  # upsampler, scale-shift
    assert shapes["output_blocks.11.1.in_layers.2.weight"] == (512, 512, 3, 3)  # upsampler
    assert shapes["output_blocks.17.0.skip_connection.weight"] == (256, 512, 1, 1)
    assert shapes["out.2.weight"] == (6, 256, 3, 3)
    assert "output_blocks.17.1.in_layers.0.weight" not in shapes  # no upsampler at level 0
    assert (
        sum(k.startswith("input_blocks.") and k.endswith(".0.in_layers.0.weight") for k in shapes)
        == 17
    )
    assert sum(math.prod(s) for s in shapes.values()) == 552_814_086


def test_output_block_numbering_matches_dift_and_methods():
    blocks = {b.name: b for b in AdmArchitecture().blocks()}
    assert blocks["output_blocks.4"].module == "up_blocks.1.attentions.1"
    assert blocks["output_blocks.7"].module == "up_blocks.2.attentions.1"
    assert blocks["output_blocks.11"].module == "up_blocks.3.upsamplers.0"
    assert blocks["output_blocks.2"].module == "up_blocks.0.upsamplers.0"
    assert blocks["output_blocks.17"].module == "up_blocks.5.resnets.2"
    assert blocks["input_blocks.0"].module == "conv_in"
    assert blocks["input_blocks.3"].module == "down_blocks.0.downsamplers.0"
    assert blocks["input_blocks.11"].module == "down_blocks.3.attentions.1"
    assert blocks["middle_block"].module == "mid_block.resnets.1"
    # DIFT's eval_davis.py index2factor: the stride of each output block of the 256 model
    official = {0: 32, 1: 32, 2: 16, 3: 16, 4: 16, 5: 8, 6: 8, 7: 8, 8: 4,
                9: 4, 10: 4, 11: 2, 12: 2, 13: 2, 14: 1, 15: 1, 16: 1, 17: 1}  # fmt: skip
    assert {i: blocks[f"output_blocks.{i}"].stride for i in range(18)} == official
    assert blocks["output_blocks.4"].channels == 1024  # METHODS: 1024 x 32 x 32 at 512 px
    assert blocks["output_blocks.11"].channels == 512


def test_unet_config_round_trips(tiny_adm):
    config = json.loads((tiny_adm / "config.json").read_text())
    assert AdmArchitecture.from_unet_config(config) == tiny_adm_architecture()
    assert config["resnet_time_scale_shift"] == "scale_shift"
    assert config["attn_norm_num_groups"] == 32 and config["out_channels"] == 6
    assert config["downsample_type"] == config["upsample_type"] == "resnet"


# -- the converter -------------------------------------------------------------------------


def test_converted_unet_equals_the_written_out_official_forward(tiny_state, tiny_unet):
    """Every block's output (hooked on the mapped diffusers module) and the final output of
    the converted UNet2DModel equal guided-diffusion's forward on the official weights."""
    from diffeat.plugins.module_capture import HookTarget, ModuleCapture

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    t = torch.tensor([101, 41])
    ref = reference_blocks(tiny_state, x, t)
    blocks = tiny_adm_architecture().blocks()
    modules = dict(tiny_unet.named_modules())
    targets = [HookTarget(b.name, modules[b.module], "output", lambda o: o) for b in blocks]
    result = {}
    with torch.no_grad(), ModuleCapture(targets, stop_early=False) as cap:
        outs = cap.run(lambda: result.setdefault("out", tiny_unet(x, t).sample))
    assert len(blocks) == 18 + 1 + 18
    for b in blocks:
        assert outs[b.name].shape == ref[b.name].shape, b.name
        # channels and stride as declared, from the actual module output
        assert outs[b.name].shape[1] == b.channels and 64 / outs[b.name].shape[-1] == b.stride
        err = (outs[b.name] - ref[b.name]).abs().max() / ref[b.name].abs().max()
        assert err < 1e-5, (b.name, err)
    assert torch.allclose(result["out"], ref["out"], atol=1e-5, rtol=1e-4)


def test_splitting_qkv_into_thirds_would_be_wrong(tiny_state, tiny_unet):
    wrong, _ = convert_state_dict(
        tiny_state, num_head_channels=16, image_size=64, attention_order="new"
    )
    x, t = (
        torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)),
        torch.tensor([101]),
    )
    with torch.no_grad():
        good, bad = tiny_unet(x, t).sample, wrong(x, t).sample
    ref = reference_blocks(tiny_state, x, t)["out"]
    assert torch.allclose(good, ref, atol=1e-5, rtol=1e-4)
    assert (bad - ref).norm() / ref.norm() > 1e-2
    # ... and the "new" order reproduces guided-diffusion's QKVAttention on the same weights
    ref_new = reference_blocks(tiny_state, x, t, order="new")["out"]
    assert torch.allclose(bad, ref_new, atol=1e-5, rtol=1e-4)


def test_converter_names_missing_unexpected_and_misshapen_keys(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["output_blocks.4.1.proj_out.bias"]
    state["output_blocks.4.1.extra"] = torch.zeros(1)
    state["middle_block.0.in_layers.2.bias"] = torch.zeros(7)
    with pytest.raises(DiffeatError) as err:
        convert_state_dict(state, num_head_channels=16, image_size=64)
    msg = str(err.value)
    assert "missing 1 key(s): output_blocks.4.1.proj_out.bias" in msg
    assert "unexpected 1 key(s): output_blocks.4.1.extra" in msg
    assert "middle_block.0.in_layers.2.bias [7] (expected [128])" in msg
    with pytest.raises(DiffeatError, match="class-conditional"):
        convert_state_dict({**tiny_state, "label_emb.weight": torch.zeros(10, 128)})
    with pytest.raises(DiffeatError, match="not a guided-diffusion UNet state dict"):
        convert_state_dict({"model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(DiffeatError, match="not a multiple of num_head_channels 48"):
        convert_state_dict(tiny_state, num_head_channels=48)
    pickle = tmp_path / "256x256_diffusion_uncond.pt"
    pickle.write_bytes(b"\x80\x02")
    with pytest.raises(DiffeatError, match="never loads"):
        convert_file(pickle, tmp_path / "out")
    with pytest.raises(DiffeatError, match="does not exist"):
        convert_file(tmp_path / "none.safetensors", tmp_path / "out")


# -- the noise ----------------------------------------------------------------------------------


def test_q_sample_coefficients_are_guided_diffusions():
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
    acp = np.cumprod(1 - betas)
    for t in (0, 41, 51, 101, 999):
        a, s = q_sample_coefficients(t)
        assert a == float(np.float32(np.sqrt(acp[t])))
        assert abs(s - np.sqrt(1 - acp[t])) < 1e-7
    # diffusers' float32 linear schedule differs slightly, which is why it is not used
    from diffusers import DDPMScheduler

    acp32 = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    assert abs(float(acp32[101].sqrt()) - q_sample_coefficients(101)[0]) < 1e-5


# -- the extractor --------------------------------------------------------------------------------


def _image(seed: int = 0, size=(80, 72)) -> ImageInput:
    return as_input(smooth_texture(size, seed=seed))


def test_extractor_equals_dift_adm_written_out(tiny_adm):
    """Resize (PIL bicubic) -> [-1, 1] -> repeat -> q_sample -> official forward -> mean."""
    state = tiny_official_state_dict(seed=0)
    ext = AdmExtractor(
        AdmOptions(
            model=str(tiny_adm),
            layers=["output_blocks.4", "output_blocks.11"],
            timesteps=[101, 41],
            ensemble_size=3,
            image_size=[64, 96],
            device="cpu",
        )
    )
    im = _image()
    noise = ext.make_noise(im.key)
    assert noise.shape == (2, 3, 3, 96, 64)
    (fs,) = ext.extract([im], noise=[noise])
    assert fs.timesteps == (101, 41)
    resized = im.image.resize((64, 96), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255.0
    x = ((x - 0.5) / 0.5)[None].repeat(3, 1, 1, 1)
    for ti, t in enumerate((101, 41)):
        a, s = q_sample_coefficients(t)
        xt = torch.tensor(a, dtype=torch.float32) * x + torch.tensor(s) * noise[ti]
        ref = reference_blocks(state, xt, torch.full((3,), t))
        for name in ("output_blocks.4", "output_blocks.11"):
            want = ref[name].mean(0)
            got = fs.layers[name][ti]
            assert got.shape == want.shape
            assert (got - want).abs().max() / want.abs().max() < 1e-5, (name, t)
    assert fs.layers["output_blocks.4"].shape == (2, 128, 96 // 16, 64 // 16)
    assert fs.layers["output_blocks.11"].shape == (2, 64, 96 // 2, 64 // 2)


def test_noise_is_per_image_and_seeded(tiny_adm):
    opts = dict(model=str(tiny_adm), image_size=[64, 64], ensemble_size=2, device="cpu")
    ext = AdmExtractor(AdmOptions(**opts))
    a, b = _image(0), _image(1)
    both = ext.extract([a, b])
    alone = ext.extract([b])
    # the same noise whatever the batch (float rounding of batched kernels aside)
    assert torch.allclose(
        both[1].layers["output_blocks.4"], alone[0].layers["output_blocks.4"], atol=1e-5
    )
    other = AdmExtractor(AdmOptions(**opts, seed=1)).extract([b])[0]
    assert not torch.allclose(
        other.layers["output_blocks.4"], alone[0].layers["output_blocks.4"], atol=1e-2
    )


def test_stop_early_gives_the_same_maps(tiny_adm):
    opts = dict(model=str(tiny_adm), image_size=[64, 64], ensemble_size=2, device="cpu")
    im = _image()
    early = AdmExtractor(AdmOptions(**opts)).extract([im])[0]
    full = AdmExtractor(AdmOptions(**opts, stop_early=False)).extract([im])[0]
    assert torch.equal(early.layers["output_blocks.4"], full.layers["output_blocks.4"])


def test_layers_declared_match_extracted_shapes(tiny_adm):
    ext = AdmExtractor(
        AdmOptions(
            model=str(tiny_adm),
            layers=["output_blocks.*", "middle_block", "input_blocks.1?"],
            image_size=[96, 64],
            ensemble_size=1,
            device="cpu",
        )
    )
    infos = ext.layers()
    assert [i.name for i in infos][:7] == [f"input_blocks.{i}" for i in range(10, 17)]
    assert len(infos) == 8 + 1 + 18
    (fs,) = ext.extract([_image()])
    for info in infos:
        _, c, h, w = fs.layers[info.name].shape
        assert (c, 64 / h, 96 / w) == (info.channels, info.stride, info.stride), info.name


def test_half_precision_is_close_to_fp32(tiny_adm):
    opts = dict(model=str(tiny_adm), image_size=[64, 64], ensemble_size=2, device="cpu")
    im = _image()
    f32 = AdmExtractor(AdmOptions(**opts)).extract([im])[0].layers["output_blocks.4"]
    for dtype, at_least in (("bfloat16", 0.98), ("float16", 0.999)):
        half = AdmExtractor(AdmOptions(**opts, dtype=dtype)).extract([im])[0]
        half = half.layers["output_blocks.4"]
        assert half.dtype == torch.float32  # maps are stored as float32 whatever the model dtype
        cos = torch.nn.functional.cosine_similarity(f32.flatten(), half.flatten(), dim=0)
        assert cos > at_least, dtype


def test_bad_layer_and_folder_messages(tiny_adm, tiny_sd, tmp_path):
    ext = AdmExtractor(AdmOptions(model=str(tiny_adm), layers=["output_block.4"], device="cpu"))
    with pytest.raises(DiffeatError, match=r"no block 'output_block.4' \(nearest: output_blocks.4"):
        ext.layers()
    with pytest.raises(DiffeatError, match="UNet2DConditionModel model, not an ADM UNet2DModel"):
        AdmExtractor(AdmOptions(model=str(tiny_sd / "unet"), device="cpu")).layers()
    with pytest.raises(DiffeatError, match="diffeat convert adm"):
        AdmExtractor(AdmOptions(model=str(tmp_path), device="cpu")).layers()
    with pytest.raises(DiffeatError, match="model: give the folder"):
        AdmExtractor(AdmOptions(device="cpu")).layers()
    with pytest.raises(ValueError, match="multiples of 32"):
        AdmOptions(image_size=[500, 512]).validate()


# -- the real CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    """A tiny model converted by the real ``diffeat convert adm``."""
    d = tmp_path_factory.mktemp("adm-cli")
    source = write_tiny_official_state(d / "official.safetensors", seed=3)
    out = run_json("convert", "adm", source, d / "model", "--head-channels", "16",
                   "--image-size", "64")  # fmt: skip
    assert out["block_out_channels"] == [32, 32, 64, 64, 128, 128]
    assert out["attention_levels"] == [3, 4, 5] and out["tensors"] == 566
    return d / "model"


def _preset(name: str, model: Path, tmp: Path, size: str) -> Path:
    text = (ROOT / "examples" / name).read_text()
    text = text.replace('"adm-256-uncond"', json.dumps(str(model)))
    for real in ("[512, 512]", "[768, 768]", "[832, 480]"):
        text = text.replace(real, size)
    text = text.replace("ensemble_size = 8", "ensemble_size = 2")
    p = tmp / name
    p.write_text(text)
    return p


@pytest.mark.slow
def test_cli_convert_layers_extract_match(cli_model, tmp_path):
    cfg = _preset("dift-adm-semantic.toml", cli_model, tmp_path, "[64, 64]")
    layers = run_json("layers", cfg)
    assert layers == {
        "layers": [{"name": "output_blocks.4", "channels": 128, "stride": 16.0}],
        "timesteps": [101],
    }
    listing = run("layers", cfg, "--set", 'extractor.layers=["output_blocks.*"]').stdout
    assert "output_blocks.17" in listing and "output_blocks.11" in listing
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        smooth_texture((80 + 8 * i, 64), seed=i).save(photos / f"p{i}.png")
    store = tmp_path / "f.zarr"
    first = run_json("extract", cfg, photos, "--store", store)
    assert (first["computed"], first["cached"]) == (2, 0)
    again = run_json("extract", cfg, photos, "--store", store)
    assert (again["computed"], again["cached"]) == (0, 2)
    same = run_json("match", cfg, photos / "p1.png", photos / "p1.png", "-p", "40,30",
                    "--store", store)  # fmt: skip
    assert same["matches"][0]["target"] == [40.0, 30.0]
    geo = _preset("dift-adm-geometric.toml", cli_model, tmp_path, "[64, 64]")
    out = run_json("match", geo, photos / "p0.png", photos / "p1.png", "-p", "10,20")
    assert len(out["matches"]) == 1 and out["matches"][0]["score"] <= 0  # minus an L2 distance
    temporal = _preset("dift-adm-temporal.toml", cli_model, tmp_path, "[96, 64]")
    assert run_json("layers", temporal)["layers"][0] == {
        "name": "output_blocks.7", "channels": 64, "stride": 8.0,
    }  # fmt: skip
    bad = run("layers", cfg, "--set", 'extractor.layers=["output_blocks.40"]', check=2)
    assert "no block 'output_blocks.40'" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("convert", "adm", tmp_path / "x.safetensors", tmp_path / "o", check=2)
    assert "does not exist" in missing.stderr


def test_presets_match_methods(manager):
    from diffeat.core.config import load_config

    def ex(name):
        return load_config(ROOT / "examples" / name, manager=manager).resolved()

    sem, geo, tmp = (ex(f"dift-adm-{n}.toml") for n in ("semantic", "geometric", "temporal"))
    assert (sem["extractor"]["timesteps"], sem["extractor"]["layers"]) == (
        [101],
        ["output_blocks.4"],
    )
    assert sem["extractor"]["ensemble_size"] == 8 and sem["extractor"]["image_size"] == [512, 512]
    assert sem["extractor"]["dtype"] == "float32" and sem["matcher"]["plugin"] == "nearest"
    assert (geo["extractor"]["timesteps"], geo["extractor"]["layers"]) == (
        [41],
        ["output_blocks.11"],
    )
    assert geo["extractor"]["ensemble_size"] == 4
    assert geo["matcher"] == {"plugin": "mutual", "tolerance": 1.0, "metric": "l2"}
    assert (tmp["extractor"]["timesteps"], tmp["extractor"]["layers"]) == (
        [51],
        ["output_blocks.7"],
    )
    # the evaluation tasks run with ADM's settings, not SD's defaults
    assert geo["homography"] == {
        "method": "ransac", "ransac_threshold": 3.0, "metric": "l2",
        "half_cell_offset": True, "thresholds": [1.0, 3.0, 5.0],
    }  # fmt: skip
    assert tmp["propagation"] == {"temperature": 0.1, "topk": 10, "context": 28, "radius": 15}
    assert tmp["extractor"]["size_rule"] == "short-side"
    assert tmp["extractor"]["image_size"] == [480, 480]


def test_mutual_l2_metric_differs_from_cosine_as_written_out():
    """DIFT_adm's HPatches matching: nearest by Euclidean distance of the raw descriptors."""
    from diffeat.core.components import View
    from diffeat.core.geometry import ImageTransform
    from diffeat.plugins.matchers import Mutual, MutualOptions

    def view(desc: torch.Tensor) -> View:
        size = (desc.shape[2], desc.shape[1])
        return View(Image.new("RGB", size), ImageTransform.resize(size, size), descriptors=desc)

    # source cell (0, 0) holds [1, 0]; target cell (0, 0) = [10, 0] (cosine 1, distance 9),
    # cell (1, 0) = [1, 0.5] (cosine 0.89, distance 0.5)
    src = torch.tensor([[[1.0, -5.0]], [[0.0, 5.0]]])
    tgt = torch.tensor([[[10.0, 1.0]], [[0.0, 0.5]]])
    point = torch.tensor([[0.0, 0.0]])
    cos = Mutual(MutualOptions()).match(view(src), view(tgt), point)
    l2 = Mutual(MutualOptions(metric="l2")).match(view(src), view(tgt), point)
    assert cos.points.tolist() == [[0.0, 0.0]] and bool(cos.valid[0])
    assert l2.points.tolist() == [[1.0, 0.0]] and bool(l2.valid[0])
    assert l2.scores[0].item() == pytest.approx(-0.5)


def test_malformed_state_dicts_are_clear_errors_not_tracebacks(tmp_path):
    import torch

    from diffeat.core.errors import DiffeatError
    from diffeat.plugins.adm.convert import infer_architecture, read_state

    needed = {
        "input_blocks.0.0.weight": torch.zeros(8, 3, 3, 3),
        "out.2.weight": torch.zeros(6, 8, 3, 3),
        "time_embed.0.weight": torch.zeros(32, 8),
    }
    bad_index = {**needed, "output_blocks.a.0.in_layers.0.weight": torch.zeros(8)}
    flat = {**needed, "input_blocks.0.0.weight": torch.zeros(8)}
    for state in (needed, bad_index, flat):
        with pytest.raises(DiffeatError, match="not a guided-diffusion UNet state dict"):
            infer_architecture(state)
    with pytest.raises(DiffeatError, match="is a folder"):
        read_state(tmp_path)
