"""The files of a prediction (pipeline/predict.py): the images named on its command line, and the
checks, made before any work, that its outputs clash with nothing: not with each other, not with its
inputs, not with files that exist (unless --overwrite).
"""

from __future__ import annotations

from pathlib import Path

from components.config import NAME_MAX, TEMPORARY_NAME_EXTRA
from components.data.readers import IMAGE_SUFFIXES
from components.owned_files import check_replaceable
from pipeline.runtime import output_files


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
