"""Predict label maps for images with a saved model or a registered one, at any allowed scale set.

    python -m pipeline.predict --model models:/hmsa@champion --scales 0.5 1.0 2.0 --output out/ img1.png dir/

Writes <stem>_label.png (class indices, with the dataset's palette) and <stem>_overlay.png (colours
blended over the image) for every input image; a folder stands for the images in it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.config import PipelineConfig
from components.data.classes import CITYSCAPES_CLASSES, palette
from components.data.dataset import to_tensor
from components.data.images import read_image
from components.data.readers import IMAGE_SUFFIXES
from pipeline.common import run_stage
from pipeline.model_source import load_model


def list_images(inputs: list[str]) -> list[Path]:
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    if not paths:
        raise FileNotFoundError(f"no images found in {inputs}")
    return paths


def predict(model, images: list[Path], scales: list[float], output: Path, colors: list) -> list[Path]:
    scales = model.check_scales(scales)  # before any work: a set the method cannot use is an error
    output.mkdir(parents=True, exist_ok=True)
    pal = palette([tuple(c) for c in colors])
    written = []
    for path in images:
        image = read_image(path)
        with torch.no_grad():
            label = model(to_tensor(image)[None], scales).fused.argmax(1)[0].numpy().astype(np.uint8)
        label_png = Image.fromarray(label, "P")
        label_png.putpalette(pal.flatten().tolist())
        label_png.save(output / f"{path.stem}_label.png")
        overlay = (0.5 * image + 0.5 * pal[label]).astype(np.uint8)
        Image.fromarray(overlay).save(output / f"{path.stem}_overlay.png")
        written.append(output / f"{path.stem}_label.png")
    return written


def main(cfg: PipelineConfig, args) -> None:
    model, _ = load_model(args.model, cfg)
    colors = getattr(model, "metadata", {}).get("classes", {}).get("colors", CITYSCAPES_CLASSES.colors)
    written = predict(model, list_images(args.inputs), args.scales, Path(args.output), colors)
    print(f"wrote {len(written)} label maps and overlays to {args.output}")


def _arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("--model", required=True, help="a saved-model directory or models:/name@alias")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--output", default="predictions")


if __name__ == "__main__":
    run_stage(main, __doc__, _arguments)
