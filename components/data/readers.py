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
from components.safe_files import read_regular


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


# Mask values are class indices in 8 bits and 255 is the ignore label: at most 255 classes.
MAX_CLASSES = 255
MAX_CLASS_FILE_BYTES = 1 << 20  # a class list, not a dataset: larger is the wrong file


def read_class_file(path: Path) -> tuple[list[str], list[tuple[int, int, int]], list[str]]:
    """(names, colours, thin names) of a folder dataset's classes.txt: one class per line,
    `name [r g b] [thin]`. Everything a later stage relies on is checked here, naming the line: whole
    colour components in 0-255, unique names, fewer classes than the ignore label."""
    try:
        data = read_regular(path, "class list (one class name per line)", MAX_CLASS_FILE_BYTES)
    except (FileNotFoundError, ValueError) as err:  # missing, a FIFO, a folder, too large: named
        raise type(err)(f"folder: {err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"folder: {path} is not UTF-8 text (byte {err.start})") from None
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    thin: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{line_no}"
        marked_thin = len(parts) in (2, 5) and parts[-1] == "thin"
        if len(parts) not in (1, 4) and not marked_thin:
            raise ValueError(f"{where}: expected 'name [r g b] [thin]', got {line!r}")
        name = parts[0]
        if name in first_line:
            raise ValueError(f"{where}: class {name!r} is listed twice (first on line {first_line[name]})")
        first_line[name] = line_no
        names.append(name)
        if len(parts) >= 4:
            try:
                colour = tuple(int(c) for c in parts[1:4])
            except ValueError:
                raise ValueError(f"{where}: colour {parts[1:4]} of {name!r}: expected three whole numbers "
                                 "0-255") from None
            if not all(0 <= c <= 255 for c in colour):
                raise ValueError(f"{where}: colour {list(colour)} of {name!r}: components must be 0-255")
            colours.append((colour[0], colour[1], colour[2]))
        else:
            colours.append(_voc_colour(len(names) - 1))
        if marked_thin:
            thin.append(name)
    if not names:
        raise ValueError(f"folder: {path} lists no classes (one class name per line)")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"folder: {path} lists {len(names)} classes; at most {MAX_CLASSES} (mask value 255 is "
                         "the ignore label)")
    return names, colours, thin


def read_folder(root: str | Path) -> DatasetReader:
    """images/<split>/*.{png,jpg} + masks/<split>/<stem>.png + classes.txt.

    classes.txt has one class per line: `name [r g b] [thin]`; mask values are class indices, 255 ignored.
    """
    root = Path(root)
    names, colours, thin = read_class_file(root / "classes.txt")
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
