"""Helpers shared by the data and model code for naming and sizing scale levels."""

from __future__ import annotations

import math
from fractions import Fraction


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) of an image of `size` at `scale`: rounded, at least one pixel."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def scale_key(scale: float) -> str:
    """A stable text key for a scale: 0.5 -> '0.5', 1.0 -> '1', 2.0 -> '2'."""
    return f"{float(scale):g}"


def scale_set_key(scales: list[float], separator: str = ",") -> str:
    """A stable text key for a scale set: [0.5, 1.0, 2.0] -> '0.5,1,2'. The evaluate stage keys its
    metrics.json by it and the register stage looks them up by it, so both use this one function."""
    return separator.join(scale_key(s) for s in scales)


def crop_grid_step(scales: list[float]) -> int:
    """The smallest whole number of pixels k such that k * s is whole for every scale s: crop origins
    (and crop sizes) on multiples of k map to whole pixels at every scale level, so the levels of a
    training crop show exactly the same region. [0.5, 1] -> 2, [0.75, 1] -> 4, [0.375, 1] -> 8."""
    step = 1
    for scale in scales:
        fraction = Fraction(scale).limit_denominator(64)
        if abs(float(fraction) - scale) > 1e-9:
            raise ValueError(f"scale {scale} is not a ratio of small whole numbers; crops at it cannot align "
                             "with the other levels (use e.g. 0.25, 0.375, 0.5, 0.75, 1.5)")
        step = math.lcm(step, fraction.denominator)
    return step
