"""Image loading and preprocessing: odd modes, EXIF, corrupt files, decompression bombs."""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tinyalign.images import (MAX_PIXELS, ImageError, load_image, preprocess, preprocess_spec,
                              to_rgb)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
RED = (255, 0, 0)
WHITE = (255, 255, 255)


def _check_rgb(img, size=None):
    assert img.mode == "RGB"
    if size is not None:
        assert img.size == size
    x = preprocess(img, 16, MEAN, STD)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert np.isfinite(x).all()
    return np.asarray(img)


def test_rgb_png_path_bytes_and_pil(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (10, 8), RED).save(p)
    for src in (p, str(p), p.read_bytes(), Image.open(p)):
        a = _check_rgb(load_image(src), (10, 8))
        assert tuple(a[0, 0]) == RED


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # red in CMYK
    assert Image.open(p).mode == "CMYK"
    a = _check_rgb(load_image(p), (16, 16)).astype(int)
    assert abs(a[8, 8] - np.array(RED)).max() < 20


def test_16bit_grey_keeps_contrast(tmp_path):
    p = tmp_path / "grey16.png"
    arr = np.zeros((4, 3), dtype=np.uint16)
    arr[:, 1] = 32896  # 128 * 257
    arr[:, 2] = 65535
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode in ("I;16", "I")
    a = _check_rgb(load_image(p), (3, 4))
    assert tuple(a[0, 0]) == (0, 0, 0)
    assert tuple(a[0, 1]) == (128, 128, 128)
    assert tuple(a[0, 2]) == (255, 255, 255)
    # a dark 16-bit image stays dark (fixed scale, not clipping, not stretching)
    dark = Image.fromarray(np.full((2, 2), 1000, dtype=np.uint16))
    assert np.asarray(load_image(dark)).max() == 4


def test_int32_and_float_and_1bit_modes():
    i8 = Image.fromarray(np.array([[0, 200]], dtype=np.int32))  # mode "I" holding 8-bit values
    assert i8.mode == "I"
    assert np.asarray(load_image(i8))[0, :, 0].tolist() == [0, 200]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f.mode == "F"
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert np.asarray(load_image(one))[0, :, 0].tolist() == [0, 255]


def test_palette_with_transparency_composites_white(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # index 0 black, 1 red
    for x in range(2, 4):
        for y in range(4):
            im.putpixel((x, y), 1)
    im.save(p, transparency=0)
    assert Image.open(p).mode == "P" and "transparency" in Image.open(p).info
    a = _check_rgb(load_image(p), (4, 4))
    assert tuple(a[0, 0]) == WHITE  # transparent black -> white, not black
    assert tuple(a[0, 3]) == RED


def test_rgba_and_la_composite_white(tmp_path):
    p = tmp_path / "rgba.png"
    arr = np.zeros((1, 3, 4), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black
    arr[0, 1] = (255, 0, 0, 255)  # opaque red
    arr[0, 2] = (0, 0, 0, 128)  # half transparent black
    Image.fromarray(arr, "RGBA").save(p)
    a = _check_rgb(load_image(p), (3, 1)).astype(int)
    assert tuple(a[0, 0]) == WHITE
    assert tuple(a[0, 1]) == RED
    assert all(abs(v - 127) <= 1 for v in a[0, 2])
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    b = np.asarray(load_image(la))
    assert tuple(b[0, 0]) == WHITE and tuple(b[0, 1]) == (0, 0, 0)


def test_exif_rotation_rotates(tmp_path):
    p = tmp_path / "rot.jpg"
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = RED  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(p, exif=exif.tobytes(), quality=95)
    img = load_image(p)
    assert img.size == (20, 40)  # portrait after rotation
    a = np.asarray(img).astype(int)
    assert a[2, 10, 0] > 200 and a[2, 10, 2] < 60  # top is the former left (red)
    assert a[37, 10, 2] > 200 and a[37, 10, 0] < 60  # bottom is the former right (blue)


def test_truncated_and_garbage_files_raise(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(cut)
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])
    junk = tmp_path / "junk.png"
    junk.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="not an image"):
        load_image(junk)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_names_path(tmp_path):
    p = tmp_path / "nope" / "missing.png"
    with pytest.raises(ImageError, match="missing.png"):
        load_image(p)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    assert issubclass(ImageError, ValueError)


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose IHDR is patched to claim width x height (CRC fixed)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (7_000, 7_000)])
def test_decompression_bomb_refused_quickly(tmp_path, w, h):
    # 10^10 pixels trips Pillow's own guard at open; 49M trips ours (default 40M) from the header.
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_claiming(w, h))
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert time.perf_counter() - t0 < 1.0
    if w == 7_000:
        assert "7000x7000" in str(e.value) and f"{MAX_PIXELS:,}" in str(e.value)


def test_max_pixels_argument(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (30, 30)).save(p)
    with pytest.raises(ImageError, match="30x30"):
        load_image(p, max_pixels=500)
    with pytest.raises(ImageError, match="limit of 500"):
        load_image(Image.new("RGB", (30, 30)), max_pixels=500)
    assert load_image(p, max_pixels=900).size == (30, 30)


def test_preprocess_values_and_spec():
    img = Image.new("RGB", (7, 5), (255, 0, 255))
    x = preprocess(img, 8, MEAN, STD)
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(x[0], 2.0, atol=1e-6)  # (1 - .5) / .25
    np.testing.assert_allclose(x[1], -2.0, atol=1e-6)
    np.testing.assert_allclose(x[2], 2.0, atol=1e-6)
    # same size: no resize, exact values; a gradient survives channel-first layout
    g = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rgb = np.stack([g, g.T, np.zeros_like(g)], -1)
    y = preprocess(Image.fromarray(rgb), 4, (0, 0, 0), (1, 1, 1))
    np.testing.assert_allclose(y[0], g / 255.0, atol=1e-6)
    np.testing.assert_allclose(y[1], g.T / 255.0, atol=1e-6)
    # a non-RGB PIL image goes through the same conversion as load_image
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    np.testing.assert_allclose(preprocess(rgba, 4, (0, 0, 0), (1, 1, 1)), 1.0)
    with pytest.raises(ValueError):
        preprocess(img, 0, MEAN, STD)
    with pytest.raises(ValueError):
        preprocess(img, 8, MEAN, (1, 0, 1))
    spec = preprocess_spec(8, MEAN, STD)
    assert json.loads(json.dumps(spec)) == spec
    assert spec["resize"] == "bicubic" and spec["layout"] == "CHW" and spec["dtype"] == "float32"
    assert spec["background"] == "white" and spec["exif"] == "applied"
    assert spec["size"] == 8 and spec["mean"] == list(MEAN) and spec["std"] == list(STD)


def test_to_rgb_returns_rgb_for_all_common_modes():
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F", "I;16",
                 "HSV"):
        im = Image.new(mode, (3, 2))
        out = to_rgb(im)
        assert out.mode == "RGB" and out.size == (3, 2), mode


def test_no_torch_import():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import tinyalign.images, tinyalign.data\n"
        "from PIL import Image\n"
        "img = tinyalign.images.load_image(Image.new('RGBA', (5, 5)))\n"
        "x = tinyalign.images.preprocess(img, 4, (0.5,) * 3, (0.5,) * 3)\n"
        "assert x.shape == (3, 4, 4)\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=root, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
