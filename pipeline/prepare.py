"""Stage `prepare`: a raw dataset (or the bundled synthetic one) -> canonical layout + manifest.

Samples are checked and converted by processes of this machine, or, when RAY_ADDRESS names a
cluster, by Ray tasks on its nodes, each sent its sample's files (pipeline/runtime/ray_tasks.py); this
process reads the files and writes the output, in order, either way. (The bundled set is generated
here.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from components.atomic import naming_the_output, scratch_dir
from components.config import PipelineConfig
from components.data.prepare import BadSampleError, ConvertJob, convert_bytes, prepare_dataset, read_inputs
from components.data.readers import open_dataset, read_cityscapes
from components.data.synthetic import write_cityscapes_layout
from components.parallel import usable_cpus
from pipeline.runtime import ray_session
from pipeline.runtime.common import run_stage
from pipeline.runtime.environment import Environment
from pipeline.runtime.ray_tasks import map_on_ray, tasks_in_flight


def main(cfg: PipelineConfig) -> None:
    pc = cfg.prepare
    env = Environment.from_environ()
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
        nodes: set[str] = set()  # the Ray nodes that converted samples, for the last line
        map_samples = None  # this machine's processes
        if env.ray_address:
            print(f"prepare: converting samples as Ray tasks on {ray_session.connect(env)}")
            in_flight = tasks_in_flight(pc.workers)
            map_samples = lambda jobs: map_on_ray(convert_bytes, jobs, convert_arguments, in_flight, nodes)  # noqa: E731
        with tqdm(total=len(reader.samples), desc="prepare", unit="img") as bar:
            manifest = prepare_dataset(reader, pc.output, pc.on_bad_sample, progress=bar, source_info=source_info,
                                       max_pixels=pc.max_pixels, workers=workers, map_samples=map_samples)
    counts = {split: len(ids) for split, ids in manifest["splits"].items()}
    where = f" (converted on {len(nodes)} Ray node(s))" if env.ray_address else ""
    print(f"prepared {reader.name} into {pc.output}{where}: {counts}, {manifest['skipped']} skipped")
    if manifest["skipped"]:
        for item in json.loads((Path(pc.output) / "skipped.json").read_text()):
            print(f"  skipped {item['split']}/{item['sample_id']}: {item['reason']}")


def convert_arguments(job: ConvertJob) -> tuple:
    """convert_bytes' arguments for a task: the job and its two files, read here with their checks
    (a file refused here makes the job a bad sample, which the task skips or stops on)."""
    if job.problem is not None:
        return job, b"", b""
    try:
        return (job, *read_inputs(job))
    except BadSampleError as err:
        return replace(job, problem=str(err)), b"", b""


if __name__ == "__main__":
    run_stage(main, __doc__)
