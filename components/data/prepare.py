"""Turn any supported dataset into one canonical layout plus a manifest, checking every sample.

Layout: images/<split>/<id>.png (RGB), labels/<split>/<id>.png (class indices, 255 ignored),
manifest.json (splits, classes, colours, groups, ignore index, class frequencies, checksums) and
skipped.json (samples dropped under on_bad_sample=skip, each with the reason).
The directory is written under a temporary name and renamed at the end: never partial.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from components.atomic import atomic_dir
from components.data.classes import IGNORE_INDEX
from components.data.images import MAX_IMAGE_BYTES, MAX_PIXELS, UnsupportedImage, open_image_bytes, to_rgb
from components.data.readers import DatasetReader, RawSample
from components.parallel import map_in_order
from components.safe_files import OPEN_ERRORS, read_regular

FORMAT_VERSION = 1


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names the file and the problem."""


DEFAULT_MAX_PIXELS = MAX_PIXELS  # one cap for prepared datasets and for images handed to predict/serving


@dataclass(frozen=True)
class ConvertJob:
    """One sample to check and convert: what a process or a Ray task on any node needs besides the
    files' bytes (a task on another node cannot open the driver's paths)."""

    sample: RawSample
    lookup: np.ndarray
    max_pixels: int
    on_bad_sample: str
    num_classes: int
    problem: str | None = None  # why the sample is bad before its files are decoded (duplicate id, path, file)


@dataclass
class Converted:
    """A converted sample's PNG files and its train pixel counts, or why it was skipped."""

    sample: RawSample
    skipped: str | None = None
    image_png: bytes = b""
    label_png: bytes = b""
    counts: np.ndarray | None = field(default=None, repr=False)


def read_inputs(job: ConvertJob) -> tuple[bytes, bytes]:
    """The sample's image and label files, each checked to be a regular file of at most
    MAX_IMAGE_BYTES before it is read (safe_files); a refusal is a bad sample naming the file."""
    sample = job.sample
    if sample.label_path is None:
        raise BadSampleError(f"{sample.image_path}: no label file for sample {sample.sample_id!r}")
    try:
        return (read_regular(sample.image_path, "image", MAX_IMAGE_BYTES),
                read_regular(sample.label_path, "label", MAX_IMAGE_BYTES))
    except (ValueError, FileNotFoundError) as err:
        raise BadSampleError(str(err)) from None


def _open_image(data: bytes, path: Path, what: str, max_pixels: int) -> Image.Image:
    """Decode after checking the header's size against `max_pixels`; any refusal is a bad sample
    naming the file."""
    try:
        return open_image_bytes(data, str(path), what, max_pixels, limit_key="prepare.max_pixels")
    except ValueError as err:
        raise BadSampleError(str(err)) from None


def convert_sample(sample: RawSample, image_bytes: bytes, label_bytes: bytes, lookup: np.ndarray,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Decode and check one sample's files; returns (RGB uint8 image, uint8 class-index label)."""
    if sample.label_path is None:
        raise BadSampleError(f"{sample.image_path}: no label file for sample {sample.sample_id!r}")
    try:
        image = to_rgb(_open_image(image_bytes, sample.image_path, "image", max_pixels), str(sample.image_path))
    except UnsupportedImage as err:
        raise BadSampleError(str(err)) from None
    label_image = _open_image(label_bytes, sample.label_path, "label", max_pixels)
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


def _bad(job: ConvertJob, reason: str) -> Converted:
    """Under on_bad_sample=error a bad sample stops the run; under skip it is dropped, with why."""
    if job.on_bad_sample == "error":
        raise BadSampleError(reason)
    return Converted(job.sample, skipped=reason)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def convert_bytes(job: ConvertJob, image_bytes: bytes, label_bytes: bytes) -> Converted:
    """Check and convert one sample from its files' bytes: the work a process or a Ray task does."""
    if job.problem is not None:
        return _bad(job, job.problem)
    try:
        image, label = convert_sample(job.sample, image_bytes, label_bytes, job.lookup, job.max_pixels)
    except BadSampleError as err:
        return _bad(job, str(err))
    counts = None
    if job.sample.split == "train":
        counts = np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=job.num_classes)[:job.num_classes]
    return Converted(job.sample, image_png=_png(image), label_png=_png(label), counts=counts)


def convert_files(job: ConvertJob) -> Converted:
    """convert_bytes of a sample read from this machine's disk (the local processes' job)."""
    if job.problem is not None:
        return _bad(job, job.problem)
    try:
        inputs = read_inputs(job)
    except BadSampleError as err:
        return _bad(job, str(err))
    return convert_bytes(job, *inputs)


# Converts every job, yielding the results in job order (local processes, Ray tasks).
MapSamples = Callable[[list[ConvertJob]], Generator[Converted, None, None]]


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


def _problem(index: int, sample: RawSample, duplicates: dict[int, str], root: Path | None,
             output: Path) -> str | None:
    """Why a sample is bad before its files are read: a repeated id, a path outside the dataset."""
    if index in duplicates:
        return duplicates[index]
    try:
        _check_paths(sample, root, output)
    except BadSampleError as err:
        return str(err)
    return None


def _write_converted(tmp: Path, converted: Converted) -> dict[str, str]:
    """The sample's two PNG files in the staging folder; returns their checksums."""
    checksums = {}
    for kind, data in (("images", converted.image_png), ("labels", converted.label_png)):
        path = tmp / kind / converted.sample.split / f"{converted.sample.sample_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        checksums[path.relative_to(tmp).as_posix()] = hashlib.sha256(data).hexdigest()
    return checksums


def prepare_dataset(reader: DatasetReader, output: str | Path, on_bad_sample: str = "error",
                    progress=None, source_info: dict | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 1,
                    map_samples: MapSamples | None = None) -> dict:
    """Convert every sample of `reader` into the canonical layout at `output`; returns the manifest.
    Samples are converted by `map_samples` (Ray tasks on a cluster) or else by `workers` processes of
    this machine (components/parallel.py), and written here in order: the output does not depend on
    where they were converted."""
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
        jobs = [ConvertJob(sample, reader.lookup, max_pixels, on_bad_sample, num_classes,
                           _problem(index, sample, duplicates, reader.root, Path(output)))
                for index, sample in enumerate(reader.samples)]
        if map_samples is None:
            def map_samples(jobs: list[ConvertJob]) -> Generator[Converted, None, None]:
                return map_in_order(convert_files, jobs, workers)
        with contextlib.closing(map_samples(jobs)) as results:  # an error stops the conversions in flight
            for converted in results:
                sample = converted.sample
                if progress is not None:
                    progress.update(1)
                if converted.skipped is not None:
                    skipped.append({"sample_id": sample.sample_id, "split": sample.split, "reason": converted.skipped})
                    continue
                checksums.update(_write_converted(tmp, converted))
                splits[sample.split].append(sample.sample_id)
                if converted.counts is not None:
                    pixel_counts += converted.counts
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

