"""Trunks, decoders, heads, scale fusion and the multi-scale wrapper."""

from components.models.build import build_model, build_segmenter
from components.models.multiscale import MultiScaleOutput, MultiScaleSegmenter
from components.models.saved import load_saved_model, save_model

__all__ = [
    "MultiScaleOutput",
    "MultiScaleSegmenter",
    "build_model",
    "build_segmenter",
    "load_saved_model",
    "save_model",
]
