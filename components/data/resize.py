"""The one resize of the project, computable for any window of its output.

A level of a scale pyramid is `resize_image(image, size)`: area averaging below 1.0 (each output pixel
averages the source pixels it covers, no aliasing), bilinear above; labels take the nearest source
pixel. Each output pixel is a function of its own coordinates only (fixed-point weights computed
from the absolute index), so any window of a level can be made from the source region under it and
equals the same window of the whole resized level, bit for bit. That is what lets the pyramid store
only some levels and the loader read only the region a crop covers.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

WEIGHT_BITS = 11  # each 1-D pass weighs its taps in 1/2048: two passes stay within int32
ONE = 1 << WEIGHT_BITS


def _taps(source: int, target: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights ([count, k] each, weights summing to ONE per row) of
    output pixels start .. start+count-1 of a 1-D resize from `source` to `target` pixels."""
    index = np.arange(start, start + count, dtype=np.float64)
    ratio = source / target
    columns: np.ndarray  # source index of each tap, [count, taps]
    if target < source:  # area: output pixel i covers source [i*ratio, (i+1)*ratio)
        low, high = index * ratio, (index + 1) * ratio
        columns = np.floor(low)[:, None] + np.arange(math.ceil(ratio) + 1)[None, :]
        overlap = np.minimum(high[:, None], columns + 1) - np.maximum(low[:, None], columns)
        weights = np.clip(overlap, 0, None) / ratio
    elif target > source:  # bilinear, pixel centres aligned (as cv2 and torch with align_corners=False)
        position = np.clip((index + 0.5) * ratio - 0.5, 0, None)
        fraction = position - np.floor(position)
        columns = np.floor(position)[:, None] + np.arange(2)[None, :]
        weights = np.stack([1 - fraction, fraction], axis=1)
    else:
        columns, weights = index[:, None], np.ones((count, 1))
    fixed = np.round(weights * ONE).astype(np.int32)
    rows = np.arange(count)
    fixed[rows, fixed.argmax(axis=1)] += ONE - fixed.sum(axis=1)  # rounding must not change the sum
    columns = np.minimum(columns.astype(np.int64), source - 1)
    # A tap of weight 0 reads nothing, but its index must lie in the region read: the row's main tap.
    main = columns[rows, fixed.argmax(axis=1)]
    return np.where(fixed > 0, columns, main[:, None]), fixed


def _nearest(source: int, target: int, start: int, count: int) -> np.ndarray:
    """The source index of each output pixel for labels: the pixel under the output pixel's centre."""
    index = np.arange(start, start + count, dtype=np.float64)
    return np.minimum(np.floor((index + 0.5) * (source / target)).astype(np.int64), source - 1)


def source_window(source_shape: tuple[int, int], target_shape: tuple[int, int],
                  window: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the source region that `window` of the resized image reads,
    labels' nearest pixels included."""
    spans = []
    for axis, (start, count) in enumerate(((window[0], window[2]), (window[1], window[3]))):
        columns, weights = _taps(source_shape[axis], target_shape[axis], start, count)
        used = columns[weights > 0]
        nearest = _nearest(source_shape[axis], target_shape[axis], start, count)
        low, high = min(used.min(), nearest.min()), max(used.max(), nearest.max())
        spans.append((int(low), int(high) + 1))
    (top, bottom), (left, right) = spans
    return top, left, bottom - top, right - left


def _check_covers(region_shape: tuple[int, ...], origin: tuple[int, int], needed: tuple[int, int, int, int]) -> None:
    top, left, height, width = needed
    if (top < origin[0] or left < origin[1] or top + height > origin[0] + region_shape[0]
            or left + width > origin[1] + region_shape[1]):
        raise ValueError(f"the source region at {origin} of size {region_shape[:2]} does not cover {needed}")


def resize_window(region: np.ndarray, origin: tuple[int, int], source_shape: tuple[int, int],
                  target_shape: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """`window` (top, left, height, width) of resize_image(source, target_shape), made from `region`,
    the part of the source (H x W x C uint8) whose top-left pixel is at `origin`."""
    _check_covers(region.shape, origin, source_window(source_shape, target_shape, window))
    top, left, height, width = window
    if target_shape[0] > source_shape[0] and target_shape[1] > source_shape[1]:
        return _bilinear_window(region, origin, source_shape, target_shape, window)
    rows, row_weights = _taps(source_shape[0], target_shape[0], top, height)
    cols, col_weights = _taps(source_shape[1], target_shape[1], left, width)
    rows, cols = rows - origin[0], cols - origin[1]
    pixels = region.astype(np.int32)
    shape = (-1,) + (1,) * (region.ndim - 1)
    between = sum(pixels[rows[:, k]] * row_weights[:, k].reshape(shape) for k in range(rows.shape[1]))
    shape = (1, -1) + (1,) * (region.ndim - 2)
    assert isinstance(between, np.ndarray)  # at least one tap
    total = sum(between[:, cols[:, k]] * col_weights[:, k].reshape(shape) for k in range(cols.shape[1]))
    assert isinstance(total, np.ndarray)
    return ((total + (1 << (2 * WEIGHT_BITS - 1))) >> (2 * WEIGHT_BITS)).astype(np.uint8)


REMAP_BITS = 5  # cv2.remap's fixed-point table: fractions in 1/32


def _remap_axis(source: int, target: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer source index and fraction (in 1/32) of output pixels start .. start+count-1 of a
    bilinear 1-D resize, pixel centres aligned, clamped at the border."""
    index = np.arange(start, start + count, dtype=np.float64)
    position = np.clip((index + 0.5) * (source / target) - 0.5, 0, source - 1)
    steps = np.round(position * (1 << REMAP_BITS)).astype(np.int64)
    return steps >> REMAP_BITS, steps & ((1 << REMAP_BITS) - 1)


def _bilinear_window(region: np.ndarray, origin: tuple[int, int], source_shape: tuple[int, int],
                     target_shape: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """Upsampling through cv2.remap with integer maps built here: each output pixel's source position
    is a function of its absolute index, so a window equals the same window of the whole image (the
    region's replicated border is read only with weight 0 or where it is the image's own border)."""
    top, left, height, width = window
    rows, row_fraction = _remap_axis(source_shape[0], target_shape[0], top, height)
    cols, col_fraction = _remap_axis(source_shape[1], target_shape[1], left, width)
    grid = np.empty((height, width, 2), np.int16)
    grid[..., 0] = (cols - origin[1])[None, :]
    grid[..., 1] = (rows - origin[0])[:, None]
    table = ((row_fraction[:, None] << REMAP_BITS) + col_fraction[None, :]).astype(np.uint16)
    return cv2.remap(np.ascontiguousarray(region), grid, table, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def label_window(region: np.ndarray, origin: tuple[int, int], source_shape: tuple[int, int],
                 target_shape: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """`window` of resize_label(source, target_shape), made from the source `region` at `origin`."""
    top, left, height, width = window
    rows = _nearest(source_shape[0], target_shape[0], top, height) - origin[0]
    cols = _nearest(source_shape[1], target_shape[1], left, width) - origin[1]
    if rows.min() < 0 or cols.min() < 0 or rows.max() >= region.shape[0] or cols.max() >= region.shape[1]:
        raise ValueError(f"the label region at {origin} of size {region.shape[:2]} does not cover {window}")
    return region[np.ix_(rows, cols)]


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image (H x W x C uint8) at (height, width): area averaging down, bilinear up."""
    if tuple(size) == image.shape[:2]:
        return image
    return resize_window(image, (0, 0), image.shape[:2], size, (0, 0, size[0], size[1]))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The label map at (height, width): the class under each output pixel's centre."""
    if tuple(size) == label.shape[:2]:
        return label
    return label_window(label, (0, 0), label.shape[:2], size, (0, 0, size[0], size[1]))
