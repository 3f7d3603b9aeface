from __future__ import annotations

import numpy as np
import pytest
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
