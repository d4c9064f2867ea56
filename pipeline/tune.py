"""Stage `tune`: Ray Tune searches training scale sets and hyperparameters (the inference scale
sets of a trained model are the `eval-scales` stage, pipeline/eval_scales.py).

    python -m pipeline.tune        # results/tune/{trials.csv, best.yaml}

Each trial is a driver function that builds and fits the same TorchTrainer as the `train` stage
(pipeline.trainer.build_trainer) and reports to Tune through TuneReportCallback; ASHA stops weak
trials early. Every trial is an MLflow run nested under one parent run for the search, and ends
with its real status (FINISHED, KILLED when ASHA stopped it, FAILED). The search is named after its
code, config and data: running the stage again after an interruption restores it; after a
completed search it is reused (and says so); after any change a new search starts.
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from components.atomic import atomic_file
from components.config import SEARCH_KEYS, PipelineConfig
from components.data.pyramid import PyramidReader
from components.flops import train_step_flops
from pipeline import cluster, leftovers, output_files, tracking
from pipeline.common import ctrl_c_stays_an_interrupt, run_stage
from pipeline.launch import prepare_launch
from pipeline.search_space import SEARCHED, check_search_space, search_space, trial_config

TRIAL_TAG = "hmsa.trial_id"
FAILURE_TAG = "hmsa.failure"  # why a trial's training ended in an error that a retry meets again


def driver(settings: dict, base: PipelineConfig, setup: dict) -> None:
    """One Tune trial: build and fit the shared TorchTrainer with this trial's settings."""
    import mlflow
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.trainer import build_trainer, not_retried

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, settings, trial_id)
    launch = setup["launch"]
    mlflow.set_tracking_uri(launch.env.tracking_uri)
    run_id = tracking.find_or_create_run(setup["experiment_id"], f"{setup['key']}-{trial_id}", f"trial-{trial_id}",
                                         {"mlflow.parentRunId": setup["parent_run_id"], TRIAL_TAG: trial_id,
                                          "method": cfg.model.method, "train_scales": str(cfg.model.train_scales)})
    mlflow.MlflowClient().log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in settings.items()])
    class NumbersToTune(TuneReportCallback):
        """Tune's loggers (TensorBoard's among them) take numbers: a list in a report (the nodes an
        epoch trained on) warned on every epoch. The lists stay in Ray Train's own results."""

        def after_report(self, run_context, metrics, checkpoint):
            numbers = [{k: v for k, v in m.items() if not isinstance(v, (list, tuple, dict))} for m in metrics]
            super().after_report(run_context, numbers, checkpoint)

    trainer = build_trainer(cfg, launch, f"{setup['name']}-{trial_id}", mlflow_run_id=run_id,
                            callbacks=[NumbersToTune()])
    try:
        trainer.fit()
    except Exception as err:
        failure = not_retried(err)
        if failure is None:
            raise
        # Settings that diverge are an answer of the search, not a failure to retry: Tune would rerun
        # the trial ray.max_failures times from its checkpoint and meet the same NaN each time. The
        # trial ends here; its row says it failed and why (search()), and it is never the best.
        mlflow.MlflowClient().set_tag(run_id, FAILURE_TAG, str(failure))
        print(f"trial {trial_id} failed: {failure}")
        # Tune wants the searched metric in a trial's last result: NaN, no value (ASHA's rungs start at
        # epoch tune.grace_period >= 1, so this epoch-0 result is never compared)
        tune.report({"epoch": 0, "val_miou": float("nan")})
        return
    # Only success is recorded here. A trial that ASHA stops or that fails ends in search(), from
    # Tune's own result once the search is over: marking it here, a stopping trial's last moments
    # could land after that and overwrite KILLED with FAILED.
    mlflow.MlflowClient().set_terminated(run_id, status="FINISHED")


def concurrent_trials(cfg: PipelineConfig, use_gpu: bool) -> int:
    """How many trials fit on the cluster at once, so trial drivers never wait for workers."""
    import ray

    resources = ray.cluster_resources()
    per_trial = cfg.ray.worker_range[1]
    fits = resources.get("CPU", 0) // (per_trial * cfg.ray.cpus_per_worker)
    if use_gpu:
        fits = min(fits, resources.get("GPU", 0) // (per_trial * cfg.ray.gpus_per_worker))
    return max(1, int(fits))


def _trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id") or result.path.rsplit("/", 1)[-1].split("_", 1)[-1])


def _record_trial_statuses(experiment_id: str, parent_run_id: str, results, max_epochs: int) -> dict[str, str]:
    """Every trial's MLflow run ends with its real status: FINISHED after its whole budget, KILLED
    when ASHA stopped it early (its process was ended before it could say so), FAILED on error or
    on an error a retry meets again (FAILURE_TAG). Returns those trials' reasons, by trial id."""
    from mlflow import MlflowClient

    client = MlflowClient()
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    by_trial = {run.data.tags.get(TRIAL_TAG): run for run in children}
    failures = {trial: run.data.tags[FAILURE_TAG] for trial, run in by_trial.items() if FAILURE_TAG in run.data.tags}
    for result in results:
        run = by_trial.get(_trial_id(result))
        if run is None:
            continue
        epochs = int((result.metrics or {}).get("epoch", 0))
        failed = result.error is not None or _trial_id(result) in failures
        status = "FAILED" if failed else ("FINISHED" if epochs >= max_epochs else "KILLED")
        if run.info.status != status:
            client.set_terminated(run.info.run_id, status=status)
    return failures


def trial_lines(max_epochs: int):
    """A Tune callback that prints one line when a trial starts (its searched settings) and one
    when it ends (epochs trained, its last val mIoU, whether ASHA stopped it early)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            settings = ", ".join(f"{k} {trial.config[k]}" for k in SEARCHED if k in trial.config)
            print(f"trial {trial.trial_id} started: {settings}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            epochs = int(result.get("epoch", 0))
            if not epochs:  # a training that failed in a way no retry mends reports epoch 0 (driver())
                print(f"trial {trial.trial_id} ended without a trained epoch", flush=True)
                return
            early = " (stopped early by ASHA)" if epochs < max_epochs else ""
            print(f"trial {trial.trial_id} ended after {epochs} of {max_epochs} epochs, val mIoU "
                  f"{result.get('val_miou', float('nan')):.4f}{early}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            epochs = int((trial.last_result or {}).get("epoch", 0))
            print(f"trial {trial.trial_id} ended in an error after {epochs} of {max_epochs} epochs", flush=True)

    return TrialLines()


def search_key(cfg: PipelineConfig, dataset_fingerprint: str) -> str:
    """The search's identity: what its trials compute, i.e. the base config under the trial budget
    (tune.epochs, not train.epochs) and the search's own keys (SEARCH_KEYS; the inference-scale
    candidates are another stage's). Same key: a finished search is reused, an interrupted one resumed."""
    searched = cfg.tune.model_dump(mode="json", include=set(SEARCH_KEYS))
    return cluster.run_key(trial_config(cfg, {}, "budget"), f"{dataset_fingerprint}:tune:{searched!r}")


def search(cfg: PipelineConfig) -> list[dict]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    check_search_space(cfg)
    manifest = PyramidReader(cfg.pyramid.output).manifest
    launch = prepare_launch(cfg)
    name = f"tune-{search_key(cfg, manifest['source_manifest'])}"
    experiment_id = tracking.setup_experiment(launch.env, cfg.mlflow.experiment)
    finished = tracking.finished_run(experiment_id, name)
    parent_run_id = finished.info.run_id if finished else tracking.find_or_create_run(
        experiment_id, name, name, {"stage": "tune"})
    setup = {"key": name, "name": name, "launch": launch, "experiment_id": experiment_id,
             "parent_run_id": parent_run_id}
    # The driver only coordinates; its Train workers hold the CPUs/GPUs. A trial must request
    # something, so it asks for a token amount of memory and no CPU (else it would block its workers).
    trainable = tune.with_resources(tune.with_parameters(driver, base=cfg, setup=setup),
                                    tune.PlacementGroupFactory([{"CPU": 0, "memory": 2**20}]))
    storage_path, storage_filesystem = launch.run_storage()
    path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage_filesystem):
        print(f"reusing the finished search at {path}: same code, config and data" if finished else
              f"resuming the interrupted search at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_filesystem)
    else:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.tune.epochs, grace_period=cfg.tune.grace_period,
                                  reduction_factor=cfg.tune.reduction_factor)
        concurrency = concurrent_trials(cfg, launch.use_gpu)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(metric="val_miou", mode="max", scheduler=scheduler,
                                        num_samples=cfg.tune.num_samples,
                                        # The generator enforces the limit (Tune ignores
                                        # max_concurrent_trials for a BasicVariantGenerator given here).
                                        search_alg=BasicVariantGenerator(random_state=cfg.tune.seed,
                                                                         max_concurrent=concurrency)),
            # A trial whose driver dies (a node lost, a Ray process crashing) restarts from its last
            # checkpoint instead of failing the search.
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                      failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                                      # Tune's own tables (a status table every 30 s, one per trial
                                      # start and end) were 40% of the main job's log: one line per
                                      # trial start and end instead; the epochs have their own lines.
                                      verbose=0, callbacks=[trial_lines(cfg.tune.epochs)]),
        )
    with tracking.run_status(parent_run_id):
        # Trials are stopped while their training runs; what a stopped trial's training leaves must
        # not hold the resources the next trials wait for (pipeline.leftovers).
        try:
            with leftovers.LeftoverReaper(), ctrl_c_stays_an_interrupt():
                results = tuner.fit()
        except KeyboardInterrupt:  # the search resumes on the next run; its trials stopped now
            _mark_running_trials_killed(experiment_id, parent_run_id)
            raise
        failures = _record_trial_statuses(experiment_id, parent_run_id, results, cfg.tune.epochs)
        rows = [_trial_row(cfg, result, failures.get(_trial_id(result))) for result in results]
        from mlflow import MlflowClient

        MlflowClient().set_tag(parent_run_id, tracking.COMPLETE_TAG, "true")
    return rows


def _mark_running_trials_killed(experiment_id: str, parent_run_id: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                                "and attributes.status = 'RUNNING'")
    for run in running:
        client.set_terminated(run.info.run_id, status="KILLED")


def _trial_row(cfg: PipelineConfig, result, failure: str | None) -> dict:
    history = result.metrics_dataframe
    settings = {k: result.config[k] for k in SEARCHED if k in result.config}
    trial_cfg = trial_config(cfg, settings, "report")
    epochs = int(history["epoch"].max()) if history is not None and len(history) else 0
    failed = result.error is not None or failure is not None
    return {
        "trial": result.path.rsplit("/", 1)[-1], **settings,
        "train_scale_list": trial_cfg.model.train_scales,
        "epochs": epochs, "stopped_early": int(not failed and epochs < cfg.tune.epochs),
        "failed": int(failed), "failure": failure or ("" if result.error is None else type(result.error).__name__),
        "last_val_miou": float(history["val_miou"].iloc[-1]) if epochs else float("nan"),
        "best_val_miou": float(history["val_miou"].max()) if epochs else float("nan"),
        "train_gflops": train_step_flops(trial_cfg.model, tuple(trial_cfg.train.crop_size)) / 1e9,
    }


def write_search_outputs(cfg: PipelineConfig, rows: list[dict]) -> dict:
    finished = [r for r in rows if not r["failed"] and r["epochs"]]
    if not finished:
        raise RuntimeError(f"every one of the {len(rows)} trials failed; see the Ray logs above")
    best = max(finished, key=lambda r: r["best_val_miou"])
    out = Path(cfg.tune.output_dir)
    with atomic_file(out / "trials.csv", output_files.TRIALS) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    chosen = {k: best[k] for k in SEARCHED if k in best}
    document = {"trial": best["trial"], "best_val_miou": best["best_val_miou"], "settings": chosen,
                "train_scales": best["train_scale_list"]}
    with atomic_file(out / "best.yaml", output_files.BEST_TRIAL) as handle:
        yaml.safe_dump(document, handle, sort_keys=False)
    return document


def main(cfg: PipelineConfig) -> None:
    output_files.check_files(output_files.tune_files(cfg))  # a refusal now, not after the search
    best = write_search_outputs(cfg, search(cfg))
    print(f"best trial {best['trial']}: val mIoU {best['best_val_miou']:.4f} with {best['settings']}")


if __name__ == "__main__":
    run_stage(main, __doc__)
