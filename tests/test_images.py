from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffeat.core.errors import ImageError
from diffeat.core.images import as_input, content_key, list_images, load_image, to_tensor
from diffeat.testing import smooth_texture


def test_missing_and_folder(tmp_path):
    with pytest.raises(ImageError, match="image not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_non_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, not a jpeg")
    with pytest.raises(ImageError, match=r"notes.jpg is not an image file"):
        load_image(p)


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "cut.jpg"
    smooth_texture((128, 128)).save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg is truncated or corrupt"):
        load_image(p)


def test_unreadable(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can read anything")
    p = tmp_path / "secret.png"
    smooth_texture((8, 8)).save(p)
    p.chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(p)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_modes_are_converted(tmp_path, mode):
    rgb = smooth_texture((20, 10))
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)
        suffix = ".png"
    else:
        img = rgb.convert(mode)
        suffix = ".tif" if mode == "CMYK" else ".png"
    p = tmp_path / f"img{suffix}"
    img.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (20, 10)
    if mode in ("L", "I;16"):
        expected = np.asarray(rgb.convert("L"))
        assert np.abs(np.asarray(out)[..., 0].astype(int) - expected).max() <= 1


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    out = np.asarray(load_image(p))
    assert out[1, 1, 0] == 255 and out[0, 0, 0] == 0


def test_content_key_ignores_path(tmp_path):
    img = smooth_texture((30, 20))
    a, b = tmp_path / "a.png", tmp_path / "sub"
    b.mkdir()
    img.save(a)
    img.save(b / "copy.png")
    assert as_input(a).key == as_input(b / "copy.png").key == content_key(img)
    assert as_input(a).key != as_input(smooth_texture((30, 20), seed=5)).key
    assert list_images([tmp_path]) == [a, b / "copy.png"]


def test_to_tensor_range():
    img = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8))
    t = to_tensor(img)
    assert t.shape == (3, 1, 1)
    assert t[0].item() == -1.0 and t[1].item() == 1.0


def _huge_png(path, width: int, height: int) -> None:
    """A real 1-bit PNG of one colour: a few hundred kB on disk, ``width x height`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    packer = zlib.compressobj(9)
    parts = [packer.compress(row * 1000) for _ in range(height // 1000)]
    parts += [packer.compress(row * (height % 1000)), packer.flush()]
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        fh.write(chunk(b"IDAT", b"".join(parts)))
        fh.write(chunk(b"IEND", b""))


def test_decompression_bomb_is_an_image_error_that_says_how_to_raise_the_limit(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("DIFFEAT_MAX_IMAGE_PIXELS", raising=False)
    bomb = tmp_path / "bomb.png"
    _huge_png(bomb, 30000, 30000)
    assert bomb.stat().st_size < 2_000_000
    with pytest.raises(ImageError) as err:
        load_image(bomb)
    message = str(err.value)
    assert "bomb.png is too large to decode" in message
    assert "900000000 pixels" in message and "limit of 178956970 pixels" in message
    assert "DIFFEAT_MAX_IMAGE_PIXELS" in message and "0 for no limit" in message


def test_the_pixel_limit_comes_from_the_environment(tmp_path, monkeypatch):
    from diffeat.core.errors import ConfigError
    from diffeat.core.images import max_image_pixels

    monkeypatch.delenv("DIFFEAT_MAX_IMAGE_PIXELS", raising=False)
    assert max_image_pixels() == 2 * Image.MAX_IMAGE_PIXELS
    path = tmp_path / "a.png"
    smooth_texture((40, 30)).save(path)
    monkeypatch.setenv("DIFFEAT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageError, match=r"40 x 30 = 1,200 pixels, more than the limit of 1,000"):
        load_image(path)
    monkeypatch.setenv("DIFFEAT_MAX_IMAGE_PIXELS", "1_200")
    assert load_image(path).size == (40, 30)
    monkeypatch.setenv("DIFFEAT_MAX_IMAGE_PIXELS", "0")
    assert max_image_pixels() is None and load_image(path).size == (40, 30)
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse it
    assert load_image(path).size == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == 100  # Pillow's setting is restored after the load
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", before)
    for bad in ("lots", "-5", "1e9"):
        monkeypatch.setenv("DIFFEAT_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(ConfigError, match=rf"DIFFEAT_MAX_IMAGE_PIXELS={bad!r}"):
            load_image(path)


def test_pillow_refusal_under_its_own_limit_is_an_image_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFEAT_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "a.png"
    smooth_texture((40, 30)).save(path)
    with pytest.raises(ImageError, match=r"a.png is too large to decode.*DIFFEAT_MAX_IMAGE_PIXELS"):
        load_image(path)


def test_a_bomb_fails_alone_and_the_batch_goes_on(manager, tmp_path, monkeypatch):
    from diffeat.core.pipeline import Pipeline

    monkeypatch.delenv("DIFFEAT_MAX_IMAGE_PIXELS", raising=False)
    good = tmp_path / "good.png"
    smooth_texture((40, 30)).save(good)
    bomb = tmp_path / "bomb.png"
    _huge_png(bomb, 30000, 30000)
    data = {"extractor": {"plugin": "color-blur", "image_size": [32, 32]}}
    pipe = Pipeline.from_dict(data, store=tmp_path / "f.zarr", manager=manager)
    report = pipe.extract([bomb, good])
    assert (report.total, report.computed) == (2, 1)
    [(failed, why)] = report.failed
    assert failed == str(bomb) and "DIFFEAT_MAX_IMAGE_PIXELS" in why


def test_numpy_and_torch_images_have_the_keys_of_their_pixels():
    pil = smooth_texture((40, 30), seed=4)
    arr = np.asarray(pil)
    key = as_input(pil).key
    assert as_input(arr).key == key
    assert as_input(arr.astype(np.float32) / 255.0).key == key
    assert as_input(arr / 255.0).key == key  # float64
    rgba = np.concatenate([arr, np.full((30, 40, 1), 7, np.uint8)], axis=2)
    assert as_input(rgba).key == key
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    assert as_input(tensor).key == key
    assert as_input(tensor.float() / 255.0).key == key
    assert as_input(tensor.double() / 255.0).source == "<torch tensor>"
    assert as_input(arr).source == "<numpy array>"
    assert as_input(arr).image.size == (40, 30)
    grey = pil.convert("L")
    g = np.asarray(grey)
    gkey = as_input(grey).key
    assert as_input(g).key == gkey == as_input(g[:, :, None]).key
    assert as_input(torch.from_numpy(g.copy())).key == gkey
    assert as_input(torch.from_numpy(g.copy())[None]).key == gkey
    assert as_input(g.astype(np.float32) / 255.0).key == gkey
    assert as_input(arr).key == as_input(arr.copy()).key  # deterministic
    assert as_input(np.asfortranarray(arr)).key == key  # memory layout does not matter


@pytest.mark.parametrize(
    "item, fragment",
    [
        (np.zeros((2, 3, 30, 40), np.uint8), "shape (2, 3, 30, 40)"),
        (np.zeros((30, 40, 2), np.uint8), "shape (30, 40, 2)"),
        (np.zeros((30, 40, 3), np.uint16), "dtype uint16"),
        (np.zeros((30, 40, 3), bool), "dtype bool"),
        (np.full((30, 40, 3), 200.0), "values in [200, 200]"),
        (np.full((30, 40, 3), -0.5, np.float32), "must be in [0, 1]"),
        (np.full((30, 40), np.nan), "NaN"),
        (np.zeros((0, 40, 3), np.uint8), "is empty"),
        (torch.zeros(2, 3, 30, 40), "is a batch"),
        (torch.zeros(30, 40, 3), "shape (30, 40, 3)"),
        (torch.zeros(3, 30, 40, dtype=torch.int64), "dtype torch.int64"),
        (torch.full((3, 30, 40), 2.0), "values in [2, 2]"),
        (42, "cannot use a int as an image"),
    ],
)
def test_unsupported_arrays_say_what_is_accepted(item, fragment):
    with pytest.raises(ImageError) as err:
        as_input(item)
    assert fragment in str(err.value)


def _rotated_photo(path, orientation: int = 6):
    """A 40 x 20 PNG whose EXIF says: rotate 90 degrees clockwise to view (orientation 6)."""
    raster = smooth_texture((40, 20), seed=3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    raster.save(path, exif=exif)
    return raster


def test_exif_orientation_is_applied_by_default_and_raw_on_request(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    raster = _rotated_photo(path)
    monkeypatch.delenv("DIFFEAT_IMAGE_ORIENTATION", raising=False)
    upright = load_image(path)
    assert upright.size == (20, 40)  # turned as a photo viewer shows it
    expected = raster.transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    assert np.array_equal(np.asarray(upright), np.asarray(expected))
    raw = load_image(path, orientation="raw")
    assert np.array_equal(np.asarray(raw), np.asarray(raster))
    # the choice is part of the store key: other pixels, another key
    assert as_input(path).key != as_input(path, orientation="raw").key
    assert as_input(path, orientation="raw").key == content_key(raster)
    monkeypatch.setenv("DIFFEAT_IMAGE_ORIENTATION", "raw")
    assert load_image(path).size == (40, 20)


def test_bad_orientation_names_the_variable(tmp_path, monkeypatch):
    from diffeat.core.errors import ConfigError

    path = tmp_path / "photo.png"
    _rotated_photo(path)
    monkeypatch.setenv("DIFFEAT_IMAGE_ORIENTATION", "sideways")
    with pytest.raises(ConfigError, match="DIFFEAT_IMAGE_ORIENTATION='sideways'.*exif.*raw"):
        load_image(path)


def test_dataset_images_are_read_raw_as_their_annotations(tmp_path, monkeypatch):
    from diffeat.core.datasets import ImageRef

    monkeypatch.delenv("DIFFEAT_IMAGE_ORIENTATION", raising=False)
    path = tmp_path / "photo.png"
    raster = _rotated_photo(path)
    assert ImageRef(path, "cat").load().size == raster.size
