"""Decoding an image into RGB: a dataset's files in `prepare`, a file for `predict`, bytes for the
served model. All three convert the same way (to_rgb), so a prediction sees the pixels training saw.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from components.safe_files import open_regular

MAX_PIXELS = 40_000_000  # as prepare.max_pixels: a small file may declare a huge image
MAX_IMAGE_BYTES = 1 << 30  # an encoded image of MAX_PIXELS is far smaller; a larger file is not an image


class ImageTooLarge(ValueError):
    """The header declares more pixels than allowed; nothing was decoded."""


class UnsupportedImage(ValueError):
    """An image mode without a faithful conversion to 8-bit RGB."""


# Image modes PIL converts to RGB faithfully; 16- and 32-bit grayscale are scaled to 8 bits here.
RGB_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"}
WIDE_GRAY = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": None}


def to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """H x W x 3 uint8, converted faithfully: 16/32-bit grayscale is scaled to 0..255 (PIL's own
    conversion clips it to two values); modes without a faithful conversion are refused."""
    if image.mode in WIDE_GRAY:
        values = np.asarray(image).astype(np.float64)
        top = WIDE_GRAY[image.mode] or max(float(values.max(initial=0)), 1.0)
        if values.min(initial=0) < 0:
            raise UnsupportedImage(f"{name}: image mode {image.mode} with negative values")
        gray = np.clip(np.round(values * 255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode not in RGB_CONVERTIBLE:
        raise UnsupportedImage(f"{name}: image mode {image.mode} is not supported (use 8-bit RGB or grayscale)")
    return np.asarray(image.convert("RGB"))


def _decode(source, name: str, what: str, max_pixels: int, limit_key: str | None) -> Image.Image:
    """Decode after reading only the header's size: a small file may declare a huge image."""
    try:
        image = Image.open(source)
        width, height = image.size
        if width * height > max_pixels:
            limit = f"{limit_key} = {max_pixels}" if limit_key else str(max_pixels)
            raise ImageTooLarge(f"{name}: {what} declares {width}x{height} pixels, more than {limit}")
        image.load()
        return image
    except ImageTooLarge:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for unreadable data
        raise ValueError(f"{name}: unreadable {what} ({type(err).__name__}: {err})") from None


def open_image(path: str | Path, what: str = "image", max_pixels: int = MAX_PIXELS,
               limit_key: str | None = None) -> Image.Image:
    """A user's image file, decoded: a regular file within MAX_IMAGE_BYTES (safe_files), whose
    header declares at most `max_pixels` (`limit_key` names the setting that sets it)."""
    with open_regular(path, what, MAX_IMAGE_BYTES) as handle:
        return _decode(handle, str(path), what, max_pixels, limit_key)


def open_image_bytes(data: bytes, name: str, what: str = "image", max_pixels: int = MAX_PIXELS,
                     limit_key: str | None = None) -> Image.Image:
    """open_image of a file's bytes already read (safe_files.read_regular): `name` is the file's."""
    return _decode(io.BytesIO(data), name, what, max_pixels, limit_key)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header alone, with open_regular's checks: `predict` checks every
    input this way before it decodes any, one at a time."""
    with open_regular(path, "image", MAX_IMAGE_BYTES) as handle:
        return _declared(handle, str(path))


def _declared(source, name: str) -> tuple[int, int]:
    try:
        with Image.open(source) as image:
            return image.size
    except Exception as err:  # noqa: BLE001 - PIL raises many types for unreadable data
        raise ValueError(f"{name}: unreadable image ({type(err).__name__}: {err})") from None


def declared_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) that encoded image bytes declare, from the header alone."""
    return _declared(io.BytesIO(data), name)


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 RGB; ValueError naming `name` when undecodable or
    when its header declares more than `max_pixels` (checked before decoding)."""
    return to_rgb(_decode(io.BytesIO(data), name, "image", max_pixels, None), name)


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file -> H x W x 3 uint8 RGB; ValueError naming the file when unreadable."""
    return to_rgb(open_image(path, "image", max_pixels), str(path))
