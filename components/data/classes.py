"""Class definitions: Cityscapes label ids -> 19 train ids, names, colours and size groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class ClassInfo:
    names: list[str]
    colors: list[tuple[int, int, int]]
    # Classes whose pixels come in thin or small pieces (resolution matters) vs large regions
    # (context matters); evaluation reports mIoU for each group.
    thin_small: list[str]
    large: list[str]

    def to_dict(self) -> dict:
        return {"names": self.names, "colors": [list(c) for c in self.colors],
                "groups": {"thin_small": self.thin_small, "large": self.large}}


# (label id, name, train id, colour) from the Cityscapes scripts; train id 255 is ignored.
CITYSCAPES_LABELS = [
    (0, "unlabeled", 255, (0, 0, 0)), (1, "ego vehicle", 255, (0, 0, 0)),
    (2, "rectification border", 255, (0, 0, 0)), (3, "out of roi", 255, (0, 0, 0)),
    (4, "static", 255, (0, 0, 0)), (5, "dynamic", 255, (111, 74, 0)), (6, "ground", 255, (81, 0, 81)),
    (7, "road", 0, (128, 64, 128)), (8, "sidewalk", 1, (244, 35, 232)), (9, "parking", 255, (250, 170, 160)),
    (10, "rail track", 255, (230, 150, 140)), (11, "building", 2, (70, 70, 70)), (12, "wall", 3, (102, 102, 156)),
    (13, "fence", 4, (190, 153, 153)), (14, "guard rail", 255, (180, 165, 180)), (15, "bridge", 255, (150, 100, 100)),
    (16, "tunnel", 255, (150, 120, 90)), (17, "pole", 5, (153, 153, 153)), (18, "polegroup", 255, (153, 153, 153)),
    (19, "traffic light", 6, (250, 170, 30)), (20, "traffic sign", 7, (220, 220, 0)),
    (21, "vegetation", 8, (107, 142, 35)), (22, "terrain", 9, (152, 251, 152)), (23, "sky", 10, (70, 130, 180)),
    (24, "person", 11, (220, 20, 60)), (25, "rider", 12, (255, 0, 0)), (26, "car", 13, (0, 0, 142)),
    (27, "truck", 14, (0, 0, 70)), (28, "bus", 15, (0, 60, 100)), (29, "caravan", 255, (0, 0, 90)),
    (30, "trailer", 255, (0, 0, 110)), (31, "train", 16, (0, 80, 100)), (32, "motorcycle", 17, (0, 0, 230)),
    (33, "bicycle", 18, (119, 11, 32)),
]
CITYSCAPES_ID = {name: label_id for label_id, name, _, _ in CITYSCAPES_LABELS}

_train = sorted((t, n, c) for _, n, t, c in CITYSCAPES_LABELS if t != 255)
CITYSCAPES_CLASSES = ClassInfo(
    names=[n for _, n, _ in _train],
    colors=[c for _, _, c in _train],
    thin_small=["pole", "traffic light", "traffic sign", "person", "rider", "motorcycle", "bicycle"],
    large=["road", "sidewalk", "building", "wall", "fence", "vegetation", "terrain", "sky", "car", "truck", "bus",
           "train"],
)


def cityscapes_lookup() -> np.ndarray:
    """A 256-entry table from label id to train id; ids the dataset does not define map to -1."""
    lut = np.full(256, -1, dtype=np.int16)
    for label_id, _, train_id, _ in CITYSCAPES_LABELS:
        lut[label_id] = train_id
    return lut


def identity_lookup(num_classes: int, ignore_values: tuple[int, ...] = (IGNORE_INDEX,)) -> np.ndarray:
    """Label values are already class indices; anything else is undefined (-1)."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[:num_classes] = np.arange(num_classes)
    for v in ignore_values:
        lut[v] = IGNORE_INDEX
    return lut


def palette(colors: list[tuple[int, int, int]]) -> np.ndarray:
    """(256, 3) uint8 colours for label PNGs and overlays; the ignore index is black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(colors)] = np.array(colors, dtype=np.uint8)
    return pal
