"""Decoding an image a user hands us (a file for `predict`, bytes for the served model) into RGB.

Both paths decode the same way, so a served prediction sees the pixels `predict` sees.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 RGB; ValueError naming `name` when undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL raises many types for unreadable data
        raise ValueError(f"{name}: unreadable image ({type(err).__name__}: {err})") from None


def read_image(path: Path) -> np.ndarray:
    """An image file -> H x W x 3 uint8 RGB; ValueError naming the file when unreadable."""
    return decode_image(Path(path).read_bytes(), str(path))
