"""Stage `pyramid`: every prepared image and label at every scale of pyramid.scales, as tiled shards
(components/data/pyramid.py: 1.0 and its halvings stored, the other levels made on read).

The tiles are cut by processes of this machine, or, when RAY_ADDRESS names a cluster, by Ray tasks on
its nodes (one task per sample: its memory is one image's whatever the shard size; an autoscaler
sees the tasks waiting and adds nodes). Either way this process writes the shards, in order, into the
DVC-tracked output: the bytes do not depend on where the tiles were cut."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Generator
from pathlib import Path

from tqdm import tqdm

from components.config import PipelineConfig
from components.data.pyramid import SampleJob, build_pyramid, sample_tiles
from components.parallel import usable_cpus
from components.storage import Storage
from pipeline import ray_session
from pipeline.common import run_stage
from pipeline.environment import Environment

# Tasks in flight per CPU of the cluster (at least TASKS_IN_FLIGHT_MIN): enough to keep every core
# busy while results travel back, few enough that the driver holds a bounded number of images.
TASKS_PER_CPU = 2
TASKS_IN_FLIGHT_MIN = 8


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
        map_samples = lambda jobs: tiles_on_ray(jobs, in_flight, nodes)  # noqa: E731
    total = sum(len(ids) for ids in json.loads(source.read_text())["splits"].values())
    with tqdm(total=total, desc=f"pyramid {cfg.pyramid.scales}", unit="img") as bar:
        manifest = build_pyramid(cfg.prepare.output, cfg.pyramid.scales, cfg.pyramid.shard_size, Storage(),
                                 cfg.pyramid.output, progress=bar, tile=cfg.pyramid.tile, workers=workers,
                                 map_samples=map_samples)
    size = sum(p.stat().st_size for p in Path(cfg.pyramid.output).iterdir() if p.is_file())
    where = f" (tiles cut on {len(nodes)} Ray node(s))" if env.ray_address else ""
    print(f"pyramid of {total} images at scales {cfg.pyramid.scales} written to {cfg.pyramid.output}{where}: "
          f"{size / 1e6:.1f} MB, levels {manifest['stored_scales']} stored, the others made on read")


def tasks_in_flight(setting: int | str) -> int:
    """pyramid.workers on a cluster: the tasks submitted at once (auto: TASKS_PER_CPU per CPU the
    cluster has now, at least TASKS_IN_FLIGHT_MIN, so a cluster that starts empty is asked for nodes)."""
    import ray

    if setting != "auto":
        return int(setting)
    return max(TASKS_IN_FLIGHT_MIN, TASKS_PER_CPU * int(ray.cluster_resources().get("CPU", 0)))


def _tiles_on_a_node(job: SampleJob, image_png: bytes, label_png: bytes) -> tuple[bytes, dict, str]:
    """A Ray task: the sample's tiles, cut from the bytes it was given (never a path of the driver's)."""
    import ray

    data, entry = sample_tiles(job, image_png, label_png)
    return data, entry, ray.get_runtime_context().get_node_id()


def tiles_on_ray(jobs: list[SampleJob], in_flight: int, nodes: set[str]) -> Generator[tuple[bytes, dict], None, None]:
    """Every job's tiles from Ray tasks, yielded in job order; at most `in_flight` submitted and not
    yet taken. A task lost with its node is run again by Ray; a task's own error is raised here as
    itself (a ValueError naming the file), not as Ray's wrapper with its traceback."""
    import ray

    task = ray.remote(num_cpus=1)(_tiles_on_a_node)
    remaining = iter(jobs)
    running: deque = deque()
    try:
        while True:
            while len(running) < in_flight and (job := next(remaining, None)) is not None:
                running.append(task.remote(job, *job.read_inputs()))
            if not running:
                return
            try:
                data, entry, node = ray.get(running.popleft())
            except ray.exceptions.RayTaskError as err:
                raise err.cause if isinstance(err.cause, Exception) else err from None
            nodes.add(node)
            yield data, entry
    finally:
        for ref in running:  # stopped early (an error, Ctrl-C): what is still queued is not wanted
            ray.cancel(ref)


if __name__ == "__main__":
    run_stage(main, __doc__)
