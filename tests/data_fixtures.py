"""Small datasets written by the tests in each supported layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def write_cityscapes(root: Path, per_split=2, size=(24, 32)) -> Path:
    for split in ("train", "val"):
        for i in range(per_split):
            stem = f"testcity_{0:06d}_{i + 10 * (split == 'val'):06d}"
            img_dir = root / "leftImg8bit" / split / "testcity"
            lab_dir = root / "gtFine" / split / "testcity"
            img_dir.mkdir(parents=True, exist_ok=True)
            lab_dir.mkdir(parents=True, exist_ok=True)
            _image(*size, i).save(img_dir / f"{stem}_leftImg8bit.png")
            label = np.full(size, 7, np.uint8)  # road
            label[: size[0] // 2] = 23  # sky
            label[0, 0] = 0  # unlabeled -> ignored
            label[-1, -1] = 26  # car
            Image.fromarray(label).save(lab_dir / f"{stem}_gtFine_labelIds.png")
    return root


def write_voc(root: Path, size=(20, 30)) -> Path:
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    for split, ids in (("train", ["2007_000001", "2007_000002"]), ("val", ["2007_000003"])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, sid in enumerate(ids):
            _image(*size, i).save(root / "JPEGImages" / f"{sid}.jpg")
            label = Image.fromarray(
                np.where(np.arange(size[1])[None, :] < 10, 0, 15).repeat(size[0], 0).astype(np.uint8), "P"
            )
            label.putpalette([0, 0, 0, 128, 0, 0] * 128)
            arr = np.array(label)
            arr[0, :] = 255  # object boundary
            out = Image.fromarray(arr, "P")
            out.putpalette([0, 0, 0, 128, 0, 0] * 128)
            out.save(root / "SegmentationClass" / f"{sid}.png")
    return root


def write_mapillary(root: Path, size=(16, 24)) -> Path:
    labels = [{"readable": f"Class {i}", "color": [i, i, i], "evaluate": True} for i in range(65)]
    labels[45]["readable"] = "Pole"
    labels.append({"readable": "Unlabeled", "color": [0, 0, 0], "evaluate": False})
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"labels": labels}))
    for folder in ("training", "validation"):
        (root / folder / "images").mkdir(parents=True)
        (root / folder / "labels").mkdir(parents=True)
        for i in range(2):
            _image(*size, i).save(root / folder / "images" / f"{folder}{i}.jpg")
            label = np.full(size, 45, np.uint8)
            label[0] = 65  # unlabeled
            Image.fromarray(label).save(root / folder / "labels" / f"{folder}{i}.png")
    return root


def write_folder(root: Path, size=(16, 16)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background 0 0 0\nwire 255 0 0 thin\nfield\n")
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(2):
            _image(*size, i).save(root / "images" / split / f"{split}_{i}.png")
            label = np.zeros(size, np.uint8)
            label[:, 3] = 1
            label[8:] = 2
            label[0, 0] = 255
            Image.fromarray(label).save(root / "masks" / split / f"{split}_{i}.png")
    return root
