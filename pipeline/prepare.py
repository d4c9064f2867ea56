"""Stage `prepare`: a raw dataset (or the bundled synthetic one) -> canonical layout + manifest."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from components.atomic import naming_the_output, scratch_dir
from components.config import PipelineConfig
from components.data.prepare import prepare_dataset
from components.data.readers import open_dataset, read_cityscapes
from components.data.synthetic import write_cityscapes_layout
from components.parallel import usable_cpus
from pipeline.common import run_stage


def main(cfg: PipelineConfig) -> None:
    pc = cfg.prepare
    workers = usable_cpus() if pc.workers == "auto" else pc.workers
    # The generated dataset lives next to the output under a name the next run recognises, so one
    # that a killed run left behind is removed (a system temporary folder would keep it).
    with (scratch_dir(pc.output, "generate", key="prepare.output") as scratch,
          naming_the_output(pc.output, "prepare.output")):
        if pc.dataset == "synthetic":
            sc = pc.synthetic
            splits = {"train": sc.train_images, "val": sc.val_images}
            with tqdm(total=sum(splits.values()), desc="generate", unit="img") as bar:
                # Written in the Cityscapes layout and read back by the Cityscapes reader.
                write_cityscapes_layout(scratch, splits, sc.height, sc.width, sc.seed, progress=bar,
                                        workers=workers)
            reader = read_cityscapes(scratch)
            source_info = {"generator": "synthetic", **sc.model_dump()}
        else:
            reader = open_dataset(pc.dataset, pc.source)
            source_info = {"path": pc.source}
        with tqdm(total=len(reader.samples), desc="prepare", unit="img") as bar:
            manifest = prepare_dataset(reader, pc.output, pc.on_bad_sample, progress=bar, source_info=source_info,
                                       max_pixels=pc.max_pixels, workers=workers)
    counts = {split: len(ids) for split, ids in manifest["splits"].items()}
    print(f"prepared {reader.name} into {pc.output}: {counts}, {manifest['skipped']} skipped")
    if manifest["skipped"]:
        for item in json.loads((Path(pc.output) / "skipped.json").read_text()):
            print(f"  skipped {item['split']}/{item['sample_id']}: {item['reason']}")


if __name__ == "__main__":
    run_stage(main, __doc__)
