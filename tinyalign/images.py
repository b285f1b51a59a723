"""Image loading and preprocessing, shared by training, bank building, export checks and the
on-device runtime.

No torch here (the runtime imports this module where torch is absent): only numpy and Pillow.

Every image goes through the same two steps, so what a model sees at training time is exactly
what it sees on a phone:

1. `load_image` -> an 8-bit RGB `PIL.Image`:
   - refuses images over `max_pixels` from the header, before any pixel is decoded
     (decompression-bomb guard), and corrupt or truncated files (a full decode is forced);
   - applies the EXIF orientation;
   - converts every mode the same way (see `to_rgb`): transparency is composited onto a
     white background, 16-bit grey is scaled (not clipped) to 8 bits, CMYK is converted
     without colour management.
2. `preprocess` -> a float32 CHW array: a bicubic resize to `size` x `size` (no crop: the data
   this kit targets are small square images; a non-square image is stretched), scaling to
   [0, 1], then `(x - mean) / std` per channel.

`preprocess_spec` describes step 2 (and the conventions of step 1) as JSON for the bundle
manifest, so a runtime in another language can reproduce it.

Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` is never switched on here: a truncated file is an
error, not a half-grey picture.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageError",
    "MAX_PIXELS",
    "load_image",
    "to_rgb",
    "preprocess",
    "preprocess_spec",
]

#: Default decompression-bomb guard: images with more pixels than this are refused.
MAX_PIXELS = 40_000_000

#: Background that transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


class ImageError(ValueError):
    """An image cannot be used; the message says what is wrong and what to do."""


def _describe(src) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.size[0]}x{src.size[1]}>"
    return str(src)


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if max_pixels is not None and max_pixels > 0 and width * height > max_pixels:
        raise ImageError(
            f"image {what} is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} pixels (max_pixels; a guard against decompression bombs); "
            "downscale the image, or pass a larger max_pixels if you trust the file"
        )


def load_image(src: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Load `src` (a path, the encoded bytes of a file, or a PIL image) as an 8-bit RGB image.

    The EXIF orientation is applied and every mode is converted as `to_rgb` documents.
    Raises `ImageError` for a missing or unreadable file, a corrupt or truncated image, or an
    image with more than `max_pixels` pixels (checked from the header, before decoding).
    """
    what = _describe(src)
    if isinstance(src, Image.Image):
        _check_pixels(src.size[0], src.size[1], max_pixels, what)
        try:
            src.load()
        except Exception as e:  # a lazily opened image can still fail to decode
            raise ImageError(f"image {what} could not be decoded ({type(e).__name__}: {e}); "
                             "the file is corrupt or truncated: re-export or re-download it") from e
        return _finish(src, what)

    if isinstance(src, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(src))
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        if not path.exists():
            raise ImageError(f"image file not found: {path}; check the path (and the image folder)")
        if not path.is_file():
            raise ImageError(f"image path is not a file: {path}")
        fp = path
    else:
        raise ImageError(f"cannot load an image from a {type(src).__name__}; "
                         "pass a path, the file's bytes or a PIL image")

    with warnings.catch_warnings():
        # Our own max_pixels check below decides; Pillow's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageError(f"image {what} is too large to open safely ({e}); "
                             "downscale the image") from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{what} is not an image Pillow can read (unknown format or corrupt "
                             "header); check that the file really is a PNG/JPEG/... image") from e
        except PermissionError as e:
            raise ImageError(f"image file {what} cannot be read (permission denied)") from e
        except Exception as e:
            raise ImageError(f"image {what} could not be opened ({type(e).__name__}: {e}); "
                             "the file is corrupt: re-export or re-download it") from e
        with im:
            _check_pixels(im.size[0], im.size[1], max_pixels, what)
            try:
                im.load()  # force the full decode: truncation and corruption show up here
            except Exception as e:
                raise ImageError(f"image {what} could not be decoded ({type(e).__name__}: {e}); "
                                 "the file is corrupt or truncated: re-export or re-download it"
                                 ) from e
            return _finish(im, what)


def _finish(im: Image.Image, what: str) -> Image.Image:
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # malformed EXIF: keep the stored orientation rather than refuse the image
    try:
        out = to_rgb(im)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"image {what} (mode {im.mode}) could not be converted to RGB "
                         f"({type(e).__name__}: {e}); convert it to an 8-bit RGB PNG") from e
    if out is im:
        out = im.copy()  # never hand back the object whose file we are about to close
    return out


def _composite_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _int_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer grey -> 8-bit grey by a fixed scale (never clipping a 16-bit range)."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        a = a.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    else:  # "I" (int32): Pillow's mode for 16-bit PNG/TIFF in some versions, or 8-bit upcast
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 255:
            a = a.astype(np.float64)  # already 8-bit values
        elif lo >= 0 and hi <= 65535:
            a = a.astype(np.float64) / 257.0  # 16-bit values
        else:  # genuine 32-bit data: stretch its range
            a = (a.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _float_to_l(im: Image.Image) -> Image.Image:
    """32-bit float grey -> 8-bit grey: [0, 1] data is scaled by 255, [0, 255] kept, else stretched."""
    a = np.asarray(im).astype(np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    if a.size and finite.any():
        lo, hi = float(a[finite].min()), float(a[finite].max())
    else:
        lo, hi = 0.0, 0.0
    if lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    else:
        a = (a - lo) * (255.0 / (hi - lo if hi > lo else 1.0))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB, the same way everywhere.

    - RGB: unchanged. RGBX, YCbCr, HSV, L, 1 (black/white): plain conversion.
    - RGBA, RGBa, LA, La, PA, P with transparency, L/RGB with a transparent colour (tRNS):
      composited onto a white background.
    - CMYK (e.g. CMYK JPEG, Adobe-inverted ones included): Pillow's conversion, no ICC.
    - I;16* (16-bit grey): divided by 257, so 0..65535 maps to 0..255 keeping contrast.
      I (32-bit int): values in 0..255 kept, in 0..65535 divided by 257, else stretched.
    - F (32-bit float): values in [0, 1] times 255, in [0, 255] kept, else stretched; NaN -> 0.
    - LAB: through Pillow's ImageCms (Lab D50 -> sRGB) when available.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_white(im.convert("RGBA"))
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        return _composite_white(im.convert("RGBA"))
    if mode == "P":
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        return _int_to_l(im).convert("RGB")
    if mode == "F":
        return _float_to_l(im).convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms  # optional part of Pillow

        transform = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(im, transform)
    return im.convert("RGB")  # L, RGBX, CMYK, YCbCr, HSV, ...


def _check_triple(name: str, values) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in values)
    except TypeError as e:
        raise ValueError(f"{name} must be 3 numbers (R, G, B), got {values!r}") from e
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
    return t


def preprocess(img: Image.Image, size: int, mean: tuple[float, float, float],
               std: tuple[float, float, float]) -> np.ndarray:
    """Image -> float32 array [3, size, size] (CHW, C-contiguous, RGB).

    Resizes to `size` x `size` with Pillow's BICUBIC filter on the 8-bit image, with no crop:
    the images this kit targets are small squares, and a non-square image is stretched rather
    than cropped. Then scales to [0, 1] (divides by 255) and normalises `(x - mean) / std`
    per channel. A non-RGB image is first converted with `to_rgb` (pass images from
    `load_image` to also get the EXIF orientation and the pixel-count guard).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    mean_t = _check_triple("mean", mean)
    std_t = _check_triple("std", std)
    if any(s == 0.0 for s in std_t):
        raise ValueError(f"std must not contain 0, got {std!r}")
    if not isinstance(img, Image.Image):
        raise TypeError(f"preprocess expects a PIL image (see load_image), got {type(img).__name__}")
    rgb = to_rgb(img)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)  # HWC in [0, 1]
    x = (x - np.asarray(mean_t, dtype=np.float32)) / np.asarray(std_t, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess_spec(size: int, mean: tuple[float, float, float],
                    std: tuple[float, float, float]) -> dict:
    """A JSON-able description of exactly what `load_image` + `preprocess` do, for manifests."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return {
        "version": 1,
        "exif": "applied",
        "color": "RGB",
        "background": "white",
        "modes": {
            "transparency": "alpha-composited onto white (255, 255, 255)",
            "16-bit grey": "divided by 257 (0..65535 -> 0..255)",
            "cmyk": "Pillow conversion, no ICC profile",
        },
        "max_pixels": MAX_PIXELS,
        "resize": "bicubic",
        "resize_impl": "Pillow Image.resize(Resampling.BICUBIC) on the 8-bit RGB image",
        "crop": "none",
        "aspect": "stretched to a square",
        "size": int(size),
        "scale": 1.0 / 255.0,
        "mean": [float(v) for v in _check_triple("mean", mean)],
        "std": [float(v) for v in _check_triple("std", std)],
        "formula": "(pixel / 255 - mean) / std",
        "layout": "CHW",
        "channel_order": "RGB",
        "dtype": "float32",
        "batch_dim": False,
    }
