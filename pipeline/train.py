"""Stage `train`: Ray Train on whatever cluster is configured, tracked in MLflow.

Writes the best epoch's saved model (train.output), results/train/metrics.json and curves.csv, and
logs one MLflow run per training with the model as a pyfunc. The Ray run name is stable for the
same config and data, so running the stage again after a crash resumes from the last checkpoint.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import torch

from components.atomic import atomic_dir, atomic_file
from components.config import PipelineConfig
from components.data.pyramid import PyramidReader
from components.models.saved import CONFIG_FILE, WEIGHTS_FILE
from components.storage import storage_for
from pipeline import cluster, tracking
from pipeline.common import run_stage
from pipeline.trainer import STATE_FILE, build_trainer, validation_scales


def _start_tracking(cfg: PipelineConfig, key: str, name: str, manifest: dict) -> tuple[str, str]:
    import mlflow

    experiment_id = tracking.setup_experiment(cfg.mlflow)
    tags = {"method": cfg.model.method, "train_scales": str(cfg.model.train_scales),
            "dataset": manifest["dataset"], "dataset_manifest": manifest["source_manifest"],
            "git_commit": tracking.git_commit()}
    run_id = tracking.find_or_create_run(experiment_id, key, name, tags)
    client = mlflow.MlflowClient()
    if not client.get_run(run_id).data.params:  # params are immutable: log them once per run
        params = tracking.flatten(cfg.model_dump(mode="json"))
        with mlflow.start_run(run_id=run_id):
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return tracking.tracking_uri(cfg.mlflow), run_id


def _write_outputs(cfg: PipelineConfig, result, use_gpu: bool) -> dict:
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda item: item[1]["val_miou"])
    with result.checkpoint.as_directory() as latest:
        history = torch.load(Path(latest) / STATE_FILE, map_location="cpu", weights_only=True)["history"]
    with best_checkpoint.as_directory() as best, atomic_dir(cfg.train.output) as out:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copy2(Path(best) / name, out / name)
    with atomic_file(cfg.train.curves, "w") as handle:
        fields = ["epoch", "loss", "val_miou", "lr", "images_per_s", "epoch_seconds", "step_seconds"]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    metrics = {
        "best_val_miou": best_metrics["val_miou"],
        "best_epoch": best_metrics["epoch"],
        "final_val_miou": history[-1]["val_miou"],
        "final_loss": history[-1]["loss"],
        "epochs": len(history),
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "epoch_seconds": sum(r["epoch_seconds"] for r in history) / len(history),
        "step_seconds": sum(r["step_seconds"] for r in history) / len(history),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in history),
        "replicas_in_sync": all(r["replicas_in_sync"] for r in history),
        "resumed_at_epochs": result.metrics["resumed_at_epochs"],
        "num_workers": cfg.ray.num_workers,
        "device": "gpu" if use_gpu else "cpu",
        "validation_scales": validation_scales(cfg),
    }
    with atomic_file(cfg.train.metrics, "w") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def main(cfg: PipelineConfig) -> None:
    import mlflow

    if cfg.tune.apply_to_train:
        from pipeline.tune import apply_best

        cfg = apply_best(cfg)
        print(f"training the tuned settings: method {cfg.model.method}, scales {cfg.model.train_scales}, "
              f"lr {cfg.train.lr:g}, crop {list(cfg.train.crop_size)}")

    storage = storage_for(cfg.pyramid.output, cfg.storage.s3_endpoint_url, cfg.storage.s3_region)
    manifest = PyramidReader(cfg.pyramid.output, storage).manifest
    where = cluster.connect(cfg.ray)
    use_gpu = cluster.decide_gpu(cfg.ray)
    storage_path = cluster.check_storage(cfg.ray.storage_path)
    key = cluster.run_key(cfg, manifest["source_manifest"])
    name = f"train-{cfg.model.method}-{key}"
    uri, run_id = _start_tracking(cfg, key, name, manifest)
    print(f"training {name} on {where} ({cfg.ray.num_workers} {'GPU' if use_gpu else 'CPU'} workers), "
          f"MLflow run {run_id} at {uri}")
    params = cluster.absolute_paths(cfg.model_dump(mode="json"))
    trainer = build_trainer(cfg, params, name, use_gpu, {"mlflow_uri": uri, "mlflow_run_id": run_id},
                            storage_path=storage_path)
    try:
        result = trainer.fit()
    except Exception:
        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        raise
    metrics = _write_outputs(cfg, result, use_gpu)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"best_val_miou": metrics["best_val_miou"], "images_per_s": metrics["images_per_s"]})
        mlflow.log_artifact(cfg.train.curves)
        model_uri = tracking.log_saved_model(cfg.train.output, validation_scales(cfg))
    record = {"run_id": run_id, "run_name": name, "model_uri": model_uri, "tracking_uri": uri}
    with atomic_file(cfg.train.run_record, "w") as handle:
        json.dump(record, handle, indent=2)
    print(f"best val mIoU {metrics['best_val_miou']:.4f} at epoch {metrics['best_epoch']}; "
          f"model in {cfg.train.output}")


if __name__ == "__main__":
    run_stage(main, __doc__)
