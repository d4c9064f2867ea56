"""Pictures like the paper's attention figure: per-scale predictions, attention maps, fused, truth."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from components.data.classes import palette
from components.data.dataset import MEAN, STD


def colorize(label: np.ndarray, colors: list) -> np.ndarray:
    return palette([tuple(c) for c in colors])[label]


def denormalize(image: torch.Tensor) -> np.ndarray:
    array = image.numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(array, 0, 255).astype(np.uint8)


def _tile(array: np.ndarray, title: str, size: tuple[int, int]) -> Image.Image:
    image = Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size[1], size[0] + 14), "white")
    canvas.paste(image, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), title, fill="black")
    return canvas


@torch.no_grad()
def attention_figure(model, item: dict, scales: list[float], colors: list) -> Image.Image:
    """Top row: input, each scale's prediction, fused prediction, ground truth.
    Bottom row: each scale's share of the fused prediction (white = all of it; the shares of all
    scales sum to 1 at every pixel), under that scale's prediction."""
    images = {s: t[None] for s, t in item["images"].items()}
    output = model(images, scales)
    shares = output.scale_weights()
    label = item["label"].numpy()
    size = label.shape
    top = [_tile(denormalize(item["images"][1.0]), "input", size)]
    bottom = [_tile(np.full((*size, 3), 255, np.uint8), "", size)]
    for s in scales:
        pred = output.logits[s].argmax(1)[0].numpy()
        top.append(_tile(colorize(pred, colors), f"pred {s:g}", size))
        if s in shares:
            share = F.interpolate(shares[s].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
            grey = (share.clamp(0, 1).numpy() * 255).astype(np.uint8)
            bottom.append(_tile(np.stack([grey] * 3, -1), f"share {s:g}", size))
        else:
            bottom.append(_tile(np.full((*size, 3), 255, np.uint8), "", size))
    top.append(_tile(colorize(output.fused.argmax(1)[0].numpy(), colors), "fused", size))
    top.append(_tile(colorize(np.where(label == 255, 255, label), colors), "ground truth", size))
    width, height = top[0].size
    figure = Image.new("RGB", (width * len(top), height * 2), "white")
    for i, tile in enumerate(top):
        figure.paste(tile, (i * width, 0))
    for i, tile in enumerate(bottom):
        figure.paste(tile, (i * width, height))
    return figure
