"""Pyramid build rate (images/s) and loader rate (samples/s) with 0, 1 and 2 loader workers.

    .venv/bin/python -m benchmarks.data_rates [--images 48] [--height 192] [--width 384]

Everything runs in one process, one after another, on a fresh synthetic dataset in a temp folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from components.config import LoaderConfig
from components.data.dataset import PyramidTrainDataset
from components.data.prepare import prepare_dataset
from components.data.pyramid import PyramidReader, build_pyramid
from components.data.readers import read_cityscapes
from components.data.synthetic import write_cityscapes_layout
from components.storage import Storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--crop", type=int, nargs=2, default=(128, 128))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_cityscapes_layout(root / "cs", {"train": args.images, "val": 1}, args.height, args.width, seed=0)
        generate = time.perf_counter() - start
        prepare_dataset(read_cityscapes(root / "cs"), root / "raw")
        start = time.perf_counter()
        build_pyramid(root / "raw", args.scales, 64, Storage(), str(root / "pyramid"))
        build = time.perf_counter() - start
        total = args.images + 1
        print(f"images {args.height}x{args.width}, pyramid scales {args.scales}")
        print(f"generate: {total / generate:.1f} images/s")
        print(f"pyramid build: {total / build:.1f} images/s")
        reader = PyramidReader(str(root / "pyramid"))
        dataset = PyramidTrainDataset(reader, "train", [0.5, 1.0], tuple(args.crop), LoaderConfig())
        for workers in (0, 1, 2):
            loader = DataLoader(dataset, batch_size=4, num_workers=workers, shuffle=True)
            next(iter(loader))  # start the workers before timing
            start, seen = time.perf_counter(), 0
            for _ in range(2):
                for batch in loader:
                    seen += batch["label"].shape[0]
            print(f"loader, {workers} workers: {seen / (time.perf_counter() - start):.1f} samples/s "
                  f"(crop {args.crop[0]}x{args.crop[1]}, scales 0.5+1.0, batch 4)")


if __name__ == "__main__":
    main()
