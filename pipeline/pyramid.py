"""Stage `pyramid`: every prepared image and label at every scale of pyramid.scales, as tiled shards
(components/data/pyramid.py: 1.0 and its halvings stored, the other levels made on read)."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from components.config import PipelineConfig
from components.data.pyramid import build_pyramid
from components.parallel import usable_cpus
from components.storage import Storage
from pipeline.common import run_stage


def main(cfg: PipelineConfig) -> None:
    source = Path(cfg.prepare.output) / "manifest.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: run the prepare stage first (dvc repro prepare)")
    workers = usable_cpus() if cfg.pyramid.workers == "auto" else cfg.pyramid.workers
    total = sum(len(ids) for ids in json.loads(source.read_text())["splits"].values())
    with tqdm(total=total, desc=f"pyramid {cfg.pyramid.scales}", unit="img") as bar:
        manifest = build_pyramid(cfg.prepare.output, cfg.pyramid.scales, cfg.pyramid.shard_size, Storage(),
                                 cfg.pyramid.output, progress=bar, tile=cfg.pyramid.tile, workers=workers)
    size = sum(p.stat().st_size for p in Path(cfg.pyramid.output).iterdir() if p.is_file())
    print(f"pyramid of {total} images at scales {cfg.pyramid.scales} written to {cfg.pyramid.output}: "
          f"{size / 1e6:.1f} MB, levels {manifest['stored_scales']} stored, the others made on read")


if __name__ == "__main__":
    run_stage(main, __doc__)
