"""Decoding an image a user hands us (a file for `predict`, bytes for the served model) into RGB.

Both paths decode the same way, so a served prediction sees the pixels `predict` sees.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


MAX_PIXELS = 40_000_000  # as prepare.max_pixels: a small file may declare a huge image


class ImageTooLarge(ValueError):
    """The header declares more pixels than allowed; nothing was decoded."""


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 RGB; ValueError naming `name` when undecodable or
    when its header declares more than `max_pixels` (checked before decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{name}: image declares {width}x{height} pixels, more than {max_pixels}")
            return np.asarray(image.convert("RGB"))
    except ImageTooLarge:
        raise
    except Exception as err:  # PIL raises many types for unreadable data
        raise ValueError(f"{name}: unreadable image ({type(err).__name__}: {err})") from None


def read_image(path: Path) -> np.ndarray:
    """An image file -> H x W x 3 uint8 RGB; ValueError naming the file when unreadable."""
    return decode_image(Path(path).read_bytes(), str(path))
