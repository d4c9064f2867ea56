"""What Ray Train costs over a plain loop, and what a second worker brings, in one run.

    .venv/bin/python -m benchmarks.orchestration [--params params.yaml] [--epochs 3]

The same epochs of the same training (the default model, crop, batch and loader of params.yaml,
on a synthetic pyramid of the bundled size) three ways: a plain loop in a fresh process; Ray Train
with one worker holding all CPUs; Ray Train with two workers of half the CPUs each and half the
batch each (the same global batch). Times are wall clock of the whole fit (Ray's worker start
included) and the median epoch after the first (steady state).

A shared 2-core machine's speed drifts by more than the overhead measured (one plain-then-Ray
comparison gave 0.91x to 1.28x in three runs), so the comparison runs in `rounds` rounds of plain
loop, Ray Train with one worker, plain loop (Ray started and stopped within the round, so the
plain loop runs without it): each round's Ray epochs over the mean of the plain runs around them,
the median over rounds reported, and the second plain run over the first as the control that
shows the noise of one comparison. Ray is started as the pipeline starts a local instance
(pipeline.runtime.ray_session.connect). Each run also says where the machine's cores went over the steady
epochs, from /proc: to the training process and its loader workers, and to every other process
of the job (under Ray: its daemons, dashboard, controller and helper actors), which shows the
overhead without the machine's drift in it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import process_cpu
from benchmarks.steps import in_fresh_process, median
from components.config import PipelineConfig, load_config
from pipeline.runtime import ray_session
from pipeline.runtime.environment import Environment


def _pyramid(cfg: PipelineConfig, root: Path, images: int) -> str:
    from components.data.prepare import prepare_dataset
    from components.data.pyramid import build_pyramid
    from components.data.readers import read_cityscapes
    from components.data.synthetic import write_cityscapes_layout
    from components.storage import Storage

    synthetic = cfg.prepare.synthetic
    write_cityscapes_layout(root / "cs", {"train": images, "val": 1}, synthetic.height, synthetic.width, seed=0)
    prepare_dataset(read_cityscapes(root / "cs"), root / "raw")
    build_pyramid(root / "raw", cfg.pyramid.scales, cfg.pyramid.shard_size, Storage(), str(root / "pyramid"))
    return str(root / "pyramid")


def train_epochs(settings: dict) -> dict:
    """The measured work: build model and loader, then epochs of train_one_epoch. Runs in this
    process (plain) or as a Ray Train worker loop; returns each epoch's seconds of training
    ("train") and of the whole epoch, Ray's report of it included ("wall"), and the cores that this
    process with its loader workers and the rest of the job used over the epochs after the first
    ("cores", process_cpu.split_cores; the job is everything below the benchmark's process)."""
    from torch.utils.data import DataLoader

    from components.config import validate_config
    from components.data.dataset import PyramidTrainDataset, loader_settings
    from components.data.pyramid import PyramidReader
    from components.models import build_model
    from components.training import autocast_dtype, build_optimizer, train_one_epoch

    cfg = validate_config(settings["params"], source="benchmark")
    in_ray = settings["in_ray"]
    if in_ray:
        import ray.train
        import ray.train.torch
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train)
    if in_ray:
        model = ray.train.torch.prepare_model(model)
    dataset = PyramidTrainDataset(PyramidReader(settings["pyramid"]), "train", cfg.model.train_scales,
                                  tuple(cfg.train.crop_size), cfg.loader)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        **loader_settings(cfg.loader, settings["cpus"]))
    if in_ray:
        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    world = ray.train.get_context().get_world_size() if in_ray else 1
    total = len(dataset) * cfg.train.epochs
    seconds, walls, samples = [], [], 0
    window_start = process_cpu.snapshot()
    for epoch in range(cfg.train.epochs):
        if epoch == 1:
            window_start = process_cpu.snapshot()  # CPU shares over the epochs after the first
        started = time.perf_counter()
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, cfg.model, cfg.train, device,
                                autocast_dtype(cfg.train.precision, device), samples, total,
                                cfg.train.batch_size * world)
        samples = stats["samples"]
        seconds.append(stats["seconds"])
        if in_ray:
            ray.train.report({"epoch": epoch, "epoch_seconds": stats["seconds"]})
        walls.append(time.perf_counter() - started)
    cores = process_cpu.split_cores(window_start, process_cpu.snapshot(), settings["job_root"], os.getpid())
    epochs = {"train": seconds, "wall": walls, "cores": cores}
    if in_ray and ray.train.get_context().get_world_rank() == 0:
        # Ray Train V2 keeps metrics only with checkpoints; this benchmark runs on one machine.
        Path(settings["record"]).write_text(json.dumps(epochs))
    return epochs


def ray_fit(params: dict, pyramid: str, workers: int, cpus: int, storage: str) -> tuple[float, dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(settings):
        train_epochs(settings)

    record = Path(storage) / f"epochs-{workers}.json"
    trainer = TorchTrainer(loop, train_loop_config={"params": params, "pyramid": pyramid, "in_ray": True,
                                                    "record": str(record), "cpus": cpus,
                                                    "job_root": os.getpid()},
                           scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                                  resources_per_worker={"CPU": cpus}),
                           run_config=ray.train.RunConfig(storage_path=storage, name=f"bench-{workers}"))
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    return wall, json.loads(record.read_text())


def _ray_session():
    """A local Ray started exactly as the pipeline starts one, with the processes it has there
    (the dashboard among them), so that the overhead measured is the pipeline's."""
    import ray

    ray_session.connect(Environment.from_environ({}))  # local, whatever RAY_ADDRESS says
    return ray


def steady(epochs: dict, kind: str = "train") -> float:
    return median(epochs[kind][1:] or epochs[kind])  # the first epoch warms up


def _plain_in_child(settings: dict, queue) -> None:
    torch.set_num_threads(settings["cpus"])
    start = time.perf_counter()
    epochs = train_epochs(settings)
    queue.put((time.perf_counter() - start, epochs))


def plain_in_fresh_process(settings: dict) -> tuple[float, dict]:
    """(wall seconds, epochs) of the plain loop in a new Python process, as Ray Train runs its worker
    in one: both sides start clean, rather than the plain loop inheriting this process's earlier
    rounds and Ray driver threads."""
    return in_fresh_process(_plain_in_child, settings)


def plain_against_ray(params: dict, pyramid: str, cpus: int, storage: str) -> dict:
    """One round: the plain loop, the same epochs through Ray Train with one worker, the plain loop
    again. Ray is measured against the mean of the two plain runs around it, which cancels a drift
    of the machine's speed during the round; the second plain run over the first is the noise
    that a single comparison would carry (the control)."""
    Path(storage).mkdir(parents=True, exist_ok=True)
    settings = {"params": params, "pyramid": pyramid, "in_ray": False, "cpus": cpus, "job_root": os.getpid()}
    before_wall, before = plain_in_fresh_process(settings)
    ray = _ray_session()
    try:
        one, one_epochs = ray_fit(params, pyramid, 1, cpus, storage)
    finally:
        ray.shutdown()
    after_wall, after = plain_in_fresh_process(settings)
    plain = {"wall_s": (before_wall + after_wall) / 2, "epoch_s": (steady(before) + steady(after)) / 2,
             "epoch_wall_s": (steady(before, "wall") + steady(after, "wall")) / 2}
    return {"plain": plain, "plain_before_epoch_s": steady(before), "plain_after_epoch_s": steady(after),
            "ray_one_worker": {"wall_s": one, "epoch_s": steady(one_epochs),
                               "epoch_wall_s": steady(one_epochs, "wall")},
            "plain_after_over_before_epoch": steady(after) / steady(before),
            "ray_over_plain_wall": one / plain["wall_s"],
            "ray_over_plain_epoch": steady(one_epochs) / plain["epoch_s"],
            # The whole epoch, Ray's report included: a report waits until the controller takes the last one.
            "ray_over_plain_epoch_wall": steady(one_epochs, "wall") / plain["epoch_wall_s"],
            # Where the cores went over the steady epochs: less for the training under Ray, and
            # what Ray's own processes took, is the overhead without the machine's drift in it.
            "plain_training_cores": (before["cores"]["training_cores"] + after["cores"]["training_cores"]) / 2,
            "ray_training_cores": one_epochs["cores"]["training_cores"],
            "ray_other_cores": one_epochs["cores"]["other_cores"],
            "ray_others": one_epochs["cores"]["others"]}


def combine_rounds(paired: list[dict]) -> dict:
    """The rounds as measured, and each ratio as the median over them: a round slowed down by the
    machine moves a median far less than a mean."""
    ratios = ("ray_over_plain_wall", "ray_over_plain_epoch", "ray_over_plain_epoch_wall",
              "plain_after_over_before_epoch", "plain_training_cores", "ray_training_cores", "ray_other_cores")
    return {"rounds": paired, **{key: median([r[key] for r in paired]) for key in ratios}}


def run(params_file: str, epochs: int, images: int, rounds: int = 3) -> dict:
    cfg = load_config(params_file)
    cpus = os.cpu_count() or 2
    params = cfg.model_dump(mode="json")
    params["train"]["epochs"] = epochs
    with tempfile.TemporaryDirectory(prefix="hmsa-bench-") as tmp:
        pyramid = _pyramid(cfg, Path(tmp), images)
        paired = [plain_against_ray(params, pyramid, cpus, str(Path(tmp) / f"round-{i}")) for i in range(rounds)]
        half = dict(params, train={**params["train"], "batch_size": max(1, params["train"]["batch_size"] // 2)})
        ray = _ray_session()
        try:
            _, two_epochs = ray_fit(half, pyramid, 2, max(1, cpus // 2), tmp)
        finally:
            ray.shutdown()
    result = {"epochs": epochs, "train_images": images, "cpus": cpus, **combine_rounds(paired)}
    one_epoch = median([r["ray_one_worker"]["epoch_s"] for r in paired])
    result["ray_two_workers"] = {"epoch_s": steady(two_epochs), "epoch_wall_s": steady(two_epochs, "wall")}
    result["two_over_one_workers_speedup"] = one_epoch / steady(two_epochs)
    each = ", ".join(f"{r['ray_over_plain_epoch']:.2f}x" for r in paired)
    control = ", ".join(f"{r['plain_after_over_before_epoch']:.2f}x" for r in paired)
    print(f"  Ray Train 1 worker over the plain loop, per epoch: {result['ray_over_plain_epoch']:.2f}x (median of "
          f"{rounds} rounds: {each}); {result['ray_over_plain_epoch_wall']:.2f}x with its report, "
          f"{result['ray_over_plain_wall']:.2f}x wall with the worker start; plain loop against itself: {control}")
    busiest = ", ".join(f"{name} {cores:.3f}" for name, cores in list(paired[-1]["ray_others"].items())[:6])
    print(f"  cores used over the steady epochs (medians): training {result['plain_training_cores']:.2f} in the "
          f"plain loop, {result['ray_training_cores']:.2f} under Ray; Ray's own processes "
          f"{result['ray_other_cores']:.3f} (last round: {busiest}, ...)")
    print(f"  2 workers x {max(1, cpus // 2)} CPUs: {steady(two_epochs):.2f} s/epoch -> "
          f"{result['two_over_one_workers_speedup']:.2f}x the speed of 1 worker x {cpus} CPUs")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of plain loop and one Ray worker")
    args = parser.parse_args()
    run(args.params, args.epochs, args.images, args.rounds)


if __name__ == "__main__":
    main()
