"""A procedural street-scene dataset written in the Cityscapes layout, with Cityscapes label ids.

Scale genuinely matters in it, as on real streets:
- road and sidewalk share one texture distribution (their colours are drawn independently from the
  same range per image), so only layout and perspective tell them apart; sky sits above the
  horizon. These large regions reward context, i.e. the low scales. Buildings and vegetation
  overlap in colour and differ in shape (blocks vs blobs) and in the buildings' windows, a texture
  of 3 px squares that half scale erases: a trained model reads them at the high scales (README,
  "What the attention learned");
- poles 1 to 6 pixels wide (by distance), small signs and traffic lights, distant cars and people
  need resolution, i.e. the high scales;
- sensor noise, shading, blur and JPEG artefacts vary per image.
Every image depends only on (seed, split, index), so the dataset is deterministic and any subset can
be regenerated on its own.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from components.data.classes import CITYSCAPES_ID as ID

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
CITY = "synthia"  # one fictional city; the Cityscapes layout groups files by city


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, grain: float) -> np.ndarray:
    """A colour field with coarse and fine noise around `base` (RGB in 0..255)."""
    coarse = cv2.resize(rng.normal(0, 1, (max(1, h // 8), max(1, w // 8))).astype(np.float32), (w, h))
    fine = rng.normal(0, 1, (h, w)).astype(np.float32)
    value = (coarse * 0.6 + fine * 0.4)[..., None] * grain
    return np.clip(base[None, None, :] + value, 0, 255)


def _paint(img, label, mask, colour_field, label_id):
    img[mask] = colour_field[mask]
    label[mask] = label_id


def _draw_background(rng, img, label, horizon, vp_x):
    h, w = label.shape
    # Sky: a vertical gradient, brighter towards the horizon.
    top, bottom = rng.uniform([60, 100, 160], [120, 160, 230]), rng.uniform([150, 170, 200], [220, 225, 245])
    ramp = np.linspace(0, 1, horizon, dtype=np.float32)[:, None, None]
    img[:horizon] = top * (1 - ramp) + bottom * ramp + rng.normal(0, 3, (horizon, w, 3))
    label[:horizon] = ID["sky"]

    # Ground below the horizon: sidewalk everywhere, road as a trapezoid towards the vanishing point.
    # Road and sidewalk colours come from one range, so texture alone cannot separate them.
    ground_h = h - horizon
    for name in ("sidewalk", "road"):
        grey = rng.uniform(85, 150)
        base = np.array([grey, grey, grey]) + rng.uniform(-8, 8, 3)
        field = np.zeros((h, w, 3), np.float32)
        field[horizon:] = _texture(rng, ground_h, w, base, grain=rng.uniform(8, 16))
        if name == "sidewalk":
            mask = np.zeros((h, w), bool)
            mask[horizon:] = True
        else:
            half_bottom = w * rng.uniform(0.28, 0.42)
            apex = (vp_x + rng.uniform(-0.02, 0.02) * w, horizon)
            poly = np.array([[apex[0] - 2, apex[1]], [apex[0] + 2, apex[1]],
                             [vp_x + half_bottom, h], [vp_x - half_bottom, h]], np.int32)
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [poly], 1)
            mask = mask.astype(bool)
            # Lane markings: dashes along the centre line, painted but still road.
            for t in np.linspace(0.15, 0.95, 6):
                y0 = int(horizon + t * ground_h)
                y1 = min(h - 1, int(y0 + 0.04 * t * ground_h) + 1)
                cv2.line(field, (int(vp_x), y0), (int(vp_x), y1), (200, 200, 190), max(1, int(3 * t)))
        _paint(img, label, mask, field, ID[name])
    # Grass verges at the outer edges on some images.
    if rng.random() < 0.5:
        field = _texture(rng, h, w, rng.uniform([70, 120, 50], [110, 170, 90]), grain=14)
        edge = int(w * rng.uniform(0.05, 0.15))
        mask = np.zeros((h, w), bool)
        mask[horizon + ground_h // 3 :, :edge] = True
        _paint(img, label, mask, field, ID["terrain"])


def _draw_skyline(rng, img, label, horizon):
    """Buildings (rectangular blocks with windows) and vegetation (blobs) along the horizon."""
    h, w = label.shape
    x = int(rng.integers(-w // 10, 0))
    while x < w:
        block_w = int(rng.integers(w // 10, w // 4))
        top = int(horizon - rng.uniform(0.3, 0.95) * horizon)
        bottom = min(h, horizon + int(rng.integers(0, 4)))
        # Building and vegetation colours overlap (greenish-grey walls, dark foliage).
        base = rng.uniform([55, 60, 45], [150, 150, 130])
        field = _texture(rng, h, w, base, grain=rng.uniform(10, 20))
        mask = np.zeros((h, w), np.uint8)
        if rng.random() < 0.65:
            cv2.rectangle(mask, (x, top), (x + block_w, bottom), 1, -1)
            for wy in range(top + 3, bottom - 4, int(rng.integers(5, 9))):
                for wx in range(x + 2, x + block_w - 3, int(rng.integers(5, 9))):
                    cv2.rectangle(field, (wx, wy), (wx + 2, wy + 2), tuple(float(v) * 0.6 for v in base), -1)
            _paint(img, label, mask.astype(bool), field, ID["building"])
        else:
            for _ in range(int(rng.integers(3, 7))):
                cx = int(x + rng.uniform(0, block_w))
                cy = int(rng.uniform(top, bottom))
                radius = int(rng.uniform(0.15, 0.35) * block_w) + 2
                cv2.circle(mask, (cx, cy), radius, 1, -1)
            mask[bottom:] = 0
            _paint(img, label, mask.astype(bool), field, ID["vegetation"])
        x += block_w + int(rng.integers(0, w // 20 + 1))


def _ground_point(rng, horizon, h, w, vp_x, side: str):
    """A point on the ground at depth t in (0, 1]; t grows towards the camera. Returns (x, y, t)."""
    t = float(rng.uniform(0.08, 1.0) ** 1.5)
    y = int(horizon + t * (h - horizon))
    spread = t * w * 0.55
    if side == "road":
        x = vp_x + rng.uniform(-0.6, 0.6) * spread * 0.55
    else:
        sign = -1 if rng.random() < 0.5 else 1
        x = vp_x + sign * spread * rng.uniform(0.8, 1.1)
    return int(x), y, t


def _draw_objects(rng, img, label, horizon, vp_x):
    h, w = label.shape
    items = []
    for _ in range(int(rng.integers(1, 6))):
        items.append(("car", *_ground_point(rng, horizon, h, w, vp_x, "road")))
    for _ in range(int(rng.integers(3, 8))):
        items.append(("pole", *_ground_point(rng, horizon, h, w, vp_x, "side")))
    for _ in range(int(rng.integers(0, 4))):
        items.append(("person", *_ground_point(rng, horizon, h, w, vp_x, "side")))
    for kind, x, y, t in sorted(items, key=lambda item: item[3]):  # far objects first
        scale = t * h
        if kind == "car":
            cw, ch = max(3, int(scale * 0.55)), max(2, int(scale * 0.3))
            colour = tuple(float(c) for c in rng.uniform(20, 230, 3))
            _box(img, label, x - cw // 2, y - ch, x + cw // 2, y, colour, ID["car"])
            glass = (40.0, 50.0, 60.0)
            cv2.rectangle(img, (x - cw // 3, y - ch), (x + cw // 3, y - ch + max(1, ch // 3)), glass, -1)
        elif kind == "pole":
            # 1 to 2 pixels far away, up to 6 close to the camera (perspective): at half scale most
            # poles are a pixel or less, so only the high scales resolve them
            width = int(rng.integers(1, 3)) + int(t * w / 96)
            height = max(4, int(scale * rng.uniform(0.9, 1.4)))
            top = max(0, y - height)
            # dark metal or pale concrete: a pole stands out from the ground (85..150 grey), its
            # width, not its colour, is what makes it hard
            grey = float(rng.uniform(30, 70) if rng.random() < 0.5 else rng.uniform(170, 215))
            _box(img, label, x, top, x + width - 1, y, (grey, grey, grey), ID["pole"])
            if rng.random() < 0.6:
                size = max(3, int(scale * 0.1) + int(rng.integers(1, 4)))
                if rng.random() < 0.6:
                    colour = [(200.0, 30.0, 30.0), (30.0, 60.0, 200.0), (230.0, 200.0, 40.0)][int(rng.integers(0, 3))]
                    _box(img, label, x - size // 2, top, x + size // 2 + width, top + size, colour, ID["traffic sign"])
                else:
                    _box(img, label, x, top, x + max(2, size // 2), top + size + 2, (25.0, 25.0, 25.0),
                         ID["traffic light"])
                    lamp = [(230.0, 40.0, 30.0), (60.0, 220.0, 60.0)][int(rng.integers(0, 2))]
                    cv2.circle(img, (x + max(1, size // 4), top + 1 + int(rng.integers(0, 3))), 0, lamp, -1)
        else:
            pw, ph = max(1, int(scale * 0.12)), max(3, int(scale * 0.45))
            colour = tuple(float(c) for c in rng.uniform(30, 220, 3))
            mask = np.zeros((h, w), np.uint8)
            cv2.ellipse(mask, (x, y - ph // 2), (pw, ph // 2), 0, 0, 360, 1, -1)
            cv2.circle(mask, (x, y - ph - max(1, pw // 2)), max(1, pw // 2 + 1), 1, -1)
            img[mask.astype(bool)] = colour
            label[mask.astype(bool)] = ID["person"]


def _box(img, label, x0, y0, x1, y1, colour, label_id):
    cv2.rectangle(img, (int(x0), int(y0)), (int(x1), int(y1)), colour, -1)
    cv2.rectangle(label, (int(x0), int(y0)), (int(x1), int(y1)), int(label_id), -1)


def _degrade(rng, img):
    """Shading, sensor noise, blur and JPEG artefacts, varied per image."""
    h, w = img.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    img *= (1 + rng.uniform(0.1, 0.35) * (ramp - ramp.mean()))[..., None] * rng.uniform(0.75, 1.15)
    img += rng.normal(0, rng.uniform(2, 9), img.shape)
    out = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.0))
    quality = int(rng.integers(35, 95))
    ok, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if ok else out


def render_scene(seed: int, split: str, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, Cityscapes label-id map) pair, a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    img = np.zeros((height, width, 3), np.float32)
    label = np.zeros((height, width), np.uint8)
    horizon = int(height * rng.uniform(0.36, 0.5))
    vp_x = width * rng.uniform(0.35, 0.65)
    _draw_background(rng, img, label, horizon, vp_x)
    _draw_skyline(rng, img, label, horizon)
    _draw_objects(rng, img, label, horizon, vp_x)
    if rng.random() < 0.3:  # the ego vehicle's bonnet, which Cityscapes labels as ignored
        bonnet = int(height * rng.uniform(0.04, 0.1))
        img[-bonnet:] = rng.uniform(10, 60)
        label[-bonnet:] = ID["ego vehicle"]
    return _degrade(rng, img), label


def sample_id(split: str, index: int) -> str:
    """Cityscapes-style `<city>_<sequence>_<frame>`; the split is the sequence, so ids never collide."""
    return f"{CITY}_{SPLIT_CODES[split]:06d}_{index:06d}"


def _write_one(job: tuple) -> None:
    root, split, index, height, width, seed = job
    image, label = render_scene(seed, split, index, height, width)
    stem = sample_id(split, index)
    Image.fromarray(image).save(root / "leftImg8bit" / split / CITY / f"{stem}_leftImg8bit.png")
    Image.fromarray(label).save(root / "gtFine" / split / CITY / f"{stem}_gtFine_labelIds.png")


def write_cityscapes_layout(root: str | Path, splits: dict[str, int], height: int, width: int, seed: int,
                            progress=None, workers: int = 1) -> Path:
    """Write `splits` (name -> image count) under root/leftImg8bit and root/gtFine, `workers`
    images at once (each image is a function of its index alone)."""
    from components.parallel import run_jobs

    root = Path(root)
    for split in splits:
        (root / "leftImg8bit" / split / CITY).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / CITY).mkdir(parents=True, exist_ok=True)
    jobs = [(root, split, i, height, width, seed) for split, count in splits.items() for i in range(count)]
    run_jobs(_write_one, jobs, workers, on_result=lambda _: progress.update(1) if progress is not None else None)
    return root
