"""MLflow helpers: where to track, one run per training (found again by a stable key), the model.

Embedded default: `sqlite:///mlflow.db` with a local artifact folder; a configured tracking URI
(params mlflow.tracking_uri or MLFLOW_TRACKING_URI) points the same code at a real server.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from components.config import MlflowConfig

RUN_KEY_TAG = "hmsa.run_key"


def tracking_uri(cfg: MlflowConfig) -> str:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Absolute, so Ray workers in other directories write to the same database.
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def setup_experiment(cfg: MlflowConfig) -> str:
    """Point mlflow at the tracking URI and return the experiment id (created when missing)."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    local = uri.startswith("sqlite:") or uri.startswith("file:")
    location = Path(cfg.artifact_location).resolve().as_uri() if local else None
    return mlflow.create_experiment(cfg.experiment, artifact_location=location)


def find_or_create_run(experiment_id: str, run_key: str, run_name: str, tags: dict) -> str:
    """The run id for `run_key`: the existing run when a training resumes, else a new run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    return run.info.run_id


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_epoch(uri: str, run_id: str, metrics: dict, step: int) -> None:
    """Log one epoch's metrics from a training worker (rank 0)."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    MlflowClient(uri).log_batch(run_id, metrics=batch)


def log_saved_model(model_dir: str | Path, default_scales: list[float]) -> str:
    """Log a saved-model directory as a pyfunc model (code, not pickle) to the active run."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    root = Path(__file__).resolve().parent.parent
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        params=ParamSchema([ParamSpec("scales", "double", default_scales, shape=(-1,))]),
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(root / "pipeline" / "serving_model.py"),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(root / "components")],
        signature=signature,
        pip_requirements=["torch==2.13.0", "safetensors", "pydantic>=2", "numpy", "pyyaml", "pillow",
                          "albumentations", "opencv-python-headless"],
    )
    return info.model_uri
