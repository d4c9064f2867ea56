"""Stage `ablation`: the paper's method table on the configured data.

    python -m pipeline.ablation run --method hierarchical   # one method (a DVC foreach stage each)
    python -m pipeline.ablation table                       # results/ablation/table.{md,json}

Every row of ablation.methods (a method with its training and eval scales) trains through the same
Ray Train code as the `train` stage, with the same budget (ablation.epochs, crop, augmentation),
once per seed of ablation.seeds, and is evaluated at its own eval scales; rows that train alike share
their trainings. The table gives mean ± std over the seeds and, against single scale, a paired
bootstrap of the mIoU difference (components.significance).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.atomic import atomic_file
from components.config import ConfigError, PipelineConfig, ablation_config
from components.data.pyramid import PyramidReader
from components.evaluation import group_indices
from components.flops import train_step_flops
from components.memory import saved_activation_bytes
from components.method_table import SIGNIFICANCE, method_row, table_lines
from components.models import load_saved_model
from pipeline import output_files
from pipeline.common import run_stage
from pipeline.eval_workers import evaluate_all
from pipeline.training_run import run_training

SEED_DIR = "seed-{seed}"
IMAGE_MATRICES = "image_matrices.npy"  # one confusion matrix per val image, for the bootstrap


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
    folder = Path(cfg.ablation.output_dir) / method / SEED_DIR.format(seed=seed)
    with atomic_file(folder / IMAGE_MATRICES, output_files.NUMPY_ARRAY, "wb") as handle:
        np.save(handle, row["image_matrices"])
    with atomic_file(folder / "result.json", output_files.SEED_RESULT) as handle:
        json.dump(result, handle, indent=2)
    return result


def trainings_at_once(cfg: PipelineConfig, method: str) -> int:
    """How many of a method's seeds train at the same time: as many as the cluster holds whole
    trainings (CPUs, and GPUs when it has them), at least one. A local 2-core Ray holds one."""
    import ray

    from pipeline.launch import prepare_launch

    launch = prepare_launch(ablation_config(cfg, method))  # checks services and joins Ray once
    ray_cfg, resources = cfg.ray, ray.cluster_resources()
    workers = ray_cfg.worker_range[1]
    room = int(resources.get("CPU", 0) // (workers * ray_cfg.cpus_per_worker))
    if launch.use_gpu:
        room = min(room, int(resources.get("GPU", 0) // (workers * ray_cfg.gpus_per_worker)))
    return max(1, min(room, len(cfg.ablation.seeds)))


def run_method(cfg: PipelineConfig, method: str) -> list[dict]:
    """Every seed of ablation.seeds for one method (one DVC stage per method caches them together),
    as many at once as the cluster has room for; each seed is its own Ray Train run."""
    folder = Path(cfg.ablation.output_dir) / method
    seeds = [folder / SEED_DIR.format(seed=seed) for seed in cfg.ablation.seeds]
    output_files.check_files(  # a refusal now, not after the trainings
        [output_files.OutputFile("ablation.output_dir", folder / "result.json", output_files.METHOD_RESULT)]
        + [output_files.OutputFile("ablation.output_dir", seed / "result.json", output_files.SEED_RESULT)
           for seed in seeds]
        + [output_files.OutputFile("ablation.output_dir", seed / IMAGE_MATRICES, output_files.NUMPY_ARRAY)
           for seed in seeds])
    at_once = trainings_at_once(cfg, method)
    if at_once == 1:
        results = [run_seed(cfg, method, seed) for seed in cfg.ablation.seeds]
    else:
        results = _run_seeds_concurrently(cfg, method, at_once)
    with atomic_file(Path(cfg.ablation.output_dir) / method / "result.json", output_files.METHOD_RESULT) as handle:
        json.dump({"method": method, "seeds": results}, handle, indent=2)
    return results


def _run_seeds_concurrently(cfg: PipelineConfig, method: str, at_once: int) -> list[dict]:
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


def _load_method(cfg: PipelineConfig, method: str) -> tuple[list[dict], np.ndarray]:
    folder = Path(cfg.ablation.output_dir) / method
    path = folder / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro ablation` (or the run for {method!r})")
    seeds = json.loads(path.read_text())["seeds"]
    if [r["seed"] for r in seeds] != list(cfg.ablation.seeds):
        raise ValueError(f"{path} has seeds {[r['seed'] for r in seeds]}, ablation.seeds is {cfg.ablation.seeds}: "
                         "run `dvc repro ablation` again")
    matrices = np.stack([np.load(folder / SEED_DIR.format(seed=r["seed"]) / IMAGE_MATRICES) for r in seeds])
    return seeds, matrices


def summarize_methods(cfg: PipelineConfig, classes: dict) -> list[dict]:
    """Per method: mean and std over seeds of each metric, and against single scale the paired
    bootstrap of the mIoU and thin-class mIoU differences (components.method_table)."""
    loaded = {method: _load_method(cfg, method) for method in cfg.ablation.methods}
    baseline = loaded.get("single")
    return [method_row(seeds, matrices, None if baseline is None or method == "single" else baseline[1],
                       cfg.ablation.bootstrap_rounds, group_indices(classes).get("thin_small"))
            for method, (seeds, matrices) in loaded.items()]


def write_table(cfg: PipelineConfig) -> list[dict]:
    classes = PyramidReader(cfg.pyramid.output).manifest["classes"]
    rows = summarize_methods(cfg, classes)
    rounds = cfg.ablation.bootstrap_rounds
    lines = table_lines(rows, rounds)
    run = ablation_config(cfg, next(iter(cfg.ablation.methods)))  # the table's model size and loader
    model = run.model
    budget = (f"\nBudget: {cfg.ablation.epochs} epochs, crop {cfg.ablation.crop_size[0]}x{cfg.ablation.crop_size[1]}, "
              f"batch {cfg.train.batch_size}, {model.trunk} at output stride {model.output_stride} with "
              f"{model.decoder}, random scales {cfg.ablation.random_scales}, class-uniform share "
              f"{run.loader.class_uniform}, seeds {cfg.ablation.seeds}. mIoU on the val split, mean ± std over "
              "the seeds. 'mIoU vs single': the mean paired difference with its 95% interval and two-sided p "
              f"from a bootstrap over seed pairs and val images ({rounds} rounds; * marks p < {SIGNIFICANCE}). "
              "Minibatch time and peak RSS measured in the training worker; activations = bytes autograd "
              "saves for backward (one minibatch).\n")
    out = Path(cfg.ablation.output_dir)
    with atomic_file(out / "table.md", output_files.ABLATION_TABLE) as handle:
        handle.write("\n".join(lines) + "\n" + budget)
    with atomic_file(out / "table.json", output_files.ABLATION_ROWS) as handle:
        json.dump(rows, handle, indent=2)
    print("\n".join(lines))
    return rows


def main(cfg: PipelineConfig, args) -> None:
    if args.command == "run":
        if not args.method:
            raise ConfigError("ablation run needs --method (one of ablation.methods)")
        run_method(cfg, args.method)
    else:
        write_table(cfg)


def _arguments(parser) -> None:
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--method", help="with run: which entry of ablation.methods")


if __name__ == "__main__":
    run_stage(main, __doc__, _arguments)
