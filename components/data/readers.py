"""Readers for the supported dataset layouts. Each lists samples and says how to map label values.

A reader never decodes images; `components.data.prepare` does, checking every sample. The label
lookup maps each raw label value (0..255) to a class index, 255 (ignored) or -1 (not defined by
the dataset, an error when found).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.data.classes import CITYSCAPES_CLASSES, IGNORE_INDEX, ClassInfo, cityscapes_lookup, identity_lookup


@dataclass(frozen=True)
class RawSample:
    sample_id: str
    split: str
    image_path: Path
    label_path: Path | None  # None when the dataset has no label file for this image


@dataclass
class DatasetReader:
    name: str
    classes: ClassInfo
    lookup: np.ndarray
    samples: list[RawSample]
    root: Path | None = None  # every sample's files must lie inside it (prepare refuses others)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: expected a directory at {path}")
    return path


def _existing(path: Path) -> Path | None:
    try:
        return path if path.is_file() else None
    except OSError:  # a name the file system cannot hold: prepare refuses it, naming the file
        return path


def read_cityscapes(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> DatasetReader:
    """leftImg8bit/<split>/<city>/<id>_leftImg8bit.png + gtFine/<split>/<city>/<id>_gtFine_labelIds.png."""
    root = Path(root)
    _require_dir(root / "leftImg8bit", "cityscapes")
    samples = []
    for split in splits:
        for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            stem = image.name.removesuffix("_leftImg8bit.png")
            label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
            samples.append(RawSample(stem, split, image, _existing(label)))
    return DatasetReader("cityscapes", CITYSCAPES_CLASSES, cityscapes_lookup(), samples, root)


# Mapillary class names (readable, lower case) that come in thin or small pieces.
_MAPILLARY_THIN = ("pole", "sign", "light", "person", "rider", "bicyclist", "motorcyclist", "bicycle",
                   "motorcycle", "bike rack", "fire hydrant", "junction box", "mailbox", "manhole", "phone booth",
                   "street light", "trash can", "catch basin", "cctv camera", "billboard", "bench", "lane marking")


def read_mapillary(root: str | Path) -> DatasetReader:
    """Mapillary Vistas v1.2: config.json + {training,validation}/{images,labels}; 65 classes + unlabeled."""
    root = Path(root)
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"mapillary: {config} is missing (it lists the classes)")
    labels = json.loads(config.read_text())["labels"]
    evaluated = [i for i, lab in enumerate(labels) if lab.get("evaluate", True)]
    lookup = np.full(256, -1, dtype=np.int16)
    lookup[: len(labels)] = IGNORE_INDEX
    lookup[evaluated] = np.arange(len(evaluated))
    names = [labels[i]["readable"].lower() for i in evaluated]
    thin = [n for n in names if any(key in n for key in _MAPILLARY_THIN)]
    classes = ClassInfo(names, [tuple(labels[i]["color"]) for i in evaluated], thin,
                        [n for n in names if n not in thin])
    samples = []
    for folder, split in (("training", "train"), ("validation", "val")):
        for image in sorted((_require_dir(root / folder / "images", "mapillary")).glob("*.jpg")):
            label = root / folder / "labels" / f"{image.stem}.png"
            samples.append(RawSample(image.stem, split, image, _existing(label)))
    return DatasetReader("mapillary", classes, lookup, samples, root)


VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
             "tvmonitor"]


def _voc_colour(index: int) -> tuple[int, int, int]:
    """The standard VOC palette: bits of the index spread over the high bits of R, G and B."""
    r = g = b = 0
    for shift in range(8):
        r |= ((index >> 0) & 1) << (7 - shift)
        g |= ((index >> 1) & 1) << (7 - shift)
        b |= ((index >> 2) & 1) << (7 - shift)
        index >>= 3
    return r, g, b


def read_voc(root: str | Path) -> DatasetReader:
    """Pascal VOC: ImageSets/Segmentation/{train,val}.txt, JPEGImages/, SegmentationClass/ (255 = boundary)."""
    root = Path(root)
    lists = _require_dir(root / "ImageSets" / "Segmentation", "voc")
    samples = []
    for split in ("train", "val"):
        ids = (lists / f"{split}.txt").read_text().split() if (lists / f"{split}.txt").is_file() else []
        for sid in ids:
            samples.append(RawSample(sid, split, root / "JPEGImages" / f"{sid}.jpg",
                                     _existing(root / "SegmentationClass" / f"{sid}.png")))
    thin = ["bicycle", "bird", "bottle", "chair", "pottedplant", "person"]
    classes = ClassInfo(VOC_NAMES, [_voc_colour(i) for i in range(21)], thin, [n for n in VOC_NAMES if n not in thin])
    return DatasetReader("voc", classes, identity_lookup(21), samples, root)


def read_folder(root: str | Path) -> DatasetReader:
    """images/<split>/*.{png,jpg} + masks/<split>/<stem>.png + classes.txt.

    classes.txt has one class per line: `name [r g b] [thin]`; mask values are class indices, 255 ignored.
    """
    root = Path(root)
    class_file = root / "classes.txt"
    if not class_file.is_file():
        raise FileNotFoundError(f"folder: {class_file} is missing (one class name per line)")
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    thin: list[str] = []
    for line_no, line in enumerate(class_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (1, 4, 5):
            raise ValueError(f"{class_file}:{line_no}: expected 'name [r g b] [thin]', got {line!r}")
        names.append(parts[0])
        if len(parts) >= 4:
            colours.append((int(parts[1]), int(parts[2]), int(parts[3])))
        else:
            colours.append(_voc_colour(len(names) - 1))
        if parts[-1] == "thin":
            thin.append(parts[0])
    if not names:
        raise ValueError(f"folder: {class_file} lists no classes (one class name per line)")
    samples = []
    for split_dir in sorted(_require_dir(root / "images", "folder").iterdir()):
        if not split_dir.is_dir():
            raise ValueError(f"folder: {split_dir} is not a split folder (images/<split>/ holds only folders)")
        for image in sorted(p for p in split_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            label = root / "masks" / split_dir.name / f"{image.stem}.png"
            samples.append(RawSample(image.stem, split_dir.name, image, _existing(label)))
    classes = ClassInfo(names, colours, thin, [n for n in names if n not in thin])
    return DatasetReader("folder", classes, identity_lookup(len(names)), samples, root)


READERS = {"cityscapes": read_cityscapes, "mapillary": read_mapillary, "voc": read_voc, "folder": read_folder}


def open_dataset(fmt: str, root: str | Path) -> DatasetReader:
    if fmt not in READERS:
        raise ValueError(f"prepare.format: unknown format {fmt!r}; valid formats are {sorted(READERS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"prepare.source: dataset directory {root} does not exist")
    return READERS[fmt](root)
