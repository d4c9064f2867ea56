"""Evaluation of a trained model at any scale set: IoU by class and group, cost, attention by class."""

from __future__ import annotations

import time
from collections.abc import Sized
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset

from components.metrics import ConfusionMatrix


def group_indices(classes: dict) -> dict[str, list[int]]:
    """Class indices of the 'thin_small' and 'large' groups named in a dataset manifest."""
    names = classes["names"]
    return {group: [names.index(n) for n in members if n in names] for group, members in classes["groups"].items()}


def batches(dataset: Dataset, indices: list[int], batch_size: int):
    """Items of `indices` in batches of up to `batch_size` images of one size (val images of a
    dataset may differ in size; a batch cannot)."""
    pending: dict[tuple, list[dict]] = {}
    for index in indices:
        item = dataset[index]
        shape = tuple(item["label"].shape)
        group = pending.setdefault(shape, [])
        group.append(item)
        if len(group) == batch_size:
            yield pending.pop(shape)
    yield from pending.values()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_scale_passes(model, inputs: dict[float, torch.Tensor], scale_sets: list[list[float]],
                       device: torch.device) -> tuple[dict, dict[float, float]]:
    """The segmenter's output at each distinct scale of `scale_sets`, run once, and each pass's
    seconds (waiting for the device): a set's cost is its own scales' passes and its fusion."""
    outputs, seconds = {}, {}
    start = time.perf_counter()
    for scale, output in model.scale_passes(inputs, scale_sets):
        _synchronize(device)
        outputs[scale], seconds[scale] = output, time.perf_counter() - start
        start = time.perf_counter()
    return outputs, seconds


@torch.no_grad()
def evaluate_shard(model, dataset: Dataset, indices: list[int], scale_sets: list[list[float]], num_classes: int,
                   flip: bool = False, batch_size: int = 4, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", attention_set: int | None = None) -> list[dict]:
    """Confusion matrix, summed forward seconds and image count of `model` at each scale set, over
    the images `indices` of `dataset`; for scale_sets[attention_set], also the attention sums by
    class of that same forward pass. Shards of one split merge by summing (merge_shards).

    Each image is read once and run once at each distinct scale of all the sets, whose fusions
    share those passes (MultiScaleSegmenter.forward_sets); a set's seconds are its own scales'
    passes and its fusion, what evaluating it alone would take."""
    device = torch.device(device)
    model.eval()
    sets = [model.check_scales(scales) for scales in scale_sets]
    matrices = [ConfusionMatrix(num_classes) for _ in sets]
    per_image: list[list[np.ndarray]] = [[] for _ in sets]
    seconds, images = [0.0] * len(sets), 0
    attention = AttentionSums(scale_sets[attention_set], num_classes) if attention_set is not None else None
    for batch in batches(dataset, indices, batch_size):
        inputs = {s: torch.stack([item["images"][s] for item in batch]).to(device) for s in batch[0]["images"]}
        predictions, attention_output = [], None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            passes, pass_seconds = timed_scale_passes(model, inputs, sets, device)
            if flip:
                flipped_inputs = {s: torch.flip(t, dims=[-1]) for s, t in inputs.items()}
                flipped, flipped_seconds = timed_scale_passes(model, flipped_inputs, sets, device)
                pass_seconds = {s: t + flipped_seconds[s] for s, t in pass_seconds.items()}
            for position, scales in enumerate(sets):
                start = time.perf_counter()
                output = model.fuse(passes, scales)
                logits = output.fused
                if flip:
                    logits = logits + torch.flip(model.fuse(flipped, scales).fused, dims=[-1])
                predictions.append(logits.argmax(1).cpu())  # the copy to the host waits for the device
                seconds[position] += time.perf_counter() - start + sum(pass_seconds[s] for s in scales)
                if position == attention_set:
                    attention_output = output
        labels = [item["label"] for item in batch]
        for position, set_predictions in enumerate(predictions):
            for label, prediction in zip(labels, set_predictions, strict=True):
                one = ConfusionMatrix(num_classes)
                one.update(prediction, label)
                per_image[position].append(one.matrix.numpy())
                matrices[position].matrix += one.matrix
        if attention is not None and attention_output is not None:
            attention.add(attention_output.scale_weights(), labels)
        images += len(batch)
    results = []
    for position, scales in enumerate(scale_sets):
        # Per image too: the ablation's bootstrap over val images resamples them.
        result = {"scales": list(scales), "matrix": matrices[position].matrix.numpy(), "seconds": seconds[position],
                  "images": images, "image_matrices": np.stack(per_image[position]) if per_image[position]
                  else np.zeros((0, num_classes, num_classes), np.int64)}
        if attention is not None and position == attention_set:
            result["attention_sums"], result["attention_counts"] = attention.sums, attention.counts
        results.append(result)
    return results


# Attention by region: a pixel is inside its region when every pixel within this fraction of the
# image's shorter side (8 px on the bundled 192x384 images) has its class, else on a boundary. The
# paper's observation is about both: low scales for the inside of large regions, high scales for
# fine structures and edges.
BOUNDARY_BAND = 1 / 24
REGIONS = ("all", "interior", "boundary")


def interior_mask(label: torch.Tensor) -> torch.Tensor:
    """True where the square of side 2 * band + 1 around a pixel holds only that pixel's label
    (ignored pixels count as another label; the image's border does not)."""
    band = max(1, round(min(label.shape) * BOUNDARY_BAND))
    values = label[None, None].float()
    highest = torch.nn.functional.max_pool2d(values, 2 * band + 1, stride=1, padding=band)
    lowest = -torch.nn.functional.max_pool2d(-values, 2 * band + 1, stride=1, padding=band)
    return ((highest == values) & (lowest == values))[0, 0]


class AttentionSums:
    """Per region (all pixels, region interiors, boundaries) and scale, the sum over the
    ground-truth pixels of each class of that scale's share of the fused prediction
    (MultiScaleOutput.scale_weights: shares sum to 1 over the scales at a pixel)."""

    def __init__(self, scales: list[float], num_classes: int):
        self.num_classes = num_classes
        self.sums = {region: {s: np.zeros(num_classes) for s in scales} for region in REGIONS}
        self.counts = {region: np.zeros(num_classes) for region in REGIONS}

    def add(self, attention: dict[float, torch.Tensor], labels: list[torch.Tensor]) -> None:
        for i, label in enumerate(labels):
            valid = (label < self.num_classes).numpy()
            interior = interior_mask(label).numpy()
            masks = {"all": valid, "interior": valid & interior, "boundary": valid & ~interior}
            label_array = label.numpy()
            shares = {s: torch.nn.functional.interpolate(maps[i:i + 1].float(), size=label_array.shape, mode="bilinear",
                                                         align_corners=False)[0, 0].cpu().numpy()
                      for s, maps in attention.items()}
            for region, mask in masks.items():
                classes = label_array[mask]
                self.counts[region] += np.bincount(classes, minlength=self.num_classes)[:self.num_classes]
                for s, share in shares.items():
                    self.sums[region][s] += np.bincount(classes, weights=share[mask],
                                                        minlength=self.num_classes)[:self.num_classes]


def merge_shards(shards: list[list[dict]]) -> list[dict]:
    """Sum the per-scale-set results of shards (each a list in the same scale-set order); the
    per-image matrices are concatenated in shard order (the image order for contiguous shards)."""
    merged = []
    for parts in zip(*shards, strict=True):
        total = {"scales": parts[0]["scales"], "matrix": sum(p["matrix"] for p in parts),
                 "seconds": sum(p["seconds"] for p in parts), "images": sum(p["images"] for p in parts),
                 "image_matrices": np.concatenate([p["image_matrices"] for p in parts])}
        if "attention_sums" in parts[0]:
            total["attention_sums"] = {region: {s: sum(p["attention_sums"][region][s] for p in parts) for s in sums}
                                       for region, sums in parts[0]["attention_sums"].items()}
            total["attention_counts"] = {region: sum(p["attention_counts"][region] for p in parts)
                                         for region in parts[0]["attention_counts"]}
        merged.append(total)
    return merged


def attention_means(result: dict) -> dict[str, dict[float, np.ndarray]] | None:
    """Per region (REGIONS), the mean share of each scale in the fused prediction over each class's
    pixels (NaN where a class has none), from a merged result: per class the shares of all scales
    sum to 1."""
    if "attention_sums" not in result:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        return {region: {s: np.where(counts > 0, sums / counts, np.nan)
                         for s, sums in result["attention_sums"][region].items()}
                for region, counts in result["attention_counts"].items()}


def summarize(result: dict, classes: dict) -> dict:
    """The metrics of one merged scale-set result: mIoU, per-class IoU, group mIoU, latency."""
    names = classes["names"]
    matrix = ConfusionMatrix(len(names))
    matrix.matrix = torch.as_tensor(result["matrix"], dtype=torch.int64)
    iou = matrix.iou()
    groups = group_indices(classes)
    return {
        "scales": result["scales"],
        "miou": matrix.miou(),
        "thin_miou": matrix.miou(groups.get("thin_small", [])) if groups.get("thin_small") else float("nan"),
        "large_miou": matrix.miou(groups.get("large", [])) if groups.get("large") else float("nan"),
        "pixel_accuracy": matrix.pixel_accuracy(),
        "latency_ms": 1000 * result["seconds"] / max(result["images"], 1),
        "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou.tolist(), strict=True)},
    }


def evaluate_scale_set(model, dataset: Dataset, scales: list[float], classes: dict, flip: bool = False,
                       batch_size: int = 1) -> dict:
    """mIoU, per-class IoU, group mIoU and mean latency per image of `model` at `scales`, in this process."""
    (result,) = evaluate_shard(model, dataset, list(range(len(cast(Sized, dataset)))), [scales], len(classes["names"]),
                               flip=flip, batch_size=batch_size)
    return summarize(result, classes)


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
