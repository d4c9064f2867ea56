"""Stage `pyramid`: every prepared image and label at every scale of pyramid.scales, as tiled shards
(components/data/pyramid.py: 1.0 and its halvings stored, the other levels made on read).

The tiles are cut by processes of this machine, or, when RAY_ADDRESS names a cluster, by Ray tasks on
its nodes (pipeline/runtime/ray_tasks.py). Either way this process writes the shards, in order, into the
DVC-tracked output: the bytes do not depend on where the tiles were cut."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from components.config import PipelineConfig
from components.data.pyramid import SampleJob, build_pyramid, sample_tiles
from components.parallel import usable_cpus
from components.storage import Storage
from pipeline.runtime import ray_session
from pipeline.runtime.common import run_stage
from pipeline.runtime.environment import Environment
from pipeline.runtime.ray_tasks import map_on_ray, tasks_in_flight


def main(cfg: PipelineConfig) -> None:
    source = Path(cfg.prepare.output) / "manifest.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: run the prepare stage first (dvc repro prepare)")
    env = Environment.from_environ()
    workers = usable_cpus() if cfg.pyramid.workers == "auto" else cfg.pyramid.workers
    nodes: set[str] = set()  # the Ray nodes that cut tiles, for the last line
    map_samples = None  # this machine's processes
    if env.ray_address:
        print(f"pyramid: cutting tiles as Ray tasks on {ray_session.connect(env)}")
        in_flight = tasks_in_flight(cfg.pyramid.workers)
        map_samples = lambda jobs: map_on_ray(sample_tiles, jobs, tile_arguments, in_flight, nodes)  # noqa: E731
    total = sum(len(ids) for ids in json.loads(source.read_text())["splits"].values())
    with tqdm(total=total, desc=f"pyramid {cfg.pyramid.scales}", unit="img") as bar:
        manifest = build_pyramid(cfg.prepare.output, cfg.pyramid.scales, cfg.pyramid.shard_size, Storage(),
                                 cfg.pyramid.output, progress=bar, tile=cfg.pyramid.tile, workers=workers,
                                 map_samples=map_samples)
    size = sum(p.stat().st_size for p in Path(cfg.pyramid.output).iterdir() if p.is_file())
    where = f" (tiles cut on {len(nodes)} Ray node(s))" if env.ray_address else ""
    print(f"pyramid of {total} images at scales {cfg.pyramid.scales} written to {cfg.pyramid.output}{where}: "
          f"{size / 1e6:.1f} MB, levels {manifest['stored_scales']} stored, the others made on read")


def tile_arguments(job: SampleJob) -> tuple:
    """sample_tiles' arguments for a task: the job and its two PNG files, read here."""
    return (job, *job.read_inputs())


if __name__ == "__main__":
    run_stage(main, __doc__)
