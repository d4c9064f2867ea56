"""Torch datasets over a scale pyramid.

Training samples are taken from the pyramid, not resized on the fly: a random pyramid level r plays
the role of scale 1.0 (random scale augmentation), a crop is cut from it, and for every training
scale s the matching region is cut from level r*s. Crop position, flip and colour jitter are the
same for all levels of one sample, so the levels stay aligned.
"""

from __future__ import annotations

import math

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from components.config import LoaderConfig
from components.data.pyramid import PyramidReader, image_levels
from components.scales import crop_grid_step

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


# Batches prepared ahead, over all of a GPU worker's loader processes: a few slow samples (a large
# random scale, a slow read) are absorbed without the GPU waiting.
GPU_BATCHES_AHEAD = 8


def loader_settings(cfg: LoaderConfig, cpus: float, device_type: str = "cpu") -> dict:
    """DataLoader arguments sized from the CPUs a training worker has. `loader.workers: auto`: on
    CPU one process fewer than those CPUs, at most 4 (the training threads need the rest); on a
    GPU all but one (the GPU computes; the worker's own process launches its kernels), each keeping
    enough batches ahead that together they hold GPU_BATCHES_AHEAD, and batches in pinned memory."""
    gpu = device_type == "cuda"
    automatic = max(0, int(cpus) - 1) if gpu else max(0, min(4, int(cpus) - 1))
    workers = automatic if cfg.workers == "auto" else cfg.workers
    settings = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": gpu}
    if gpu and workers > 0:
        settings["prefetch_factor"] = max(2, math.ceil(GPU_BATCHES_AHEAD / workers))
    return settings


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float, normalised with the ImageNet statistics the trunks expect."""
    return torch.from_numpy(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())


def photometric_pipeline(cfg: LoaderConfig, level_keys: list[str]) -> A.Compose:
    """Colour jitter applied with identical parameters to every pyramid level of a sample."""
    return A.Compose(
        [A.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.photometric_probability)],
        additional_targets=dict.fromkeys(level_keys, "image"),
        strict=True,
        is_check_shapes=False,
    )


def _pad(array: np.ndarray, height: int, width: int, value: int) -> np.ndarray:
    pad_h, pad_w = max(0, height - array.shape[0]), max(0, width - array.shape[1])
    if not (pad_h or pad_w):
        return array
    widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2)
    return np.pad(array, widths, constant_values=value)


def class_uniform_order(entries: list[dict], num_classes: int, share: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices for one epoch and the class each sample is drawn for. A `share` of the slots
    picks a class uniformly among those present, then an image that contains it, and its crop is
    later placed on a pixel of that class (as the reference code's class-uniform sampling: a rare
    class is seen as often as a common one, and inside the crop); the other slots walk a
    permutation of the split with no class (-1)."""
    n = len(entries)
    order, targets = np.arange(n), np.full(n, -1)
    if share <= 0:
        return order, targets
    holders = {c: [i for i, e in enumerate(entries) if c in e["classes"]] for c in range(num_classes)}
    present = [c for c, images in holders.items() if images]
    order = rng.permutation(n)
    for slot in np.flatnonzero(rng.random(n) < share):
        target = present[int(rng.integers(len(present)))]
        order[slot] = holders[target][int(rng.integers(len(holders[target])))]
        targets[slot] = target
    return order, targets


def _grid_origin(extent: int, crop: int, step: int, rng: np.random.Generator, point: int | None) -> int:
    """A crop origin on multiples of `step`, at random; with `point`, one whose crop contains it
    (an origin at k*step contains p when p - crop < k*step <= p)."""
    last = max(0, extent - crop) // step
    low, high = 0, last
    if point is not None:
        low = min(last, max(0, -(-(point - crop + 1) // step)))
        high = max(low, min(last, point // step))
    return int(rng.integers(low, high + 1)) * step


def crop_windows(base_shape: tuple[int, ...], crop_size: tuple[int, int], train_scales: list[float],
                 rng: np.random.Generator, around: tuple[int, int] | None = None
                 ) -> dict[float, tuple[int, int, int, int]]:
    """A random crop of `crop_size` in the base level (the one playing 1.0) and the same region at
    every training scale: {scale: (top, left, height, width)} in that level's pixels. The origin lies
    on the grid of crop_grid_step(train_scales), so every level's window is exact, never rounded
    (a crop size that is a multiple of the step is required by the config). `around` (y, x): a
    base-level pixel the crop must contain (class-uniform sampling)."""
    step = crop_grid_step(train_scales)
    crop_h, crop_w = crop_size
    top = _grid_origin(base_shape[0], crop_h, step, rng, None if around is None else around[0])
    left = _grid_origin(base_shape[1], crop_w, step, rng, None if around is None else around[1])
    # Whole numbers by construction; round() only removes float error (0.7 * 30 = 20.999...).
    return {s: (round(top * s), round(left * s), max(1, round(crop_h * s)), max(1, round(crop_w * s)))
            for s in train_scales}


def point_of_class(reader: PyramidReader, split: str, sample: int, target: int, scale: float,
                   rng: np.random.Generator) -> tuple[int, int] | None:
    """A pixel (y, x) of class `target` in the sample's level `scale`, drawn among the pixels the
    pyramid remembered for it at build time (no label is read); None for no target (-1)."""
    if target < 0:
        return None
    points = reader.points(split, sample, target)
    if not points:
        return None
    y, x = points[int(rng.integers(len(points)))]
    height, width = reader.size(split, sample, scale)
    return min(height - 1, int(y * scale)), min(width - 1, int(x * scale))


class PyramidTrainDataset(Dataset):
    """Yields {"images": {scale: 3xhxw}, "label": HxW int64} with crops aligned across scales."""

    def __init__(self, reader: PyramidReader, split: str, train_scales: list[float], crop_size: tuple[int, int],
                 cfg: LoaderConfig, seed: int = 0):
        self.reader, self.split = reader, split
        self.entries = reader.entries(split)
        if not self.entries:
            raise ValueError(f"split {split!r} of the pyramid at {reader.root} is empty")
        self.train_scales = sorted(train_scales)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cfg, self.seed, self.epoch = cfg, seed, 0
        self.photometric = photometric_pipeline(cfg, [f"level{i}" for i in range(len(self.train_scales))])
        # Until set_epoch: every image once, in order, none drawn for a class.
        self.order, self.targets = np.arange(len(self.entries)), np.full(len(self.entries), -1)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the epoch's sample order (class-uniform sampling) deterministically from the seed."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.order, self.targets = class_uniform_order(self.entries, self.reader.num_classes,
                                                       self.cfg.class_uniform, rng)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample, target = int(self.order[index]), int(self.targets[index])
        if self.cfg.random_scale_range is not None:
            crops, label = self._crops_at_any_scale(sample, target, rng)
        else:
            crops, label = self._crops_from_levels(sample, target, rng)
        if self.cfg.flip and rng.random() < 0.5:
            crops = {s: image[:, ::-1] for s, image in crops.items()}
            label = label[:, ::-1]
        images = {s: np.ascontiguousarray(image) for s, image in crops.items()}
        keys = [f"level{i}" for i in range(len(self.train_scales))]
        # The jitter draws from the sample's own seed too: albumentations would otherwise seed itself
        # from the OS once per process, and the same train.seed would train on other colours each run.
        self.photometric.set_random_seed(int(rng.integers(2**32)))
        others = {k: images[s] for k, s in zip(keys, self.train_scales, strict=True)}
        jittered = self.photometric(image=images[1.0], **others)
        return {
            "images": {s: to_tensor(jittered[k]) for k, s in zip(keys, self.train_scales, strict=True)},
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
        }

    def _crops_from_levels(self, sample: int, target: int, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
        """Random scale r from loader.random_scales: every crop is the window of level r * s it covers,
        read from the pyramid (only the tiles under it)."""
        r = float(rng.choice(self.cfg.random_scales))
        base_shape = self.reader.size(self.split, sample, r)
        around = point_of_class(self.reader, self.split, sample, target, r, rng)
        windows = crop_windows(base_shape, self.crop_size, self.train_scales, rng, around=around)
        crops, label = {}, None
        for s in self.train_scales:
            y, x, h, w = windows[s]
            image, lab = self.reader.read_window(self.split, sample, round(r * s, 6), (y, x, h, w))
            crops[s] = _pad(image, h, w, 0)
            if s == 1.0:
                label = _pad(lab, h, w, 255)
        assert label is not None  # 1.0 is always a training scale
        return crops, label

    def _crops_at_any_scale(self, sample: int, target: int, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
        """Random scale r drawn from loader.random_scale_range (the paper's 0.5 to 2.0): the crop at r
        is resized from the region under it in the nearest stored level at or above r (area down, no
        detail made up; 1.0 upsampled above it), and the other training scales are resizes of that
        crop with the pyramid's own resize (image_levels), so every level shows exactly its region."""
        assert self.cfg.random_scale_range is not None  # this path is taken only when it is set
        low, high = self.cfg.random_scale_range
        r = float(rng.uniform(low, high))
        above = [s for s in self.reader.stored if s >= r - 1e-9]
        source = min(above) if above else 1.0
        shape = self.reader.size(self.split, sample, r)
        around = point_of_class(self.reader, self.split, sample, target, r, rng)
        y, x, h, w = crop_windows(shape, self.crop_size, [1.0], rng, around=around)[1.0]
        window = (y, x, max(0, min(h, shape[0] - y)), max(0, min(w, shape[1] - x)))
        image, lab = self.reader.read_resized(self.split, sample, source, shape, window)
        return image_levels(_pad(image, h, w, 0), self.train_scales), _pad(lab, h, w, 255)


class PyramidEvalDataset(Dataset):
    """Whole images of a split at every scale of `scales` (and 1.0), all made from the 1.0 level with
    the pyramid's own resize (image_levels): the pixels a pyramid level has, and what `predict` and the
    served model give the model. Yields {"images": {scale: 3xHxW}, "label": HxW int64 at 1.0,
    "index": int}."""

    def __init__(self, reader: PyramidReader, split: str, scales: list[float]):
        self.reader, self.split = reader, split
        self.entries = reader.entries(split)
        if not self.entries:
            raise ValueError(f"split {split!r} of the pyramid at {reader.root} is empty")
        self.scales = sorted({1.0, *scales})

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        image, label = self.reader.read(self.split, index, [1.0])[1.0]
        images = image_levels(image, self.scales)
        return {
            "images": {s: to_tensor(images[s]) for s in self.scales},
            "label": torch.from_numpy(label.astype(np.int64)),
            "index": index,
        }
