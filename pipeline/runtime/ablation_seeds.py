"""The seeds of one row of the `ablation` stage's method table (pipeline/ablation.py): each seed
trains through the same Ray Train code as the `train` stage (pipeline.runtime.training_run), is evaluated at
the row's eval scales, and leaves <output_dir>/<method>/seed-<seed>/{result.json, image_matrices.npy};
as many seeds train at once as the cluster holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.atomic import atomic_file
from components.config import PipelineConfig, ablation_config, ablation_seed_dir
from components.flops import train_step_flops
from components.memory import saved_activation_bytes
from components.models import load_saved_model
from pipeline.runtime import output_files
from pipeline.runtime.eval_workers import evaluate_all
from pipeline.runtime.training_run import run_training

IMAGE_MATRICES = "image_matrices.npy"  # one confusion matrix per val image, for the bootstrap


def seed_output_files(cfg: PipelineConfig, method: str) -> list[output_files.OutputFile]:
    """The files every seed of a method writes, to be checked before any training starts."""
    folders = [Path(ablation_seed_dir(cfg, method, seed)) for seed in cfg.ablation.seeds]
    return ([output_files.OutputFile("ablation.output_dir", seed / "result.json", output_files.SEED_RESULT)
             for seed in folders]
            + [output_files.OutputFile("ablation.output_dir", seed / IMAGE_MATRICES, output_files.NUMPY_ARRAY)
               for seed in folders])


def run_seed(cfg: PipelineConfig, method: str, seed: int) -> dict:
    """Train and evaluate one method with one seed; its result.json and per-image matrices land in
    <output_dir>/<method>/seed-<seed>/."""
    run_cfg = ablation_config(cfg, method, seed)
    run_training(run_cfg)
    model, model_cfg = load_saved_model(run_cfg.train.output)
    (row,) = evaluate_all(run_cfg, model, model_cfg, run_cfg.evaluate.scale_sets, flip=False, per_image=True)
    trained = json.loads(Path(run_cfg.train.metrics).read_text())
    crop = tuple(cfg.ablation.crop_size)
    single = run_cfg.model.model_copy(update={"method": "single", "train_scales": [1.0]})
    result = {
        "method": method,  # the table row
        "fusion": run_cfg.model.method,  # the method it trains and evaluates
        "seed": seed,
        "train_scales": run_cfg.model.train_scales,
        "eval_scales": row["scales"],
        "miou": row["miou"],
        "thin_miou": row["thin_miou"],
        "large_miou": row["large_miou"],
        "train_flops_vs_single": train_step_flops(run_cfg.model, crop) / train_step_flops(single, crop),
        "minibatch_seconds": trained["step_seconds"],
        "peak_rss_mb": trained["peak_memory_mb"],
        "activation_mb": saved_activation_bytes(run_cfg.model, crop, run_cfg.train.batch_size) / 2**20,
        "eval_gflops": row["gflops"],
        "epochs": trained["epochs"],
    }
    folder = Path(ablation_seed_dir(cfg, method, seed))
    with atomic_file(folder / IMAGE_MATRICES, output_files.NUMPY_ARRAY, "wb") as handle:
        np.save(handle, row["image_matrices"])
    with atomic_file(folder / "result.json", output_files.SEED_RESULT) as handle:
        json.dump(result, handle, indent=2)
    return result


def trainings_at_once(cfg: PipelineConfig, method: str) -> int:
    """How many of a method's seeds train at the same time: as many as the cluster holds whole
    trainings (CPUs, and GPUs when it has them), at least one. A local 2-core Ray holds one."""
    from pipeline.runtime.capacity import trainings_that_fit
    from pipeline.runtime.launch import prepare_launch

    launch = prepare_launch(ablation_config(cfg, method))  # checks services and joins Ray once
    return min(trainings_that_fit(cfg.ray, launch.use_gpu), len(cfg.ablation.seeds))


def run_seeds_concurrently(cfg: PipelineConfig, method: str, at_once: int) -> list[dict]:
    """Seeds in driver threads, each fitting its own trainer (Ray places their workers side by
    side). An interrupt of the stage disconnects from Ray, which ends the trainings in the threads
    (each run is then marked failed; a rerun resumes every seed from its last checkpoint)."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    print(f"ablation {method}: {len(cfg.ablation.seeds)} seeds, {at_once} trainings at a time")
    pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix=f"ablation-{method}")
    futures = []
    try:
        futures = [pool.submit(run_seed, cfg, method, seed) for seed in cfg.ablation.seeds]
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        ray.shutdown()
        raise
    finally:
        pool.shutdown(wait=True)


def load_method(cfg: PipelineConfig, method: str) -> tuple[list[dict], np.ndarray]:
    folder = Path(cfg.ablation.output_dir) / method
    path = folder / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro ablation` (or the run for {method!r})")
    seeds = json.loads(path.read_text())["seeds"]
    if [r["seed"] for r in seeds] != list(cfg.ablation.seeds):
        raise ValueError(f"{path} has seeds {[r['seed'] for r in seeds]}, ablation.seeds is {cfg.ablation.seeds}: "
                         "run `dvc repro ablation` again")
    matrices = np.stack([np.load(Path(ablation_seed_dir(cfg, method, r["seed"])) / IMAGE_MATRICES) for r in seeds])
    return seeds, matrices
