"""The dino, dinov2 and openclip extractors against written-out computations with the
libraries' own model calls on the same (tiny, random, offline) weights."""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffeat.core.errors import ConfigError, ModelLoadError
from diffeat.core.images import as_input
from diffeat.core.options import build_options
from diffeat.plugins.vit import DinoExtractor, Dinov2Extractor, OpenClipExtractor
from diffeat.testing import ExtractorConformance, smooth_texture
from diffeat.testing.vit import (
    TINY_OPENCLIP_NAME,
    build_tiny_dino,
    build_tiny_dinov2,
    build_tiny_openclip,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    return build_tiny_dino(tmp_path_factory.mktemp("dino") / "model")  # patch 8, trained at 32


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "model")  # patch 14, 56


@pytest.fixture(scope="module")
def tiny_dinov2_reg(tmp_path_factory):
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2r") / "model", registers=True, seed=3)


@pytest.fixture(scope="module")
def tiny_openclip(tmp_path_factory):
    """(model config file, checkpoint file); the folder is their parent."""
    return build_tiny_openclip(tmp_path_factory.mktemp("openclip") / "model")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return smooth_texture((90, 70), seed=11)


def make(cls, model, **opts):
    return cls(build_options(cls, {"model": str(model), "device": "cpu", **opts}, "test"))


def pixels(img: Image.Image, size, mean, std, resample=Image.Resampling.BICUBIC) -> torch.Tensor:
    """The preprocessing written out: PIL resize, [0, 1], (x - mean) / std; ``[1, 3, H, W]``."""
    x = torch.from_numpy(np.array(img.resize(size, resample))).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return ((x - m) / s)[None]


def as_map(tokens: torch.Tensor, size, patch) -> torch.Tensor:
    """Patch tokens ``[1, N, C]`` to ``[1, C, H/p, W/p]``."""
    w, h = size
    return tokens.reshape(1, h // patch, w // patch, -1).permute(0, 3, 1, 2)


def hf_blocks(model):
    return model.layers if hasattr(model, "layers") else model.encoder.layer


def hf_norm1(block):
    return block.layernorm_before if hasattr(block, "layernorm_before") else block.norm1


def hf_projection(block, facet):
    att = block.attention
    inner = getattr(att, "attention", att)  # transformers 4.x nests query/key/value one deeper
    for name in {
        "query": ("q_proj", "query"),
        "key": ("k_proj", "key"),
        "value": ("v_proj", "value"),
    }[facet]:
        if hasattr(inner, name):
            return getattr(inner, name)
    raise AssertionError(f"no {facet} projection in {type(att).__name__}")


def attention_from_qkv(q, k, v, heads):
    """Multi-head softmax attention written out, heads concatenated head after head."""
    b, n, c = q.shape
    d = c // heads

    def split(t):
        return t.reshape(b, n, heads, d).transpose(1, 2)

    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ split(v)).transpose(1, 2).reshape(b, n, c)


def official_positions(pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """interpolate_pos_encoding of the DINO / DINOv2 repositories written out: bicubic,
    no antialias, scale factor (n + 0.1) / N for rows and columns."""
    side, dim = int(math.sqrt(pos.shape[1] - 1)), pos.shape[-1]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic"
    )
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], 1)


def use_official_positions(model, patch: int) -> None:
    """Make a transformers model interpolate its position embeddings the official way."""
    emb = model.embeddings

    def interpolate(embeddings, height, width):
        pos = emb.position_embeddings
        if embeddings.shape[1] == pos.shape[1] and height == width:
            return pos
        return official_positions(pos, height // patch, width // patch)

    emb.interpolate_pos_encoding = interpolate


# -- dino ------------------------------------------------------------------------------------------


def dino_reference(folder, img, size, official=True):
    from transformers import ViTModel

    model = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    if official:
        use_official_positions(model, 8)
    x = pixels(img, size, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        out = model(x, output_hidden_states=True, interpolate_pos_encoding=True)
    return model, x, out


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])  # training size; interpolated
@pytest.mark.parametrize("block", [0, -1])
def test_dino_tokens_are_hidden_states(tiny_dino, image, size, block):
    ex = make(DinoExtractor, tiny_dino, blocks=[block], image_size=list(size))
    (fs,) = ex.extract([as_input(image)])
    _, _, out = dino_reference(tiny_dino, image, size)
    k = block % 3
    expected = as_map(out.hidden_states[k + 1][:, 1:], size, 8)  # [0] is the embedding output
    assert list(fs.layers) == [f"blocks.{k}"]
    torch.testing.assert_close(fs.layers[f"blocks.{k}"], expected, atol=1e-5, rtol=1e-4)


def test_dino_final_norm_is_last_hidden_state(tiny_dino, image):
    size = (40, 48)
    ex = make(DinoExtractor, tiny_dino, final_norm=True, image_size=list(size))
    (fs,) = ex.extract([as_input(image)])
    _, _, out = dino_reference(tiny_dino, image, size)
    expected = as_map(out.last_hidden_state[:, 1:], size, 8)
    torch.testing.assert_close(fs.layers["blocks.2"], expected, atol=1e-5, rtol=1e-4)


def test_dino_key_query_value_are_the_projections(tiny_dino, image):
    size = (48, 40)
    model, _, out = dino_reference(tiny_dino, image, size)
    block = hf_blocks(model)[1]
    with torch.no_grad():
        x = hf_norm1(block)(out.hidden_states[1])  # the input of block 1's attention
        qkv = {f: hf_projection(block, f)(x) for f in ("query", "key", "value")}
        attn = block.attention(x)
        attn = attn[0] if isinstance(attn, tuple) else attn
        out_proj = getattr(block.attention, "o_proj", None) or block.attention.output.dense
        rebuilt = out_proj(attention_from_qkv(qkv["query"], qkv["key"], qkv["value"], heads=2))
    # the three projections, heads concatenated, give back the block's attention output
    torch.testing.assert_close(rebuilt, attn, atol=1e-5, rtol=1e-4)
    for facet, tokens in qkv.items():
        ex = make(DinoExtractor, tiny_dino, blocks=[1], facet=facet, image_size=list(size))
        (fs,) = ex.extract([as_input(image)])
        assert ex.layers()[0].name == f"blocks.1.{facet}"
        expected = as_map(tokens[:, 1:], size, 8)
        torch.testing.assert_close(fs.layers[f"blocks.1.{facet}"], expected, atol=1e-5, rtol=1e-4)


# -- dinov2 ----------------------------------------------------------------------------------------


def dinov2_reference(folder, img, size, registers, official=True):
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    cls = Dinov2WithRegistersModel if registers else Dinov2Model
    model = cls.from_pretrained(folder).eval()
    if official:
        use_official_positions(model, 14)
    x = pixels(img, size, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    return model, out


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_tokens_drop_cls_and_registers(tiny_dinov2, tiny_dinov2_reg, image, registers):
    folder = tiny_dinov2_reg if registers else tiny_dinov2
    size = (70, 42)  # 5 x 3 patches; trained on 4 x 4: interpolated
    ex = make(Dinov2Extractor, folder, blocks=[-2], image_size=list(size))
    (fs,) = ex.extract([as_input(image)])
    _, out = dinov2_reference(folder, image, size, registers)
    prefix = 1 + (4 if registers else 0)
    expected = as_map(out.hidden_states[2][:, prefix:], size, 14)
    torch.testing.assert_close(fs.layers["blocks.1"], expected, atol=1e-5, rtol=1e-4)
    assert ex.model_identity()["model_type"] == ("dinov2_with_registers" if registers else "dinov2")


def test_dinov2_registers_key_facet(tiny_dinov2_reg, image):
    size = (56, 56)
    model, out = dinov2_reference(tiny_dinov2_reg, image, size, True)
    block = hf_blocks(model)[2]
    with torch.no_grad():
        key = hf_projection(block, "key")(hf_norm1(block)(out.hidden_states[2]))
    ex = make(Dinov2Extractor, tiny_dinov2_reg, facet="key", image_size=list(size))
    (fs,) = ex.extract([as_input(image)])
    torch.testing.assert_close(
        fs.layers["blocks.2.key"], as_map(key[:, 5:], size, 14), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("plugin", ["dino", "dinov2"])
def test_transformers_position_interpolation_is_the_library_forward(
    tiny_dino, tiny_dinov2, image, plugin
):
    size = (56, 42) if plugin == "dinov2" else (48, 40)
    if plugin == "dino":
        folder, cls, patch = tiny_dino, DinoExtractor, 8
        ref = dino_reference(tiny_dino, image, size, official=False)[2]
        official = dino_reference(tiny_dino, image, size)[2]
    else:
        folder, cls, patch = tiny_dinov2, Dinov2Extractor, 14
        ref = dinov2_reference(tiny_dinov2, image, size, False, official=False)[1]
        official = dinov2_reference(tiny_dinov2, image, size, False)[1]
    ex = make(cls, folder, blocks=[0], image_size=list(size), position_interpolation="transformers")
    (fs,) = ex.extract([as_input(image)])
    expected = as_map(ref.hidden_states[1][:, 1:], size, patch)
    torch.testing.assert_close(fs.layers["blocks.0"], expected, atol=1e-5, rtol=1e-4)
    # the 0.1 of the official scale factor moves the samples: the two really differ
    other = as_map(official.hidden_states[1][:, 1:], size, patch)
    assert (other - expected).abs().max() > 1e-3


def hub_interpolate_pos_encoding(pos, w, h, patch=14):
    """dinov2/models/vision_transformer.py's interpolate_pos_encoding, copied in spirit line by
    line. Its caller does ``B, nc, w, h = x.shape``: ``w`` is the image *height*."""
    n = pos.shape[1] - 1
    dim = pos.shape[-1]
    w0 = w // patch
    h0 = h // patch
    m = int(math.sqrt(n))
    sx = float(w0 + 0.1) / m
    sy = float(h0 + 0.1) / m
    patch_pos_embed = F.interpolate(
        pos[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((pos[:, 0].unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize(("height", "width"), [(840, 840), (560, 840), (840, 420)])
def test_official_position_interpolation_equals_the_dinov2_hub_code(height, width):
    from diffeat.plugins.vit.hf import official_position_interpolation

    torch.manual_seed(2)
    pos = torch.randn(1, 1 + 37 * 37, 8)
    holder = torch.nn.Module()
    holder.position_embeddings = torch.nn.Parameter(pos)
    method = official_position_interpolation(14)
    tokens = torch.zeros(1, 1 + (height // 14) * (width // 14), 8)
    got = method(holder, tokens, height, width)
    # the hub's forward: B, nc, w, h = x.shape, so its "w" is our height
    torch.testing.assert_close(got, hub_interpolate_pos_encoding(pos, height, width))
    # at the training size (square) the embeddings are used as they are
    assert method(holder, torch.zeros(1, 1 + 37 * 37, 8), 518, 518) is holder.position_embeddings


def test_dinov2_final_norm(tiny_dinov2, image):
    size = (56, 28)
    _, out = dinov2_reference(tiny_dinov2, image, size, False)
    ex = make(Dinov2Extractor, tiny_dinov2, final_norm=True, image_size=list(size))
    (fs,) = ex.extract([as_input(image)])
    expected = as_map(out.last_hidden_state[:, 1:], size, 14)
    torch.testing.assert_close(fs.layers["blocks.2"], expected, atol=1e-5, rtol=1e-4)


# -- openclip --------------------------------------------------------------------------------------


def openclip_reference(tiny_openclip, **kwargs):
    import open_clip

    config, checkpoint = tiny_openclip
    open_clip.add_model_config(config)
    return open_clip.create_model(TINY_OPENCLIP_NAME, pretrained=checkpoint, **kwargs).eval()


@pytest.mark.parametrize("block", [1, -1])
def test_openclip_tokens_are_forward_intermediates(tiny_openclip, image, block):
    import open_clip

    config, checkpoint = tiny_openclip
    size = (32, 32)
    ex = make(OpenClipExtractor, config, pretrained=checkpoint, blocks=[block], image_size=[32, 32])
    (fs,) = ex.extract([as_input(image)])
    visual = openclip_reference(tiny_openclip).visual
    x = pixels(image, size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        ref = visual.forward_intermediates(x, indices=[block % 3], intermediates_only=True)
    torch.testing.assert_close(
        fs.layers[f"blocks.{block % 3}"], ref["image_intermediates"][0], atol=1e-5, rtol=1e-4
    )


def test_openclip_interpolates_position_embeddings_bicubic(tiny_openclip, image):
    import open_clip

    config, checkpoint = tiny_openclip
    size = (48, 40)  # grid 6 x 5 from the 4 x 4 of training
    ex = make(
        OpenClipExtractor, config, pretrained=checkpoint, image_size=list(size), final_norm=True
    )
    (fs,) = ex.extract([as_input(image)])
    visual = openclip_reference(tiny_openclip).visual  # built at 32 x 32
    pos = visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    # open_clip's resize_pos_embed: bicubic with antialias=True, which in torch also means the
    # PIL kernel (a = -0.5) when upsampling, unlike transformers' plain bicubic (a = -0.75)
    grid = F.interpolate(grid, size=(5, 6), mode="bicubic", align_corners=False, antialias=True)
    new = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(30, -1)])
    visual.positional_embedding = torch.nn.Parameter(new)
    x = pixels(image, size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        ref = visual.forward_intermediates(
            x, indices=[2], intermediates_only=True, normalize_intermediates=True
        )
    torch.testing.assert_close(
        fs.layers["blocks.2"], ref["image_intermediates"][0], atol=1e-5, rtol=1e-4
    )


def test_openclip_fused_in_proj_split(tiny_openclip, image):
    import open_clip

    config, checkpoint = tiny_openclip
    size = (40, 32)
    visual = openclip_reference(tiny_openclip, force_image_size=(32, 40)).visual
    x = pixels(image, size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    block = visual.transformer.resblocks[1]
    with torch.no_grad():
        ref = visual.forward_intermediates(
            x, indices=[0], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        tokens = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], 1)
        h = block.ln_1(tokens)
        q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        attn = block.attn(h, h, h, need_weights=False)[0]
        rebuilt = block.attn.out_proj(attention_from_qkv(q, k, v, heads=2))
    torch.testing.assert_close(rebuilt, attn, atol=1e-5, rtol=1e-4)
    for facet, expected in (("query", q), ("key", k), ("value", v)):
        ex = make(
            OpenClipExtractor,
            config,
            pretrained=checkpoint,
            blocks=[1],
            facet=facet,
            image_size=list(size),
        )
        (fs,) = ex.extract([as_input(image)])
        torch.testing.assert_close(
            fs.layers[f"blocks.1.{facet}"], as_map(expected[:, 1:], size, 8), atol=1e-5, rtol=1e-4
        )


def test_openclip_folder_equals_config_and_checkpoint(tiny_openclip, image):
    config, checkpoint = tiny_openclip
    folder = str(__import__("pathlib").Path(config).parent)
    a = make(OpenClipExtractor, config, pretrained=checkpoint, facet="value")
    b = make(OpenClipExtractor, folder, facet="value")
    fa = a.extract([as_input(image)])[0].layers["blocks.2.value"]
    fb = b.extract([as_input(image)])[0].layers["blocks.2.value"]
    torch.testing.assert_close(fa, fb)
    assert b.model_identity()["pretrained"] == ""
    assert a.normalisation() == b.normalisation()


def test_openclip_without_open_clip_names_the_extra(monkeypatch, tiny_openclip):
    config, checkpoint = tiny_openclip
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now fails
    loaded = [m for m in sys.modules if m.startswith("diffeat.plugins.vit")]
    for name in loaded:
        parent, _, child = name.rpartition(".")
        # the fresh import rebinds the parent package's attribute: have it restored too
        monkeypatch.setattr(sys.modules[parent], child, sys.modules[name])
    for name in loaded:
        monkeypatch.delitem(sys.modules, name)
    fresh = importlib.import_module("diffeat.plugins.vit")  # imports without open_clip
    names = []
    fresh.register_extractors(lambda name, factory: names.append(name))
    assert names == ["dino", "dinov2", "openclip"]
    cls = fresh.OpenClipExtractor
    ex = cls(build_options(cls, {"model": config, "pretrained": checkpoint}, "test"))
    with pytest.raises(ModelLoadError, match=r'pip install "diffeat\[openclip\]"'):
        ex.layers()
    with pytest.raises(ModelLoadError, match=r"diffeat\[openclip\]"):
        ex.model_identity()


def test_openclip_offline_tag_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ex = make(OpenClipExtractor, "ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ModelLoadError, match=r"hf download laion/.*pretrained = \"DIR/"):
        ex.model_identity()


def test_openclip_unknown_names(tiny_openclip):
    with pytest.raises(ConfigError, match="not an open_clip architecture.*ViT-B-32"):
        make(OpenClipExtractor, "ViT-B-3", pretrained="x").layers()
    with pytest.raises(ConfigError, match="write hf-hub:laion/no-such-repo"):
        make(OpenClipExtractor, "laion/no-such-repo").layers()
    with pytest.raises(ConfigError, match="neither a pretrained tag of ViT-B-32"):
        make(OpenClipExtractor, "ViT-B-32", pretrained="no-such-tag").layers()


# -- shared behaviour ------------------------------------------------------------------------------


def test_block_selection_and_errors(tiny_dino):
    ex = make(DinoExtractor, tiny_dino, blocks=[-1, 0])
    assert [i.name for i in ex.layers()] == ["blocks.0", "blocks.2"]
    assert [i.stride for i in ex.layers()] == [8.0, 8.0]
    with pytest.raises(ConfigError, match=r"block 3 does not exist; the model has 3 blocks"):
        make(DinoExtractor, tiny_dino, blocks=[3]).layers()
    with pytest.raises(ConfigError, match="names block 2 twice"):
        make(DinoExtractor, tiny_dino, blocks=[-1, 2]).layers()
    with pytest.raises(ConfigError, match="final_norm applies to facet 'token' only"):
        build_options(DinoExtractor, {"facet": "key", "final_norm": True}, "extractor")


def test_size_not_a_multiple_of_the_patch(tiny_dino, tiny_openclip):
    with pytest.raises(
        ConfigError, match=r"\[50, 32\] is not a multiple of the patch size 8.*48 or 56"
    ):
        make(DinoExtractor, tiny_dino, image_size=[50, 32]).layers()
    config, checkpoint = tiny_openclip
    with pytest.raises(ConfigError, match="patch size 8"):
        make(OpenClipExtractor, config, pretrained=checkpoint, image_size=[32, 30]).extract(
            [as_input(smooth_texture((20, 20)))]
        )


def test_pad_rule_letterboxes_on_black(tiny_dinov2, image):
    """size_rule = pad equals squash-resizing a letterboxed copy (as SD-DINO builds it)."""
    inp = as_input(image)  # 90 x 70 -> 56 x 44 (round(70 * 56 / 90)), 6 rows of black above
    ex = make(Dinov2Extractor, tiny_dinov2, image_size=[56, 56], size_rule="pad")
    t = ex.transform_for(inp.size)
    assert t.offset == (0.0, 6.0)
    canvas = Image.new("RGB", (56, 56))
    canvas.paste(image.resize((56, 44), Image.Resampling.BICUBIC), (0, 6))
    plain = make(Dinov2Extractor, tiny_dinov2, image_size=[56, 56])
    a = ex.extract([inp])[0].layers["blocks.2"]
    b = plain.extract([as_input(canvas)])[0].layers["blocks.2"]
    torch.testing.assert_close(a, b)
    corners = torch.tensor([[-0.5, -0.5], [89.5, 69.5]])
    torch.testing.assert_close(t.image_to_model(corners), torch.tensor([[-0.5, 5.5], [55.5, 49.5]]))


def test_stop_early_skips_later_blocks_and_changes_nothing(tiny_dino, image):
    inp = as_input(image)
    ex = make(DinoExtractor, tiny_dino, blocks=[0])
    calls = []
    handle = hf_blocks(ex.model)[1].register_forward_hook(lambda *a: calls.append(1))
    a = ex.extract([inp])[0].layers["blocks.0"]
    handle.remove()
    assert calls == []
    b = make(DinoExtractor, tiny_dino, blocks=[0], stop_early=False).extract([inp])[0]
    torch.testing.assert_close(a, b.layers["blocks.0"])


def test_batches_equal_single_images(tiny_openclip, image):
    config, checkpoint = tiny_openclip
    imgs = [as_input(image), as_input(smooth_texture((40, 60), seed=12))]
    one = make(OpenClipExtractor, config, pretrained=checkpoint, facet="key")
    two = make(OpenClipExtractor, config, pretrained=checkpoint, facet="key", batch_size=2)
    a = [one.extract([im])[0].layers["blocks.2.key"] for im in imgs]
    b = [fs.layers["blocks.2.key"] for fs in two.extract(imgs)]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_identity_fingerprints_the_weights(tiny_dino, tmp_path):
    other = build_tiny_dino(tmp_path / "other", seed=7)
    a, b = make(DinoExtractor, tiny_dino), make(DinoExtractor, other)
    assert a.model_identity()["fingerprint"] != b.model_identity()["fingerprint"]
    assert a.model_identity() == make(DinoExtractor, tiny_dino).model_identity()
    assert a._model is None  # the identity needs no weights loaded


def test_wrong_family_and_missing_models(tiny_dino, tiny_dinov2, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="use the 'dinov2' extractor"):
        make(DinoExtractor, tiny_dinov2).layers()
    with pytest.raises(ModelLoadError, match="use the 'dino' extractor"):
        make(Dinov2Extractor, tiny_dino).layers()
    with pytest.raises(ModelLoadError, match="not a transformers model folder"):
        make(DinoExtractor, tmp_path).model_identity()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"--model DIR"):
        make(Dinov2Extractor, "nobody-here/no-such-dinov2").model_identity()


def test_bfloat16_is_close_to_float32(tiny_dino, image):
    inp = as_input(image)
    a = make(DinoExtractor, tiny_dino).extract([inp])[0].layers["blocks.2"]
    b = make(DinoExtractor, tiny_dino, dtype="bfloat16").extract([inp])[0].layers["blocks.2"]
    assert b.dtype == torch.float32
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_pipeline_matches_identical_images(manager, tiny_dinov2, image):
    from diffeat.core.pipeline import Pipeline

    pipe = Pipeline.from_dict(
        {
            "extractor": {
                "plugin": "dinov2",
                "model": str(tiny_dinov2),
                "image_size": [56, 42],
                "device": "cpu",
            },
            "aggregator": {"plugin": "select"},
            "matcher": {"plugin": "nearest"},
        },
        manager=manager,
    )
    # inside the band of pixel centres the 4 x 3 grid covers (outside it border padding makes
    # every pixel of an edge strip read the same vector, and the first one wins)
    points = [(20.0, 20.0), (45.0, 30.0), (70.0, 50.0)]
    res = pipe.match(image, image, points)
    assert res.points.tolist() == [list(p) for p in points]
    assert pipe.layers()[0].name == "blocks.2"


# -- the conformance mixin -------------------------------------------------------------------------


class TestDinoConformance(ExtractorConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, tiny_dino):
        self.folder = tiny_dino

    def make_extractor(self):
        return make(DinoExtractor, self.folder, blocks=[0, -1], image_size=[48, 40])


class TestDinov2Conformance(ExtractorConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, tiny_dinov2_reg):
        self.folder = tiny_dinov2_reg

    def make_extractor(self):
        return make(Dinov2Extractor, self.folder, facet="query", image_size=[42, 56])


class TestOpenClipConformance(ExtractorConformance):
    @pytest.fixture(autouse=True)
    def _files(self, tiny_openclip):
        self.files = tiny_openclip

    def make_extractor(self):
        config, checkpoint = self.files
        return make(
            OpenClipExtractor,
            config,
            pretrained=checkpoint,
            size_rule="pad",
            image_size=[40, 32],
        )


@pytest.mark.parametrize(
    ("model", "tag", "forced"),
    [
        ("ViT-L-14-336", "openai", True),  # trained with QuickGELU, config says GELU
        ("ViT-L-14-336-quickgelu", "openai", False),  # the config already says QuickGELU
        ("ViT-H-14", "laion2b_s32b_b79k", False),
    ],
)
def test_openclip_tags_trained_with_quick_gelu_get_it(monkeypatch, tmp_path, model, tag, forced):
    import open_clip

    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"not read")
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: str(weights))
    seen = {}

    def create_model(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model", create_model)
    ex = make(OpenClipExtractor, model, pretrained=tag, image_size=[224, 224])
    assert ex.source.quick_gelu is forced
    assert ("quick_gelu" in ex.model_identity()) is forced
    with pytest.raises(ModelLoadError, match="stop here"):
        _ = ex.model
    assert seen["force_quick_gelu"] is forced


# -- overlapping patches (stride < patch) -------------------------------------------------------


def test_dino_with_stride_4_equals_the_dense_vit_extractor(tiny_dino, image):
    """Amir et al.'s ViTExtractor written out: patch conv stride 4, position embeddings
    interpolated to 1 + (side - 8) // 4 tokens per side with the + 0.1 scale factor."""
    from transformers import ViTModel

    size = (48, 40)
    ex = make(DinoExtractor, tiny_dino, blocks=[1], image_size=list(size), stride=4)
    (fs,) = ex.extract([as_input(image)])
    model = ViTModel.from_pretrained(tiny_dino, add_pooling_layer=False).eval()
    model.embeddings.patch_embeddings.projection.stride = (4, 4)
    emb = model.embeddings

    def interpolate(embeddings, height, width):
        rows, cols = 1 + (height - 8) // 4, 1 + (width - 8) // 4
        return official_positions(emb.position_embeddings, rows, cols)

    emb.interpolate_pos_encoding = interpolate
    with torch.no_grad():
        out = model(
            pixels(image, size, IMAGENET_MEAN, IMAGENET_STD),
            output_hidden_states=True,
            interpolate_pos_encoding=True,
        )
    expected = out.hidden_states[2][:, 1:].reshape(1, 9, 11, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(fs.layers["blocks.1"], expected, atol=1e-5, rtol=1e-4)
    assert ex.layers()[0].stride == 4.0


def test_stride_transform_puts_each_token_at_its_patch_centre(tiny_dino):
    ex = make(DinoExtractor, tiny_dino, image_size=[48, 40], stride=4)
    t = ex.transform_for((48, 40))  # same size: model pixels are image pixels
    # token (j, i) covers pixels [4j, 4j + 8) x [4i, 4i + 8): centre 4j + 3.5
    centres = torch.tensor([[3.5, 3.5], [4 * 10 + 3.5, 4 * 8 + 3.5], [4 * 5 + 3.5, 3.5]])
    grid = t.image_to_grid(centres, (11, 9))
    torch.testing.assert_close(grid, torch.tensor([[0.0, 0.0], [10.0, 8.0], [5.0, 0.0]]))


def test_stride_must_divide_the_patch_and_use_official_positions(tiny_dino, image):
    with pytest.raises(ConfigError, match="stride 3 does not divide the patch size 8"):
        make(DinoExtractor, tiny_dino, stride=3).extract([as_input(image)])
    ex = make(DinoExtractor, tiny_dino, stride=4, position_interpolation="transformers")
    with pytest.raises(ConfigError, match='stride 4 needs position_interpolation = "official"'):
        ex.extract([as_input(image)])


def test_sd_dino_point_arithmetic_with_overlapping_patches(tiny_dino):
    """SD-DINO's DINOv1 option: num_patches = 8 / 4 * (56 // 8 - 1) + 1 = 13 on a 56 px
    canvas; query cell int(13 / 56 * x); answer (j - 1) * 4 + 4 + 8 // 2 - 0.5."""
    import numpy as np

    from diffeat.core.components import View
    from diffeat.plugins.matchers import Nearest

    ex = make(DinoExtractor, tiny_dino, image_size=[56, 56], stride=4, size_rule="pad")
    assert ex.grid == (13, 13)
    src_size, tgt_size = (100, 67), (50, 80)
    torch.manual_seed(9)
    src_desc, tgt_desc = torch.randn(6, 13, 13), torch.randn(6, 13, 13)
    points = torch.tensor([[0.0, 0.0], [99.0, 66.0], [50.0, 33.0], [13.0, 60.0]])

    def pad(w, h):
        scale = 56 / max(w, h)
        ox = int((56 - int(np.around(56 * w / h))) / 2) if w < h else 0
        oy = int((56 - int(np.around(56 * h / w))) / 2) if h < w else 0
        return scale, np.array([ox, oy])

    s_scale, s_off = pad(*src_size)
    kps = points.numpy().astype(np.float64) * s_scale + s_off
    cx, cy = (13 / 56 * kps[:, 0]).astype(np.int32), (13 / 56 * kps[:, 1]).astype(np.int32)
    q = src_desc.flatten(1).T[torch.from_numpy(13 * cy + cx).long()]
    sims = F.normalize(q, dim=1) @ F.normalize(tgt_desc.flatten(1).T, dim=1).T
    best = sims.argmax(dim=1).numpy()
    pred = (np.stack([best % 13, best // 13], 1) - 1) * 4 + 4 + 8 // 2 - 0.5
    t_scale, t_off = pad(*tgt_size)
    expected = torch.from_numpy((pred - t_off) / t_scale).float()

    def view(desc, size):
        return View(Image.new("RGB", size), ex.transform_for(size), descriptors=desc)

    result = Nearest(Nearest.Options(resolution="grid", points="scale")).match(
        view(src_desc, src_size), view(tgt_desc, tgt_size), points
    )
    torch.testing.assert_close(result.points, expected)
