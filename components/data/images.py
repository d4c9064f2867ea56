"""Decoding an image into RGB: a dataset's files in `prepare`, a file for `predict`, bytes for the
served model. All three convert the same way (to_rgb), so a prediction sees the pixels training saw.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 40_000_000  # as prepare.max_pixels: a small file may declare a huge image


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


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 RGB; ValueError naming `name` when undecodable or
    when its header declares more than `max_pixels` (checked before decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{name}: image declares {width}x{height} pixels, more than {max_pixels}")
            image.load()
            return to_rgb(image, name)
    except (ImageTooLarge, UnsupportedImage):
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for unreadable data
        raise ValueError(f"{name}: unreadable image ({type(err).__name__}: {err})") from None


def read_image(path: Path) -> np.ndarray:
    """An image file -> H x W x 3 uint8 RGB; ValueError naming the file when unreadable."""
    return decode_image(Path(path).read_bytes(), str(path))
