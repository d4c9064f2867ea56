"""Helpers shared by the data and model code for naming and sizing scale levels."""

from __future__ import annotations


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
