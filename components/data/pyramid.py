"""Scale pyramids stored for real sizes: tiled, compressed levels that a crop reads a few tiles of.

Every level s of a sample is `resize_image(image at 1.0, size at s)` (components/data/resize.py:
area below 1.0, bilinear above, labels by nearest pixel). The pyramid stores only 1.0 and the
halvings (0.5, 0.25, ...) among `pyramid.scales`; every other configured level (0.75, 1.5, 2.0) is
made on read from the 1.0 region under the requested window, which gives exactly the pixels the
whole level would have (resize.py computes any window of a level from its source region alone).
Levels above 1.0 thus cost no storage, and the stored ones about a third more than 1.0 alone.

Layout of format 2:
  manifest.json            scales, stored scales, tile size, classes, and per split the samples
                           (id, shard, position in the shard, 1.0 size, classes present)
  <split>-<shard>.bin      per sample and stored level, tiles of `tile` x `tile` pixels in row-major
                           order, each an image PNG then a label PNG
  <split>-<shard>.json     the shard's index: per sample and stored level, [offset, image bytes,
                           label bytes] of every tile, and up to POINTS_PER_CLASS pixels of each
                           class present (at 1.0) for class-uniform crops
A crop reads the shard index once (cached) and then, per tile row it covers, one ranged read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from components.atomic import (
    MARKER,
    check_owned,
    naming_the_output,
    output_lock,
    remove_stale_temporaries,
)
from components.data.prepare import manifest_hash
from components.data.resize import label_window, resize_image, resize_label, resize_window, source_window
from components.parallel import map_in_order
from components.scales import scale_key, scaled_size
from components.storage import Storage, is_s3, join

FORMAT_VERSION = 2
POINTS_PER_CLASS = 16  # pixels remembered per class and image: where a class-uniform crop may be placed
PNG_LEVEL = 1  # zlib level of the tiles: 6 saves about 10% more and builds 4x slower
READ_CONCURRENCY = 8  # ranged reads of one window in flight at once (S3)
CACHED_SHARD_INDEXES = 32
DECODED_CACHE_BYTES = 128 << 20  # decoded tiles kept per process (the bundled set fits whole)

__all__ = ["MapSamples", "PyramidReader", "SampleJob", "build_pyramid", "content_hash", "image_levels",
           "resize_image", "resize_label", "sample_tiles", "stored_scales"]


def stored_scales(scales: list[float]) -> list[float]:
    """The levels a pyramid of `scales` stores: 1.0 and its halvings among them; the others are made
    on read from the 1.0 level."""
    def halving(s: float) -> bool:
        return 0 < s < 1 and abs(math.log2(1 / s) - round(math.log2(1 / s))) < 1e-9
    return sorted({1.0, *(float(s) for s in scales if halving(s))})


def image_levels(image: np.ndarray, scales: list[float]) -> dict[float, np.ndarray]:
    """The image (H x W x 3 uint8, its 1.0 level) at each scale exactly as a pyramid gives it: the
    one resize definition for the pyramid, evaluation, predict and the served model."""
    return {s: resize_image(image, scaled_size(image.shape[:2], s)) for s in scales}


def _encode(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:
        raise ValueError(f"could not encode a tile of shape {array.shape}")
    return data.tobytes()


def _tile_grid(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    return [(y, x) for y in range(0, height, tile) for x in range(0, width, tile)]


def class_points(label: np.ndarray, classes: list[int], seed: int) -> dict[str, list[list[int]]]:
    """Up to POINTS_PER_CLASS random (y, x) pixels of each class, drawn reproducibly from `seed`."""
    rng = np.random.default_rng(seed)
    points = {}
    for c in classes:
        ys, xs = np.nonzero(label == c)
        picks = rng.choice(len(ys), size=min(POINTS_PER_CLASS, len(ys)), replace=False)
        points[str(c)] = [[int(ys[i]), int(xs[i])] for i in sorted(picks)]
    return points


def _sample_seed(sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class SampleJob:
    """One prepared sample to cut into tiles: what a process or a Ray task on any node needs, given
    the two PNG files' bytes (a task on another node cannot open the driver's paths)."""

    split: str
    sample_id: str
    image: str  # paths on the machine that builds the pyramid, read there and named in errors
    label: str
    stored: tuple[float, ...]
    tile: int
    num_classes: int

    def read_inputs(self) -> tuple[bytes, bytes]:
        return Path(self.image).read_bytes(), Path(self.label).read_bytes()


def sample_tiles(job: SampleJob, image_png: bytes, label_png: bytes) -> tuple[bytes, dict]:
    """The tiles of one sample at every stored level, back to back, and its index entry (tile offsets
    from the start of these bytes). Holds one image at a time, whatever the shard size."""
    image = _open_png(image_png, job.image, "RGB")
    label = _open_png(label_png, job.label, None)
    present = np.unique(label[label < job.num_classes]).tolist()
    chunks, levels, offset = [], {}, 0
    for s in job.stored:
        size = scaled_size(label.shape, s)
        image_s, label_s = resize_image(image, size), resize_label(label, size)
        tiles = []
        for y, x in _tile_grid(size[0], size[1], job.tile):
            image_bytes = _encode(np.ascontiguousarray(image_s[y : y + job.tile, x : x + job.tile]))
            label_bytes = _encode(np.ascontiguousarray(label_s[y : y + job.tile, x : x + job.tile]))
            chunks += [image_bytes, label_bytes]
            tiles.append([offset, len(image_bytes), len(label_bytes)])
            offset += len(image_bytes) + len(label_bytes)
        levels[scale_key(s)] = tiles
    entry = {"id": job.sample_id, "levels": levels,
             "points": class_points(label, present, _sample_seed(job.sample_id)),
             "height": int(label.shape[0]), "width": int(label.shape[1]), "classes": present}
    return b"".join(chunks), entry


def tiles_of_file(job: SampleJob) -> tuple[bytes, dict]:
    """`sample_tiles` of a sample read from this machine's disk (the local processes' job)."""
    return sample_tiles(job, *job.read_inputs())


def _open_png(data: bytes, path: str, mode: str | None) -> np.ndarray:
    try:
        picture = Image.open(io.BytesIO(data))
        return np.asarray(picture.convert(mode) if mode else picture)
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for a truncated or foreign file
        raise ValueError(f"{path}: cannot read this prepared file ({err}); rerun the prepare stage") from None


def write_shard(samples: Iterator[tuple[bytes, dict]], shard_path: Path, progress=None) -> list[dict]:
    """Write the samples' tiles, in order, to `shard_path`; returns the shard's index (one entry per
    sample, offsets from the shard's start)."""
    index = []
    offset = 0
    with open(shard_path, "wb") as handle:
        for data, entry in samples:
            handle.write(data)
            levels = {key: [[start + offset, image, label] for start, image, label in tiles]
                      for key, tiles in entry["levels"].items()}
            index.append({**entry, "levels": levels})
            offset += len(data)
            if progress is not None:
                progress.update(1)
    return index


# Builds the tiles of every job, yielding the results in job order (local processes, Ray tasks).
MapSamples = Callable[[list[SampleJob]], Generator[tuple[bytes, dict], None, None]]


def build_pyramid(prepared_dir: str | Path, scales: list[float], shard_size: int, storage: Storage,
                  output: str, progress=None, tile: int = 256, workers: int = 1,
                  map_samples: MapSamples | None = None) -> dict:
    """Write the pyramid of a prepared dataset to `output` (local path or s3://); returns the manifest.
    Samples are cut into tiles by `map_samples` (Ray tasks on a cluster), or else by `workers` processes
    of this machine, and written here shard after shard. A local output is locked while it is written (a
    second run on it is refused at once) and built in a folder named after its inputs, shard by
    shard: a killed build leaves the previous output whole, and the next run with the same inputs
    keeps the shards it finished."""
    local = not is_s3(output)
    with output_lock(output, "pyramid.output") if local else contextlib.nullcontext():
        if map_samples is None:
            def map_samples(jobs: list[SampleJob]) -> Generator[tuple[bytes, dict], None, None]:
                return map_in_order(tiles_of_file, jobs, workers)
        return _write_pyramid(Path(prepared_dir), scales, shard_size, storage, output, progress, tile, map_samples)


def _build_key(source: dict, stored: list[float], shard_size: int, tile: int) -> str:
    """What the shards' bytes depend on: a build folder of another key is another build, never reused."""
    recipe = json.dumps([FORMAT_VERSION, manifest_hash(source), stored, shard_size, tile, PNG_LEVEL, POINTS_PER_CLASS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _build_folder(output: str, key: str) -> Path:
    """Where a local build is assembled: beside the output, named after the build's key. Folders of
    other keys are what killed builds of other inputs left: removed."""
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent / f".{target.name}.build-{key}"
    for other in target.parent.glob(f".{target.name}.build-*"):
        if other != folder:
            shutil.rmtree(other, ignore_errors=True)
    folder.mkdir(exist_ok=True)
    return folder


def _write_shards(shards: list[tuple[str, str, list[str]]], folder: Path, job: Callable[[str, str], SampleJob],
                  map_samples: MapSamples, progress) -> dict[str, list[dict]]:
    """Every shard's index; a shard is built into `folder` unless a finished one is there (its index
    is renamed into place last, so a killed build keeps what it finished)."""
    indexes, missing = {}, []
    for split, name, ids in shards:
        index_path = folder / f"{name}.json"
        if index_path.is_file():
            indexes[name] = json.loads(index_path.read_text())
            if progress is not None:
                progress.update(len(ids))
        else:
            missing.append((split, name, ids))
    results = map_samples([job(split, sample_id) for split, _, ids in missing for sample_id in ids])
    with contextlib.closing(results):  # an error here stops the processes or tasks still cutting tiles
        for _, name, ids in missing:
            part, index_part = folder / f"{name}.bin.part", folder / f"{name}.json.part"
            try:
                index = write_shard(itertools.islice(results, len(ids)), part, progress)
                if len(index) != len(ids):
                    raise RuntimeError(f"shard {name}: {len(index)} of its {len(ids)} samples came back")
                part.rename(folder / f"{name}.bin")
                index_part.write_text(json.dumps(index) + "\n")
                index_part.rename(folder / f"{name}.json")
            except BaseException:
                # a failed shard frees its room at once (a full disk); finished shards stay for the rerun
                part.unlink(missing_ok=True)
                index_part.unlink(missing_ok=True)
                raise
            indexes[name] = index
    return indexes


def _write_pyramid(prepared_dir: Path, scales: list[float], shard_size: int, storage: Storage,
                   output: str, progress, tile: int, map_samples: MapSamples) -> dict:
    source_path = prepared_dir / "manifest.json"
    if not source_path.is_file():
        raise FileNotFoundError(f"pyramid.input: {source_path} is missing; run the prepare stage first")
    source = json.loads(source_path.read_text())
    num_classes = len(source["classes"]["names"])
    stored = stored_scales(scales)
    local = not is_s3(output)
    if local:
        check_owned(Path(output), "pyramid.output")  # never replace a folder we did not write
        remove_stale_temporaries(Path(output))  # what a killed run left: named after the output
        folder = _build_folder(output, _build_key(source, stored, shard_size, tile))
    else:
        folder = Path(tempfile.mkdtemp(prefix=f".{Path(output).name}.tmp-"))
    try:
        with naming_the_output(output, "pyramid.output"):
            shards = [(split, f"{split}-{shard:05d}", ids[first : first + shard_size])
                      for split, ids in source["splits"].items()
                      for shard, first in enumerate(range(0, len(ids), shard_size))]

            def job(split: str, sample_id: str) -> SampleJob:
                return SampleJob(split, sample_id, str(prepared_dir / "images" / split / f"{sample_id}.png"),
                                 str(prepared_dir / "labels" / split / f"{sample_id}.png"), tuple(stored), tile,
                                 num_classes)

            indexes = _write_shards(shards, folder, job, map_samples, progress)
            splits: dict[str, list[dict]] = {split: [] for split in source["splits"]}
            for split, name, _ in shards:
                splits[split] += [{"id": e["id"], "shard": name, "position": i, "height": e["height"],
                                   "width": e["width"], "classes": e["classes"]} for i, e in enumerate(indexes[name])]
            manifest = {
                "format_version": FORMAT_VERSION,
                "scales": [float(s) for s in scales],
                "stored_scales": stored,
                "tile": tile,
                "classes": source["classes"],
                "ignore_index": source["ignore_index"],
                "class_frequencies": source["class_frequencies"],
                "dataset": source["dataset"],
                "source_manifest": manifest_hash(source),
                "splits": splits,
            }
            (folder / "manifest.json").write_text(json.dumps(manifest) + "\n")
            (folder / MARKER).write_text("written by the HMSA pipeline\n")
            storage.publish_dir(folder, output)
    finally:
        if not local and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
    return manifest


def content_hash(pyramid_dir: str | Path) -> str:
    """SHA-256 over every file of a local pyramid (relative path and bytes): the name under which it
    is published to shared storage, so equal pyramids are stored once and a published one never
    changes."""
    root = Path(pyramid_dir)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root / 'manifest.json'} is missing: build the pyramid first (dvc repro pyramid)")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _decode(data: bytes, what: str) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError(f"{what}: a tile does not decode (the pyramid is damaged: rebuild it with dvc repro pyramid)")
    return array


class PyramidReader:
    """Random access to any window of (image, label) of any sample at any of the pyramid's scales.
    `bytes_read` counts the bytes fetched (benchmarks compare it with the crops' own bytes)."""

    def __init__(self, root: str, storage: Storage | None = None):
        self.root = str(root)
        self.storage = storage or Storage()
        manifest_uri = join(self.root, "manifest.json")
        try:
            self.manifest = json.loads(self.storage.read_bytes(manifest_uri))
        except FileNotFoundError:
            raise FileNotFoundError(f"{manifest_uri} is missing: build the pyramid first (dvc repro pyramid)") from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{manifest_uri}: pyramid format {version!r} is not the format {FORMAT_VERSION} this "
                             "code reads; rebuild it: dvc repro --force pyramid")
        self.scales = [float(s) for s in self.manifest["scales"]]
        self.stored = [float(s) for s in self.manifest["stored_scales"]]
        self.tile = int(self.manifest["tile"])
        self.bytes_read = 0
        self._indexes: OrderedDict[str, list[dict]] = OrderedDict()
        self._decoded: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._decoded_bytes = 0
        self._pool: tuple[int, ThreadPoolExecutor] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # loader processes get the manifest, not threads or caches
        state = dict(self.__dict__)
        state.update(_indexes=OrderedDict(), _decoded=OrderedDict(), _decoded_bytes=0, _pool=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"]["names"])

    def entries(self, split: str) -> list[dict]:
        if split not in self.manifest["splits"]:
            known = list(self.manifest["splits"])
            raise KeyError(f"split {split!r} is not in the pyramid at {self.root}; it has {known}")
        return self.manifest["splits"][split]

    def size(self, split: str, index: int, scale: float) -> tuple[int, int]:
        entry = self.entries(split)[index]
        return scaled_size((entry["height"], entry["width"]), scale)

    def points(self, split: str, index: int, cls: int) -> list[list[int]]:
        """Remembered (y, x) pixels at 1.0 of class `cls` in the sample (empty when absent)."""
        return self._sample_index(split, index)["points"].get(str(cls), [])

    def read(self, split: str, index: int, scales: list[float]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """{scale: (image HxWx3 uint8, label HxW uint8)}: whole levels of one sample."""
        self._check_scales(scales)
        out = {}
        for s in scales:
            h, w = self.size(split, index, s)
            out[s] = self.read_window(split, index, s, (0, 0, h, w))
        return out

    def read_window(self, split: str, index: int, scale: float,
                    window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(image, label) of `window` (top, left, height, width) of level `scale`, clipped to the level:
        a stored level's tiles under it, or the 1.0 region a made level is computed from."""
        self._check_scales([scale])
        shape = self.size(split, index, scale)
        top, left = max(0, window[0]), max(0, window[1])
        bottom, right = min(shape[0], window[0] + window[2]), min(shape[1], window[1] + window[3])
        window = (top, left, max(0, bottom - top), max(0, right - left))
        if not (window[2] and window[3]):
            return np.zeros((window[2], window[3], 3), np.uint8), np.zeros((window[2], window[3]), np.uint8)
        if any(abs(scale - s) < 1e-9 for s in self.stored):
            return self._read_tiles(split, index, scale, shape, window)
        return self.read_resized(split, index, 1.0, shape, window)

    def read_resized(self, split: str, index: int, source: float, shape: tuple[int, int],
                     window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(image, label) of `window` (inside `shape`) of the stored level `source` resized to `shape`,
        made from the tiles of the region under it: exactly that window of the whole resized level."""
        source_shape = self.size(split, index, source)
        needed = source_window(source_shape, shape, window)
        image, label = self._read_tiles(split, index, source, source_shape, needed)
        origin = (needed[0], needed[1])
        return (resize_window(image, origin, source_shape, shape, window),
                label_window(label, origin, source_shape, shape, window))

    def _check_scales(self, scales: list[float]) -> None:
        missing = [s for s in scales if not any(abs(s - v) < 1e-6 for v in self.scales)]
        if missing:
            raise KeyError(f"scales {missing} are not in the pyramid at {self.root} (it has {self.scales})")

    def _sample_index(self, split: str, index: int) -> dict:
        entry = self.entries(split)[index]
        shard = entry["shard"]
        with self._lock:
            if shard in self._indexes:
                self._indexes.move_to_end(shard)
                return self._indexes[shard][entry["position"]]
        data = self.storage.read_bytes(join(self.root, f"{shard}.json"))
        self.bytes_read += len(data)
        samples = json.loads(data)
        with self._lock:
            self._indexes[shard] = samples
            while len(self._indexes) > CACHED_SHARD_INDEXES:
                self._indexes.popitem(last=False)
        return samples[entry["position"]]

    def _fetch(self, uri: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Ranged reads, several in flight at once on S3 (one thread pool per process)."""
        if len(ranges) == 1 or not is_s3(self.root):
            return [self.storage.read_range(uri, start, length) for start, length in ranges]
        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), ThreadPoolExecutor(READ_CONCURRENCY, thread_name_prefix="pyramid-read"))
        return list(self._pool[1].map(lambda r: self.storage.read_range(uri, *r), ranges))

    def _read_tiles(self, split: str, index: int, scale: float, shape: tuple[int, int],
                    window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        sample = self._sample_index(split, index)
        tiles = sample["levels"][scale_key(scale)]
        top, left, height, width = window
        per_row = -(-shape[1] // self.tile)
        rows = range(top // self.tile, (top + height - 1) // self.tile + 1)
        cols = range(left // self.tile, (left + width - 1) // self.tile + 1)
        shard_uri = join(self.root, f"{self.entries(split)[index]['shard']}.bin")
        decoded = self._tiles(shard_uri, tiles, per_row, rows, cols, f"{shard_uri} sample {sample['id']}")
        image = np.empty((height, width, 3), np.uint8)
        label = np.empty((height, width), np.uint8)
        for (r, c), (image_tile, label_tile) in decoded.items():
            y, x = r * self.tile, c * self.tile
            # the part of this tile inside the window, in window coordinates
            y0, x0 = max(y, top), max(x, left)
            y1, x1 = min(y + image_tile.shape[0], top + height), min(x + image_tile.shape[1], left + width)
            image[y0 - top : y1 - top, x0 - left : x1 - left] = image_tile[y0 - y : y1 - y, x0 - x : x1 - x]
            label[y0 - top : y1 - top, x0 - left : x1 - left] = label_tile[y0 - y : y1 - y, x0 - x : x1 - x]
        return image, label

    def _tiles(self, shard_uri: str, tiles: list, per_row: int, rows: range, cols: range,
               what: str) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """The decoded tiles (row, col) -> (image, label): from this process's cache of recently
        decoded tiles (a small dataset is decoded once per loader process), else fetched, one ranged
        read per tile row, and decoded."""
        keys = {(r, c): (shard_uri, tiles[r * per_row + c][0]) for r in rows for c in cols}
        if all(key in self._decoded for key in keys.values()):
            for key in keys.values():
                self._decoded.move_to_end(key)
            return {rc: self._decoded[key] for rc, key in keys.items()}
        ranges = []
        for r in rows:  # the tiles of one row under the window lie one after another: one read
            first, last = tiles[r * per_row + cols[0]], tiles[r * per_row + cols[-1]]
            ranges.append((first[0], last[0] + last[1] + last[2] - first[0]))
        blobs = self._fetch(shard_uri, ranges)
        self.bytes_read += sum(len(b) for b in blobs)
        out = {}
        for r, blob, (start, _) in zip(rows, blobs, ranges, strict=True):
            for c in cols:
                at, image_bytes, label_bytes = tiles[r * per_row + c]
                image_tile = _decode(blob[at - start : at - start + image_bytes], what)
                label_tile = _decode(blob[at - start + image_bytes : at - start + image_bytes + label_bytes], what)
                out[(r, c)] = (image_tile, label_tile)
                self._remember(keys[(r, c)], out[(r, c)])
        return out

    def _remember(self, key: tuple[str, int], decoded: tuple[np.ndarray, np.ndarray]) -> None:
        self._decoded[key] = decoded
        self._decoded_bytes += decoded[0].nbytes + decoded[1].nbytes
        while self._decoded_bytes > DECODED_CACHE_BYTES:
            _, (image, label) = self._decoded.popitem(last=False)
            self._decoded_bytes -= image.nbytes + label.nbytes
