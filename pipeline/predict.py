"""Predict label maps for images with a saved model or a registered one, at any allowed scale set.

    python -m pipeline.predict --model models:/hmsa@champion --scales 0.5 1.0 2.0 --output out/ img1.png dir/

Writes <stem>_label.png (class indices, with the dataset's palette) and <stem>_overlay.png (colours
blended over the image) for every input image; a folder stands for the images in it.

Nothing is lost and nothing is half-written: before any work it refuses inputs whose outputs would
share a name (x.png in two folders), outputs that are inputs, outputs that already exist (unless
--overwrite) and inputs that are not images (every input's type, size and header are read first);
inputs are then decoded one at a time, so memory does not grow with their number. The outputs wait
on disk and appear together at the end, or none do; a second run into the same --output is refused
while one runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.atomic import atomic_batch, output_lock, remove_stale_temporaries
from components.config import PipelineConfig
from components.data.classes import CITYSCAPES_CLASSES, palette
from components.data.dataset import to_tensor
from components.data.images import image_size, read_image
from components.data.pyramid import image_levels
from pipeline.runtime.common import run_stage
from pipeline.runtime.model_source import load_model
from pipeline.runtime.prediction_files import OUTPUT_SUFFIXES, check_outputs, list_images


@torch.no_grad()
def predict_labels(model, image: np.ndarray, scales: list[float]) -> np.ndarray:
    """The label map (H x W uint8) of one RGB image: its scale levels made as the pyramid makes
    them (image_levels), so a prediction sees what evaluation saw."""
    inputs = {s: to_tensor(level)[None] for s, level in image_levels(image, scales).items()}
    return model(inputs, scales).fused.argmax(1)[0].numpy().astype(np.uint8)


def _save_png(image: Image.Image, target: Path, open_for) -> None:
    with open_for(target) as handle:
        image.save(handle, format="PNG")


def predict(model, images: list[Path], scales: list[float], output: Path, colors: list,
            overwrite: bool = False) -> list[Path]:
    with output_lock(output, "--output"):  # a second predict into this folder is refused, not interleaved
        return _predict_locked(model, images, scales, output, colors, overwrite)


def _predict_locked(model, images: list[Path], scales: list[float], output: Path, colors: list,
                    overwrite: bool) -> list[Path]:
    scales = model.check_scales(scales)  # before any work: a set the method cannot use is an error
    for path in images:  # type, size and header of every input before any work: a bad one stops us here
        image_size(path)
    check_outputs(images, output, overwrite)
    output.mkdir(parents=True, exist_ok=True)
    for path in images:
        for suffix in OUTPUT_SUFFIXES:  # what a killed run left: no live run holds this folder
            remove_stale_temporaries(output / f"{path.stem}{suffix}")
    pal = palette([tuple(c) for c in colors])
    written = []
    # Outputs wait on disk and appear together at the end: an input that passes its header check but
    # fails to decode leaves every label map unwritten, as an unreadable header does.
    with atomic_batch() as open_for:
        for path in images:
            image = read_image(path)  # decoded one at a time: memory does not grow with the number of inputs
            label = predict_labels(model, image, scales)
            label_png = Image.fromarray(label, "P")
            label_png.putpalette(pal.flatten().tolist())
            _save_png(label_png, output / f"{path.stem}_label.png", open_for)
            overlay = (0.5 * image + 0.5 * pal[label]).astype(np.uint8)
            _save_png(Image.fromarray(overlay), output / f"{path.stem}_overlay.png", open_for)
            written.append(output / f"{path.stem}_label.png")
    return written


def main(cfg: PipelineConfig, args) -> None:
    model, _ = load_model(args.model, cfg)
    colors = getattr(model, "metadata", {}).get("classes", {}).get("colors", CITYSCAPES_CLASSES.colors)
    written = predict(model, list_images(args.inputs), args.scales, Path(args.output), colors, args.overwrite)
    print(f"wrote {len(written)} label maps and overlays to {args.output}")


def _arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("--model", required=True, help="a saved-model directory or models:/name@alias")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--output", default="predictions")
    parser.add_argument("--overwrite", action="store_true", help="replace label maps and overlays that exist")


if __name__ == "__main__":
    run_stage(main, __doc__, _arguments)
