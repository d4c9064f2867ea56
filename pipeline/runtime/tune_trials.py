"""The trials of the `tune` stage's search (pipeline/tune.py): the driver function each trial runs,
the lines it prints, and the status and table row each trial ends with.

A trial is an MLflow run nested under the search's parent run; it ends with its real status
(FINISHED after its whole budget, KILLED when ASHA stopped it, FAILED on an error), set here from
Tune's own results once the search is over.
"""

from __future__ import annotations

from components.config import SEARCHABLE, PipelineConfig
from components.flops import train_step_flops
from pipeline.runtime import tracking
from pipeline.runtime.search_space import SAMPLE, trial_config

TRIAL_TAG = "hmsa.trial_id"
FAILURE_TAG = "hmsa.failure"  # why a trial's training ended in an error that a retry meets again


def driver(settings: dict, base: PipelineConfig, setup: dict) -> None:
    """One Tune trial: build and fit the shared TorchTrainer with this trial's settings."""
    import mlflow
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.runtime.trainer import build_trainer, not_retried, start_failure

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
        failure = not_retried(err) or start_failure(err, cfg.ray)
        if failure is None:
            raise
        # Settings that diverge are an answer of the search, not a failure to retry: Tune would rerun
        # the trial ray.max_failures times from its checkpoint and meet the same NaN each time. So
        # would workers that could not start ray.max_start_failures + 1 times (resources held by
        # other work), each time after as long a wait. The trial ends here; its row says it failed
        # and why (search()), it is never the best, and the search goes on with the next trials.
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


def trial_id_of(result) -> str:
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
        run = by_trial.get(trial_id_of(result))
        if run is None:
            continue
        epochs = int((result.metrics or {}).get("epoch", 0))
        failed = result.error is not None or trial_id_of(result) in failures
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
            settings = ", ".join(f"{k} {trial.config[k]}" for k in SEARCHABLE if k in trial.config)
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


def mark_running_trials_killed(experiment_id: str, parent_run_id: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                                "and attributes.status = 'RUNNING'")
    for run in running:
        client.set_terminated(run.info.run_id, status="KILLED")


def _trial_row(cfg: PipelineConfig, result, failure: str | None) -> dict:
    history = result.metrics_dataframe
    settings = {k: result.config[k] for k in SEARCHABLE if k in result.config}
    trial_cfg = trial_config(cfg, settings, "report")
    epochs = int(history["epoch"].max()) if history is not None and len(history) else 0
    failed = result.error is not None or failure is not None
    return {
        "trial": result.path.rsplit("/", 1)[-1], "sample": int(result.config.get(SAMPLE, 0)), **settings,
        "train_scale_list": trial_cfg.model.train_scales,
        "epochs": epochs, "stopped_early": int(not failed and epochs < cfg.tune.epochs),
        "failed": int(failed), "failure": failure or ("" if result.error is None else type(result.error).__name__),
        "last_val_miou": float(history["val_miou"].iloc[-1]) if epochs else float("nan"),
        "best_val_miou": float(history["val_miou"].max()) if epochs else float("nan"),
        # From the trial's start to its first epoch's report (Tune's clock): its workers' start and
        # one epoch, and any wait for resources, which a trial whose predecessor's are free at its
        # start should not have (an ended trial's reservation once held them for minutes).
        "first_epoch_after_s": float(history["time_total_s"].iloc[0]) if epochs else float("nan"),
        "train_gflops": train_step_flops(trial_cfg.model, tuple(trial_cfg.train.crop_size)) / 1e9,
    }


def finish_trials(cfg: PipelineConfig, experiment_id: str, parent_run_id: str, results) -> list[dict]:
    """After the search: every trial's MLflow run set to its real status, and one table row per trial."""
    failures = _record_trial_statuses(experiment_id, parent_run_id, results, cfg.tune.epochs)
    return [_trial_row(cfg, result, failures.get(trial_id_of(result))) for result in results]
