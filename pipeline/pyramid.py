"""Stage `pyramid`: every prepared image and label at every scale of pyramid.scales, in shards."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from components.config import PipelineConfig
from components.data.pyramid import build_pyramid
from components.storage import Storage
from pipeline.common import run_stage


def main(cfg: PipelineConfig) -> None:
    source = Path(cfg.prepare.output) / "manifest.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: run the prepare stage first (dvc repro prepare)")
    total = sum(len(ids) for ids in json.loads(source.read_text())["splits"].values())
    with tqdm(total=total, desc=f"pyramid {cfg.pyramid.scales}", unit="img") as bar:
        build_pyramid(cfg.prepare.output, cfg.pyramid.scales, cfg.pyramid.shard_size, Storage(),
                      cfg.pyramid.output, progress=bar)
    print(f"pyramid of {total} images at scales {cfg.pyramid.scales} written to {cfg.pyramid.output}")


if __name__ == "__main__":
    run_stage(main, __doc__)
