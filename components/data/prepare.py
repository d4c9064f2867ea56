"""Turn any supported dataset into one canonical layout plus a manifest, checking every sample.

Layout: images/<split>/<id>.png (RGB), labels/<split>/<id>.png (class indices, 255 ignored),
manifest.json (splits, classes, colours, groups, ignore index, class frequencies, checksums) and
skipped.json (samples dropped under on_bad_sample=skip, each with the reason).
The directory is written under a temporary name and renamed at the end: never partial.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from components.atomic import atomic_dir
from components.data.classes import IGNORE_INDEX
from components.data.images import MAX_PIXELS, UnsupportedImage, open_image, to_rgb
from components.data.readers import DatasetReader, RawSample
from components.parallel import run_jobs
from components.safe_files import OPEN_ERRORS

FORMAT_VERSION = 1


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names the file and the problem."""


DEFAULT_MAX_PIXELS = MAX_PIXELS  # one cap for prepared datasets and for images handed to predict/serving


def _open_image(path: Path, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and decode with the safe reader (a regular file, its header's size within `max_pixels`
    before decoding); any refusal is a bad sample naming the file."""
    try:
        return open_image(path, what, max_pixels, limit_key="prepare.max_pixels")
    except (ValueError, FileNotFoundError) as err:
        raise BadSampleError(str(err)) from None


def convert_sample(sample: RawSample, lookup: np.ndarray,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Decode and check one sample; returns (RGB uint8 image, uint8 class-index label)."""
    if sample.label_path is None:
        raise BadSampleError(f"{sample.image_path}: no label file for sample {sample.sample_id!r}")
    try:
        image = to_rgb(_open_image(sample.image_path, "image", max_pixels), str(sample.image_path))
    except UnsupportedImage as err:
        raise BadSampleError(str(err)) from None
    label_image = _open_image(sample.label_path, "label", max_pixels)
    if label_image.mode not in ("L", "P", "I", "I;16"):
        raise BadSampleError(f"{sample.label_path}: label must be single-channel (L or P), got mode {label_image.mode}")
    raw = np.asarray(label_image)
    if raw.shape != image.shape[:2]:
        raise BadSampleError(
            f"{sample.label_path}: label is {raw.shape[1]}x{raw.shape[0]} but image {sample.image_path} "
            f"is {image.shape[1]}x{image.shape[0]}"
        )
    if raw.max(initial=0) > 255:
        raise BadSampleError(f"{sample.label_path}: label values up to {raw.max()} exceed 255")
    if raw.min(initial=0) < 0:  # would wrap around into real classes when cast to 8 bits
        raise BadSampleError(f"{sample.label_path}: label values down to {raw.min()} are below 0")
    mapped = lookup[raw.astype(np.uint8)]
    undefined = np.unique(raw[mapped < 0])
    if undefined.size:
        raise BadSampleError(f"{sample.label_path}: label ids {undefined.tolist()[:10]} are not in the class map")
    return image, mapped.astype(np.uint8)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _duplicates(samples: list[RawSample]) -> dict[int, str]:
    """Index -> reason, for every occurrence of a sample id after its first."""
    first: dict[str, RawSample] = {}
    problems = {}
    for i, s in enumerate(samples):
        if s.sample_id in first:
            problems[i] = f"{s.image_path}: duplicate sample id {s.sample_id!r} (also {first[s.sample_id].image_path})"
        else:
            first[s.sample_id] = s
    return problems


def _check_paths(sample: RawSample, root: Path | None, output: Path) -> None:
    """A sample's files lie inside the dataset root, and its id names a file inside the output
    folder (an id like '../x' from a dataset's own list would write outside it)."""
    if root is not None:
        for path in (sample.image_path, sample.label_path):
            try:
                resolved = path.resolve() if path is not None else None
            except (OSError, RuntimeError) as err:  # a loop of links is a RuntimeError before Python 3.13
                reason = OPEN_ERRORS.get(getattr(err, "errno", None) or errno.ELOOP, str(err))
                what = "image" if path == sample.image_path else "label"
                raise BadSampleError(f"{path}: cannot open the {what}: {reason}") from None
            if resolved is not None and not resolved.is_relative_to(root.resolve()):
                raise BadSampleError(f"{path}: sample {sample.sample_id!r} points outside the dataset root {root}")
    for name, what in ((sample.sample_id, "sample id"), (sample.split, "split")):
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise BadSampleError(f"{sample.image_path}: {what} {name!r} is not a plain file name")


def _convert_job(job: tuple) -> tuple[RawSample, str | None, dict[str, str], np.ndarray | None]:
    """Check, convert and write one sample into the staging folder `tmp`: (sample, why it was
    skipped or None, checksums of its files, its train pixel counts). Under on_bad_sample=error a
    bad sample raises here. Runs in a worker process: arguments are plain values."""
    sample, duplicate, root, output, tmp, lookup, max_pixels, num_classes, on_bad_sample = job
    try:
        if duplicate is not None:
            raise BadSampleError(duplicate)
        _check_paths(sample, root, output)
        image, label = convert_sample(sample, lookup, max_pixels)
    except BadSampleError as err:
        if on_bad_sample == "error":
            raise
        return sample, str(err), {}, None
    checksums = {}
    for kind, array in (("images", image), ("labels", label)):
        path = tmp / kind / sample.split / f"{sample.sample_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        checksums[path.relative_to(tmp).as_posix()] = _sha256(path)
    counts = None
    if sample.split == "train":
        counts = np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
    return sample, None, checksums, counts


def prepare_dataset(reader: DatasetReader, output: str | Path, on_bad_sample: str = "error",
                    progress=None, source_info: dict | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 1) -> dict:
    """Convert every sample of `reader` into the canonical layout at `output`, `workers` samples at
    once (components/parallel.py; the manifest does not depend on it); returns the manifest."""
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"prepare.on_bad_sample: expected 'error' or 'skip', got {on_bad_sample!r}")
    if not reader.samples:
        raise ValueError(f"{reader.name}: no samples found in the dataset directory")
    num_classes = len(reader.classes.names)
    duplicates = _duplicates(reader.samples)
    splits: dict[str, list[str]] = {s: [] for s in dict.fromkeys(x.split for x in reader.samples)}
    checksums, skipped = {}, []
    pixel_counts = np.zeros(num_classes, dtype=np.int64)
    with atomic_dir(output, key="prepare.output") as tmp:
        jobs = [(sample, duplicates.get(index), reader.root, Path(output), tmp, reader.lookup, max_pixels,
                 num_classes, on_bad_sample) for index, sample in enumerate(reader.samples)]
        done = run_jobs(_convert_job, jobs, workers, on_result=lambda _: progress.update(1) if progress else None)
        for sample, reason, written, counts in done:
            if reason is not None:
                skipped.append({"sample_id": sample.sample_id, "split": sample.split, "reason": reason})
                continue
            checksums.update(written)
            splits[sample.split].append(sample.sample_id)
            if counts is not None:
                pixel_counts += counts
        if "train" not in splits:
            raise ValueError(f"{reader.name}: the dataset has no train split (it has {sorted(splits)})")
        empty = [name for name, ids in splits.items() if not ids]
        if empty:
            raise ValueError(f"{reader.name}: split(s) {empty} are empty after checking samples "
                             f"({len(skipped)} skipped, see the reasons above)")
        total = max(int(pixel_counts.sum()), 1)
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": reader.name,
            "source": source_info or {},
            "ignore_index": IGNORE_INDEX,
            "classes": reader.classes.to_dict(),
            "class_frequencies": {n: float(c) / total for n, c in zip(reader.classes.names, pixel_counts, strict=True)},
            "splits": splits,
            "checksums": checksums,
            "skipped": len(skipped),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "skipped.json").write_text(json.dumps(skipped, indent=1) + "\n")
    return manifest


def manifest_hash(manifest: dict) -> str:
    """A short, stable fingerprint of a dataset manifest (for MLflow tags and lineage)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]

