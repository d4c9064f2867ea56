"""Evaluation of a trained model at any scale set: IoU by class and group, cost, attention by class."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import Dataset

from components.metrics import ConfusionMatrix


def group_indices(classes: dict) -> dict[str, list[int]]:
    """Class indices of the 'thin_small' and 'large' groups named in a dataset manifest."""
    names = classes["names"]
    return {group: [names.index(n) for n in members if n in names] for group, members in classes["groups"].items()}


@torch.no_grad()
def evaluate_scale_set(model, dataset: Dataset, scales: list[float], classes: dict, flip: bool = False,
                       progress=None) -> dict:
    """mIoU, per-class IoU, group mIoU and mean latency per image of `model` at `scales`."""
    model.eval()
    names = classes["names"]
    matrix = ConfusionMatrix(len(names))
    seconds = 0.0
    for index in range(len(dataset)):
        item = dataset[index]
        images = {s: t[None] for s, t in item["images"].items()}
        start = time.perf_counter()
        logits = model(images, scales).fused
        if flip:
            flipped = {s: torch.flip(t, dims=[-1]) for s, t in images.items()}
            logits = logits + torch.flip(model(flipped, scales).fused, dims=[-1])
        prediction = logits.argmax(1)[0]
        seconds += time.perf_counter() - start
        matrix.update(prediction, item["label"])
        if progress is not None:
            progress.update(1)
    iou = matrix.iou()
    groups = group_indices(classes)
    return {
        "scales": scales,
        "miou": matrix.miou(),
        "thin_miou": matrix.miou(groups.get("thin_small", [])) if groups.get("thin_small") else float("nan"),
        "large_miou": matrix.miou(groups.get("large", [])) if groups.get("large") else float("nan"),
        "pixel_accuracy": matrix.pixel_accuracy(),
        "latency_ms": 1000 * seconds / max(len(dataset), 1),
        "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou.tolist())},
    }


@torch.no_grad()
def attention_by_class(model, dataset: Dataset, scales: list[float], num_classes: int) -> dict[float, np.ndarray]:
    """Mean attention of each scale over the ground-truth pixels of each class (NaN where absent).

    Each scale's attention map is resized to the label grid; for hierarchical attention a high
    value at scale s means 'trust scale s here'.
    """
    model.eval()
    sums = {s: np.zeros(num_classes) for s in scales}
    counts = np.zeros(num_classes)
    for index in range(len(dataset)):
        item = dataset[index]
        output = model({s: t[None] for s, t in item["images"].items()}, scales)
        label = item["label"].numpy()
        valid = label < num_classes
        counts += np.bincount(label[valid], minlength=num_classes)[:num_classes]
        for s, attention in output.attention.items():
            att = torch.nn.functional.interpolate(attention, size=label.shape, mode="bilinear",
                                                  align_corners=False)[0, 0].numpy()
            sums[s] += np.bincount(label[valid], weights=att[valid], minlength=num_classes)[:num_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {s: np.where(counts > 0, sums[s] / counts, np.nan) for s in scales}


def pareto_front(rows: list[dict], cost: str = "gflops", value: str = "miou") -> list[bool]:
    """Which rows no other row beats (lower or equal cost with higher value, or lower cost with equal)."""
    flags = []
    for row in rows:
        dominated = any(
            (o[cost] <= row[cost] and o[value] > row[value]) or (o[cost] < row[cost] and o[value] >= row[value])
            for o in rows if o is not row
        )
        flags.append(not dominated)
    return flags
