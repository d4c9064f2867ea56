"""Hostile file contents and names for the property tests, and a snapshot of a folder tree."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image


def encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def declaring(size: tuple[int, int]) -> bytes:
    """A valid small PNG whose header claims `size` (width, height): decoding it would be huge."""
    data = bytearray(encoded(np.zeros((4, 4, 3), np.uint8), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", *size)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


@st.composite
def image_bytes(draw, height: int = 16, width: int = 16) -> bytes:
    """An image file's bytes: valid in many modes and formats, or broken in the ways files break."""
    rgb = np.asarray(draw(st.lists(st.integers(0, 255), min_size=3, max_size=3)), np.uint8)
    array = np.broadcast_to(rgb, (height, width, 3)).copy()
    kind = draw(st.sampled_from(["png", "jpg", "mode", "wide-gray", "float", "random", "truncated", "empty",
                                 "huge", "wrong-size"]))
    if kind in ("png", "jpg"):
        return encoded(array, "PNG" if kind == "png" else "JPEG")
    if kind == "mode":
        mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGBA", "CMYK", "I"]))
        return encoded(array, "TIFF" if mode in ("CMYK", "I") or draw(st.booleans()) else "PNG", mode)
    if kind == "wide-gray":
        return encoded(np.full((height, width), draw(st.integers(0, 65535)), np.uint16), "PNG")
    if kind == "float":
        return encoded(np.full((height, width), draw(st.floats(-1e6, 1e6)), np.float32), "TIFF")
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        data = encoded(array, draw(st.sampled_from(["PNG", "JPEG"])))
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "empty":
        return b""
    if kind == "huge":
        return declaring((draw(st.integers(7000, 60000)), draw(st.integers(7000, 60000))))
    return encoded(np.zeros((height + 3, width, 3), np.uint8), "PNG")


@st.composite
def label_bytes(draw, height: int = 16, width: int = 16, classes: int = 21) -> bytes:
    """A label file's bytes: class indices (in range, out of range, negative), or broken."""
    kind = draw(st.sampled_from(["good", "range", "negative", "broken"]))
    if kind == "good":
        return encoded(np.full((height, width), draw(st.integers(0, classes - 1)), np.uint8), "PNG")
    if kind == "range":
        return encoded(np.full((height, width), draw(st.integers(classes, 254)), np.uint8), "PNG")
    if kind == "negative":
        return encoded(np.full((height, width), draw(st.integers(-1000, -1)), np.int32), "TIFF")
    return draw(image_bytes(height, width))


# Ids as a dataset's own list may give them: plain, or trying to leave the dataset or the output.
hostile_names = st.one_of(
    st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True),
    st.sampled_from(["..", ".", "../x", "../../etc/passwd", "/tmp/abs", "a/b", "a\\b", "-rf", " ", "con", "x" * 300]),
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\r\x00\t "), min_size=1, max_size=12),
)


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and folder under `root` (except `skip`) with a hash of its content."""
    state = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        state[str(path.relative_to(root))] = _fingerprint(path)
    return state


def _fingerprint(path: Path) -> str:
    """A file's content hash; what stands for it when reading it would hang or take gigabytes (a FIFO,
    a link to a device, a sparse file of 6 GB): its kind, link target or size and time."""
    info = path.lstat()
    if stat.S_ISREG(info.st_mode):
        if info.st_size <= 1 << 24:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        return f"file of {info.st_size} bytes, modified {info.st_mtime_ns}"
    if stat.S_ISLNK(info.st_mode):
        return f"link to {os.readlink(path)}"
    return "dir" if stat.S_ISDIR(info.st_mode) else f"special file {stat.S_IFMT(info.st_mode):o}"
