"""Stage `tune`: Ray Tune searches training scale sets and hyperparameters; `eval-scales` searches
inference scale sets of a trained model (no retraining).

    python -m pipeline.tune search        # results/tune/{trials.csv, best.yaml}
    python -m pipeline.tune eval-scales   # results/tune/{eval_scales.csv, eval_scales.yaml}

Each trial is a driver function that builds and fits the same TorchTrainer as the `train` stage
(pipeline.trainer.build_trainer) and reports to Tune through TuneReportCallback; ASHA stops weak
trials early. Every trial is an MLflow run nested under one parent run for the search. Running
the stage again after an interruption restores the search from its storage path.
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from components.atomic import atomic_file
from components.config import PipelineConfig, SearchSpec, validate_config, with_overrides
from components.flops import train_step_flops
from pipeline import cluster, tracking
from pipeline.common import run_stage

SEARCHED = ("train_scales", "lr", "crop_size", "aux_scale_weight", "method")


def trial_config(cfg: PipelineConfig, settings: dict, trial: str) -> PipelineConfig:
    """The full config of one trial: searched settings and the trial budget over the base config."""
    model, train = {}, {"epochs": cfg.tune.epochs, "steps_per_epoch": cfg.tune.steps_per_epoch}
    if "train_scales" in settings:
        model["train_scales"] = cfg.tune.train_scale_sets[settings["train_scales"]]
    for key, section in (("method", model), ("aux_scale_weight", model), ("lr", train), ("crop_size", train)):
        if key in settings:
            section[key] = list(settings[key]) if key == "crop_size" else settings[key]
    return with_overrides(cfg, {"model": model, "train": train, "tune": {"apply_to_train": False}},
                          source=f"tune trial {trial}")


def _space(spec: SearchSpec):
    from ray import tune

    if spec.grid is not None:
        return tune.grid_search(spec.grid)
    if spec.choice is not None:
        return tune.choice(spec.choice)
    if spec.loguniform is not None:
        return tune.loguniform(*spec.loguniform)
    return tune.uniform(*spec.uniform)


def check_search_space(cfg: PipelineConfig) -> None:
    """Validate a trial config for every discrete combination before any trial starts."""
    discrete = {k: (s.choice or s.grid) for k, s in cfg.tune.search.items() if (s.choice or s.grid)}
    combos = [{}]
    for key, values in discrete.items():
        combos = [{**c, key: v} for c in combos for v in values]
    for combo in combos:
        trial_config(cfg, combo, f"settings {combo}")


def driver(settings: dict, base: PipelineConfig, setup: dict) -> None:
    """One Tune trial: build and fit the shared TorchTrainer with this trial's settings."""
    import mlflow
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, settings, trial_id)
    mlflow.set_tracking_uri(setup["mlflow_uri"])
    run_id = tracking.find_or_create_run(setup["experiment_id"], f"{setup['key']}-{trial_id}", f"trial-{trial_id}",
                                         {"mlflow.parentRunId": setup["parent_run_id"], "method": cfg.model.method,
                                          "train_scales": str(cfg.model.train_scales)})
    mlflow.MlflowClient().log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in settings.items()])
    params = cluster.absolute_paths(cfg.model_dump(mode="json"))
    trainer = build_trainer(cfg, params, f"{setup['name']}-{trial_id}", setup["use_gpu"],
                            {"mlflow_uri": setup["mlflow_uri"], "mlflow_run_id": run_id},
                            callbacks=[TuneReportCallback()], storage_path=setup["storage_path"])
    trainer.fit()
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")


def concurrent_trials(cfg: PipelineConfig, use_gpu: bool) -> int:
    """How many trials fit on the cluster at once, so trial drivers never wait for workers."""
    import ray

    resources = ray.cluster_resources()
    fits = resources.get("CPU", 0) // (cfg.ray.num_workers * cfg.ray.cpus_per_worker)
    if use_gpu:
        fits = min(fits, resources.get("GPU", 0) // (cfg.ray.num_workers * cfg.ray.gpus_per_worker))
    return max(1, int(fits))


def search(cfg: PipelineConfig) -> list[dict]:
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    check_search_space(cfg)
    # Tune runs each trial in a working directory of its own: hand the trials absolute paths.
    cfg = validate_config(cluster.absolute_paths(cfg.model_dump(mode="json")), source="params (absolute paths)")
    cluster.connect(cfg.ray)
    use_gpu = cluster.decide_gpu(cfg.ray)
    storage_path = cluster.check_storage(cfg.ray.storage_path)
    key = cluster.run_key(cfg, "tune:" + repr(cfg.tune.model_dump(mode="json")))
    name = f"tune-{key}"
    experiment_id = tracking.setup_experiment(cfg.mlflow)
    parent_run_id = tracking.find_or_create_run(experiment_id, name, name, {"stage": "tune"})
    setup = {"key": name, "name": name, "use_gpu": use_gpu, "storage_path": storage_path,
             "mlflow_uri": tracking.tracking_uri(cfg.mlflow), "experiment_id": experiment_id,
             "parent_run_id": parent_run_id}
    # The driver only coordinates; its Train workers hold the CPUs/GPUs. A trial must request
    # something, so it asks for a token amount of memory and no CPU (else it would block its workers).
    trainable = tune.with_resources(tune.with_parameters(driver, base=cfg, setup=setup),
                                    tune.PlacementGroupFactory([{"CPU": 0, "memory": 2**20}]))
    path = str(Path(storage_path) / name) if "://" not in storage_path else f"{storage_path}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"resuming the interrupted search at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.tune.epochs, grace_period=cfg.tune.grace_period,
                                  reduction_factor=cfg.tune.reduction_factor)
        concurrency = concurrent_trials(cfg, use_gpu)
        tuner = tune.Tuner(
            trainable,
            param_space={k: _space(s) for k, s in cfg.tune.search.items()},
            tune_config=tune.TuneConfig(metric="val_miou", mode="max", scheduler=scheduler,
                                        num_samples=cfg.tune.num_samples,
                                        # The generator enforces the limit (Tune ignores
                                        # max_concurrent_trials for a BasicVariantGenerator given here).
                                        search_alg=BasicVariantGenerator(random_state=cfg.tune.seed,
                                                                         max_concurrent=concurrency)),
            run_config=tune.RunConfig(name=name, storage_path=storage_path),
        )
    results = tuner.fit()
    rows = []
    for result in results:
        history = result.metrics_dataframe
        settings = {k: result.config[k] for k in SEARCHED if k in result.config}
        trial_cfg = trial_config(cfg, settings, "report")
        epochs = int(history["epoch"].max()) if history is not None and len(history) else 0
        rows.append({
            "trial": result.path.rsplit("/", 1)[-1], **settings,
            "train_scale_list": trial_cfg.model.train_scales,
            "epochs": epochs, "stopped_early": int(result.error is None and epochs < cfg.tune.epochs),
            "failed": int(result.error is not None),
            "last_val_miou": float(history["val_miou"].iloc[-1]) if epochs else float("nan"),
            "best_val_miou": float(history["val_miou"].max()) if epochs else float("nan"),
            "train_gflops": train_step_flops(trial_cfg.model, tuple(trial_cfg.train.crop_size)) / 1e9,
        })
    mlflow.MlflowClient().set_terminated(parent_run_id, "FINISHED")
    return rows


def write_search_outputs(cfg: PipelineConfig, rows: list[dict]) -> dict:
    finished = [r for r in rows if not r["failed"] and r["epochs"]]
    if not finished:
        raise RuntimeError(f"every one of the {len(rows)} trials failed; see the Ray logs above")
    best = max(finished, key=lambda r: r["best_val_miou"])
    out = Path(cfg.tune.output_dir)
    with atomic_file(out / "trials.csv", "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    chosen = {k: best[k] for k in SEARCHED if k in best}
    document = {"trial": best["trial"], "best_val_miou": best["best_val_miou"], "settings": chosen,
                "train_scales": best["train_scale_list"]}
    with atomic_file(out / "best.yaml", "w") as handle:
        yaml.safe_dump(document, handle, sort_keys=False)
    return document


def apply_best(cfg: PipelineConfig) -> PipelineConfig:
    """The train stage's config with the best trial's settings (tune.apply_to_train)."""
    path = Path(cfg.tune.output_dir) / "best.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the tune stage first, or set tune.apply_to_train: false")
    settings = yaml.safe_load(path.read_text())["settings"]
    tuned = trial_config(cfg, settings, str(path))
    # Keep the train stage's own budget; take only the searched settings.
    return with_overrides(tuned, {"train": {"epochs": cfg.train.epochs,
                                            "steps_per_epoch": cfg.train.steps_per_epoch}}, source=str(path))


def main(cfg: PipelineConfig, args) -> None:
    if args.command == "search":
        best = write_search_outputs(cfg, search(cfg))
        print(f"best trial {best['trial']}: val mIoU {best['best_val_miou']:.4f} with {best['settings']}")
    else:
        from pipeline.eval_scales import search_eval_scales

        search_eval_scales(cfg)


def _arguments(parser) -> None:
    parser.add_argument("command", choices=["search", "eval-scales"])


if __name__ == "__main__":
    run_stage(main, __doc__, _arguments)
