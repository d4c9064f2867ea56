"""Scale pyramids: every image and label of a prepared dataset at every configured scale.

Images below 1.0 are area-resized (each output pixel averages the pixels it covers, no aliasing),
above 1.0 bilinear; labels are resized with nearest neighbour. All levels of a sample lie next to
each other in one shard file (raw uint8, image then label per level), so a loader fetches a whole
pyramid with one ranged read, locally or from S3. manifest.json indexes every sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
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
    temporary_dir,
)
from components.data.prepare import manifest_hash
from components.scales import scale_key, scaled_size
from components.storage import Storage, join

FORMAT_VERSION = 1


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if (h, w) == image.shape[:2]:
        return image
    shrink = h < image.shape[0]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def image_levels(image: np.ndarray, scales: list[float]) -> dict[float, np.ndarray]:
    """The image (H x W x 3 uint8, its 1.0 level) at each scale exactly as a pyramid stores it: the
    one resize definition for the pyramid, evaluation's missing levels, predict and the served model."""
    return {s: resize_image(image, scaled_size(image.shape[:2], s)) for s in scales}


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if (h, w) == label.shape[:2]:
        return label
    return cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)


def build_pyramid(prepared_dir: str | Path, scales: list[float], shard_size: int, storage: Storage,
                  output: str, progress=None) -> dict:
    """Write the pyramid of a prepared dataset to `output` (local path or s3://); returns the manifest.
    A local output is locked while it is written: a second run on it is refused at once."""
    local = not str(output).startswith("s3://")
    with output_lock(output, "pyramid.output") if local else contextlib.nullcontext():
        return _write_pyramid(prepared_dir, scales, shard_size, storage, output, progress)


def _write_pyramid(prepared_dir: str | Path, scales: list[float], shard_size: int, storage: Storage,
                   output: str, progress=None) -> dict:
    prepared_dir = Path(prepared_dir)
    source_path = prepared_dir / "manifest.json"
    if not source_path.is_file():
        raise FileNotFoundError(f"pyramid.input: {source_path} is missing; run the prepare stage first")
    source = json.loads(source_path.read_text())
    num_classes = len(source["classes"]["names"])
    local = not str(output).startswith("s3://")
    if local:
        check_owned(Path(output), "pyramid.output")  # never replace a folder we did not write
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(Path(output))  # what a killed run left: named after the output
    staging = temporary_dir(Path(output)) if local else Path(tempfile.mkdtemp(prefix=f".{Path(output).name}.tmp-"))
    try:
        with naming_the_output(output, "pyramid.output"):
            splits = {}
            for split, ids in source["splits"].items():
                entries, shard, handle, offset = [], -1, None, 0
                for i, sample_id in enumerate(ids):
                    if i % shard_size == 0:
                        if handle:
                            handle.close()
                        shard, offset = shard + 1, 0
                        # one shard file open across samples: closed when the next opens, or below
                        handle = open(staging / f"{split}-{shard:05d}.bin", "wb")  # noqa: SIM115
                    image = np.asarray(Image.open(prepared_dir / "images" / split / f"{sample_id}.png").convert("RGB"))
                    label = np.asarray(Image.open(prepared_dir / "labels" / split / f"{sample_id}.png"))
                    present = np.unique(label[label < num_classes]).tolist()
                    levels = {}
                    assert handle is not None  # opened at the first sample of every shard
                    for s in scales:
                        size = scaled_size(label.shape, s)
                        img_s, lab_s = resize_image(image, size), resize_label(label, size)
                        handle.write(np.ascontiguousarray(img_s).tobytes())
                        handle.write(np.ascontiguousarray(lab_s).tobytes())
                        levels[scale_key(s)] = {"offset": offset, "height": size[0], "width": size[1]}
                        offset += size[0] * size[1] * 4
                    entries.append({"id": sample_id, "shard": f"{split}-{shard:05d}.bin", "levels": levels,
                                    "classes": present})
                    if progress is not None:
                        progress.update(1)
                if handle:
                    handle.close()
                splits[split] = entries
            manifest = {
                "format_version": FORMAT_VERSION,
                "scales": [float(s) for s in scales],
                "classes": source["classes"],
                "ignore_index": source["ignore_index"],
                "class_frequencies": source["class_frequencies"],
                "dataset": source["dataset"],
                "source_manifest": manifest_hash(source),
                "splits": splits,
            }
            (staging / "manifest.json").write_text(json.dumps(manifest) + "\n")
            (staging / MARKER).write_text("written by the HMSA pipeline\n")
            storage.publish_dir(staging, output)
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
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


class PyramidReader:
    """Random access to (image, label) of any sample at any pyramid level."""

    def __init__(self, root: str, storage: Storage | None = None):
        self.root = str(root)
        self.storage = storage or Storage()
        manifest_uri = join(self.root, "manifest.json")
        try:
            self.manifest = json.loads(self.storage.read_bytes(manifest_uri))
        except FileNotFoundError:
            raise FileNotFoundError(f"{manifest_uri} is missing: build the pyramid first (dvc repro pyramid)") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{manifest_uri}: unsupported pyramid format {self.manifest.get('format_version')!r}")
        self.scales = self.manifest["scales"]

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"]["names"])

    def entries(self, split: str) -> list[dict]:
        if split not in self.manifest["splits"]:
            known = list(self.manifest["splits"])
            raise KeyError(f"split {split!r} is not in the pyramid at {self.root}; it has {known}")
        return self.manifest["splits"][split]

    def read(self, split: str, index: int, scales: list[float]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """{scale: (image HxWx3 uint8, label HxW uint8)} for one sample, in one ranged read."""
        entry = self.entries(split)[index]
        missing = [s for s in scales if scale_key(s) not in entry["levels"]]
        if missing:
            raise KeyError(f"scales {missing} are not in the pyramid at {self.root} (it has {self.scales})")
        levels = [entry["levels"][scale_key(s)] for s in scales]
        start = min(lv["offset"] for lv in levels)
        end = max(lv["offset"] + lv["height"] * lv["width"] * 4 for lv in levels)
        blob = self.storage.read_range(join(self.root, entry["shard"]), start, end - start)
        out = {}
        for s, lv in zip(scales, levels, strict=True):
            h, w, at = lv["height"], lv["width"], lv["offset"] - start
            image = np.frombuffer(blob, np.uint8, h * w * 3, at).reshape(h, w, 3)
            label = np.frombuffer(blob, np.uint8, h * w, at + h * w * 3).reshape(h, w)
            out[s] = (image, label)
        return out
