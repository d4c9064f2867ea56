"""One training run, shared by the `train` stage and the ablation's runs: Ray Train on whatever
cluster is configured, tracked in MLflow.

Writes the best epoch's saved model (train.output), the metrics and curves, and logs one MLflow run
per training with the model as a pyfunc. The run is named after its code, config and data: running
again after a crash resumes from the last checkpoint; after a completed run it reuses that run's
result and says so; after any change it trains a new run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path

import torch

from components.atomic import atomic_dir, atomic_file
from components.config import PipelineConfig
from components.data.pyramid import PyramidReader
from components.models.build import training_method
from components.models.saved import CONFIG_FILE, WEIGHTS_FILE, is_saved_model
from components.redact import redact
from components.training import CURVE_COLUMNS, summarize_history
from pipeline.runtime import cluster, leftovers, output_files, tracking
from pipeline.runtime.common import ctrl_c_stays_an_interrupt
from pipeline.runtime.environment import Environment
from pipeline.runtime.errors import ClusterError
from pipeline.runtime.launch import prepare_launch
from pipeline.runtime.trainer import build_trainer, not_retried, start_failure
from pipeline.runtime.worker_loop import STATE_FILE, validation_scales


def run_training(cfg: PipelineConfig) -> None:
    """Train `cfg` on the configured Ray, or reuse the finished run of the same code, config and data;
    writes train.output, train.metrics, train.curves and train.run_record either way."""
    output_files.check_files(output_files.train_files(cfg))  # a refusal now, not after the training
    manifest = PyramidReader(cfg.pyramid.output).manifest
    launch = prepare_launch(cfg)
    key = cluster.run_key(cfg, manifest["source_manifest"])
    trained_as = training_method(cfg.model)
    name = f"train-{trained_as}-{key}"
    _, run_id, finished = _start_tracking(cfg, launch.env, key, name, manifest)
    storage_path, storage_filesystem = launch.run_storage()
    if finished is not None:
        # Same code, config and data as a completed run: its result is this stage's output.
        alike = (
            f" ({cfg.model.method} trains as {trained_as}: its fusion differs at inference only)"
            if trained_as != cfg.model.method
            else ""
        )
        print(
            f"reusing the finished run {name} (MLflow run {run_id}): same code, config and data, "
            f"nothing to train{alike}"
        )
        result = _finished_result(f"{storage_path.rstrip('/')}/{name}", storage_filesystem, run_id)
        _write_outputs(cfg, result, launch.use_gpu)
        _write_record(cfg, run_id, name, finished.data.tags[tracking.MODEL_URI_TAG], launch.env.tracking_uri)
        return
    workers = "-".join(map(str, sorted(set(cfg.ray.worker_range))))
    print(
        f"training {name} on {launch.where} ({workers} {'GPU' if launch.use_gpu else 'CPU'} workers), "
        f"MLflow run {run_id} at {redact(launch.env.tracking_uri)}"
    )
    trainer = build_trainer(cfg, launch, name, mlflow_run_id=run_id)
    # On a joined cluster, an elastic run grows only onto what no request of an ended run reserves
    # (pipeline.runtime.leftovers); a local Ray is this stage's own, and holds no other run's leftovers.
    reaper = leftovers.LeftoverReaper() if launch.env.ray_address else contextlib.nullcontext()
    with tracking.run_status(run_id), reaper:
        try:
            with ctrl_c_stays_an_interrupt():
                result = trainer.fit()
        except Exception as err:
            failure = (not_retried(err) or start_failure(err, cfg.ray)
                       or cluster.storage_failure(err, launch.env.checkpoint_root()))
            if failure is None:
                raise
            raise failure from err
        metrics = _write_outputs(cfg, result, launch.use_gpu)
        _log_completed_run(cfg, run_id, name, metrics, launch)
    print(f"best val mIoU {metrics['best_val_miou']:.4f} at epoch {metrics['best_epoch']}; model in {cfg.train.output}")


def _start_tracking(cfg: PipelineConfig, env: Environment, key: str, name: str, manifest: dict):
    """(experiment id, run id, finished run or None). A new or resumed run is RUNNING from here on."""
    import mlflow

    experiment_id = tracking.setup_experiment(env, cfg.mlflow.experiment)
    finished = tracking.finished_run(experiment_id, key)
    if finished is not None:
        return experiment_id, finished.info.run_id, finished
    tags = {"method": training_method(cfg.model), "train_scales": str(cfg.model.train_scales),
            "dataset": manifest["dataset"], "dataset_manifest": manifest["source_manifest"],
            "git_commit": tracking.git_commit(), "code": cluster.code_fingerprint()[:12]}
    run_id = tracking.find_or_create_run(experiment_id, key, name, tags)
    client = mlflow.MlflowClient()
    if not client.get_run(run_id).data.params:  # params are immutable: log them once per run
        params = tracking.flatten(cfg.model_dump(mode="json"))
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in params.items()])
    return experiment_id, run_id, None


def _finished_result(path: str, filesystem, run_id: str):
    """The Ray Train result of a finished run, which holds its history and best checkpoint."""
    from pyarrow import fs
    from ray.train import Result

    missing = (not Path(path).is_dir() if filesystem is None
               else filesystem.get_file_info(path).type == fs.FileType.NotFound)
    if missing:
        # MLflow remembers the run, but its checkpoints are gone: storage cleaned, or HMSA_STORAGE
        # now points elsewhere than when it trained. Training it again would log a second history
        # into the same MLflow run, so the user chooses.
        raise ClusterError(f"the finished run's checkpoints are not at {redact(path)} (cleaned, or HMSA_STORAGE "
                           f"changed since it trained): point HMSA_STORAGE back to where it trained, or delete "
                           f"MLflow run {run_id} (`mlflow runs delete --run-id {run_id}`) to train it again")
    return Result.from_path(path, storage_filesystem=filesystem)


def _copy_config_as(source: Path, target: Path, method: str) -> None:
    """The checkpoint's model config, for `method`: a run reused by a method that trains alike (see
    `training_method`) holds the same weights under the method that trained them."""
    document = json.loads(source.read_text())
    document["model"]["method"] = method
    target.write_text(json.dumps(document, indent=2) + "\n")


def _write_outputs(cfg: PipelineConfig, result, use_gpu: bool) -> dict:
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda item: item[1]["val_miou"])
    with result.checkpoint.as_directory() as latest:
        history = torch.load(Path(latest) / STATE_FILE, map_location="cpu", weights_only=True)["history"]
    with (
        best_checkpoint.as_directory() as best,
        atomic_dir(cfg.train.output, key="train.output", recognise=is_saved_model) as out,
    ):
        shutil.copy2(Path(best) / WEIGHTS_FILE, out / WEIGHTS_FILE)
        _copy_config_as(Path(best) / CONFIG_FILE, out / CONFIG_FILE, cfg.model.method)
    with atomic_file(cfg.train.curves, output_files.TRAINING_CURVES) as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    metrics = {
        "best_val_miou": best_metrics["val_miou"],
        "best_epoch": best_metrics["epoch"],
        **summarize_history(history),
        "resumed_at_epochs": result.metrics["resumed_at_epochs"],
        "num_workers": cfg.ray.num_workers,
        "device": "gpu" if use_gpu else "cpu",
        "validation_scales": validation_scales(cfg),
        # what the search may set (tune.apply_to_train), as trained: `dvc exp show` shows these columns
        "trained_with": {"method": cfg.model.method, "train_scales": list(cfg.model.train_scales),
                         "lr": cfg.train.lr, "crop_size": list(cfg.train.crop_size),
                         "aux_scale_weight": cfg.model.aux_scale_weight},
    }
    with atomic_file(cfg.train.metrics, output_files.TRAINING_METRICS) as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def _log_completed_run(cfg: PipelineConfig, run_id: str, name: str, metrics: dict, launch) -> None:
    """Summary metrics, curves and the pyfunc model; the run is marked complete last, so only a run
    whose outputs all exist is ever reused."""
    import time

    import mlflow

    client = mlflow.MlflowClient()
    stamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(k, float(metrics[k]), stamp, 0) for k in ("best_val_miou", "images_per_s")],
    )
    client.log_artifact(run_id, cfg.train.curves)
    with mlflow.start_run(run_id=run_id):  # log_model needs the run active
        model_uri = tracking.log_saved_model(cfg.train.output, validation_scales(cfg))
    client.set_tag(run_id, tracking.MODEL_URI_TAG, model_uri)
    _write_record(cfg, run_id, name, model_uri, launch.env.tracking_uri)
    client.set_tag(run_id, tracking.COMPLETE_TAG, "true")


def _write_record(cfg: PipelineConfig, run_id: str, name: str, model_uri: str, uri: str) -> None:
    record = {"run_id": run_id, "run_name": name, "model_uri": model_uri, "tracking_uri": redact(uri)}
    with atomic_file(cfg.train.run_record, output_files.RUN_RECORD) as handle:
        json.dump(record, handle, indent=2)
