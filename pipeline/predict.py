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
from components.config import NAME_MAX, TEMPORARY_NAME_EXTRA, PipelineConfig
from components.data.classes import CITYSCAPES_CLASSES, palette
from components.data.dataset import to_tensor
from components.data.images import image_size, read_image
from components.data.pyramid import image_levels
from components.data.readers import IMAGE_SUFFIXES
from components.owned_files import check_replaceable
from pipeline import output_files
from pipeline.common import run_stage
from pipeline.model_source import load_model


def list_images(inputs: list[str]) -> list[Path]:
    """The files named, and the entries of the folders named whose suffix is an image's. Whether each
    is a readable image (not a FIFO, a device, a folder named `x.png`, a loop of links) is checked
    when it is opened, by the safe reader, which names what it found."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists() or item.is_symlink():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    if not paths:
        raise FileNotFoundError(f"no images found in {inputs}")
    return paths


OUTPUT_SUFFIXES = ("_label.png", "_overlay.png")


@torch.no_grad()
def predict_labels(model, image: np.ndarray, scales: list[float]) -> np.ndarray:
    """The label map (H x W uint8) of one RGB image: its scale levels made as the pyramid makes
    them (image_levels), so a prediction sees what evaluation saw."""
    inputs = {s: to_tensor(level)[None] for s, level in image_levels(image, scales).items()}
    return model(inputs, scales).fused.argmax(1)[0].numpy().astype(np.uint8)


def check_outputs(images: list[Path], output: Path, overwrite: bool) -> None:
    """Refuse, before any work, inputs that would write the same files, outputs that are inputs (however
    spelt, through links too) and files that exist (unless `overwrite`)."""
    by_stem: dict[str, list[Path]] = {}
    for path in images:
        by_stem.setdefault(path.stem, []).append(path)
    clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if clashes:
        listed = "; ".join(", ".join(map(str, paths)) for paths in clashes.values())
        raise ValueError(f"inputs with the same name would write the same outputs: {listed} "
                         "(predict them into separate --output folders)")
    longest = max(OUTPUT_SUFFIXES, key=len)
    too_long = [p for p in images if len(f"{p.stem}{longest}".encode()) + TEMPORARY_NAME_EXTRA > NAME_MAX]
    if too_long:  # its outputs (and their temporaries) would not fit a file name: refused, not a traceback
        allowed = NAME_MAX - TEMPORARY_NAME_EXTRA - len(longest)
        raise ValueError(f"{too_long[0]}: its name is too long for its outputs' names ({too_long[0].stem}{longest} "
                         f"and its temporary); rename it to a stem of at most {allowed} bytes")
    inputs = {path.resolve() for path in images}
    own_inputs = [output / f"{p.stem}{suffix}" for p in images for suffix in OUTPUT_SUFFIXES
                  if (output / f"{p.stem}{suffix}").resolve() in inputs]
    if own_inputs:  # refused even with --overwrite: the input would be replaced while it is read
        raise ValueError(f"{own_inputs[0]} is an input of this run and one of its outputs; choose another --output")
    existing = [output / f"{p.stem}{suffix}" for p in images for suffix in OUTPUT_SUFFIXES
                if (output / f"{p.stem}{suffix}").exists()]
    for path in existing if overwrite else []:  # replaced only when it is a PNG, as this stage writes
        check_replaceable(path, output_files.PNG_IMAGE, "--output")
    if existing and not overwrite:
        shown = ", ".join(map(str, existing[:5])) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise FileExistsError(f"{shown} already exist(s); choose another --output or pass --overwrite")


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
