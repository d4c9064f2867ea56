"""MLflow helpers: one run per training (found again by a stable key), its status, the model.

Where to track is environment (MLFLOW_TRACKING_URI, see pipeline/runtime/environment.py). Embedded
default: `sqlite:///mlflow.db` with artifacts next to it. With a server, artifacts go through the
server to its artifact store (S3 on a cluster).

A run's status is true: RUNNING while training, then FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from components.config import RegisterConfig
from components.redact import redact
from pipeline.runtime.environment import Environment

RUN_KEY_TAG = "hmsa.run_key"
MODEL_URI_TAG = "hmsa.model_uri"
COMPLETE_TAG = "hmsa.complete"  # set last, when a run's outputs are all recorded: it can be reused


def setup_experiment(env: Environment, experiment: str) -> str:
    """Point mlflow at the tracking URI and return the experiment id (created when missing)."""
    import mlflow

    mlflow.set_tracking_uri(env.tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(experiment, artifact_location=env.local_artifact_location())


def run_with_key(experiment_id: str, run_key: str):
    """The run of `run_key` whatever its status, or None."""
    from mlflow import MlflowClient

    found = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       max_results=1)
    return found[0] if found else None


def finished_run(experiment_id: str, run_key: str):
    """The completed run of `run_key` (FINISHED, and marked complete after its outputs), or None."""
    found = run_with_key(experiment_id, run_key)
    if found and found.info.status == "FINISHED" and found.data.tags.get(COMPLETE_TAG) == "true":
        return found
    return None


def find_or_create_run(experiment_id: str, run_key: str, run_name: str, tags: dict) -> str:
    """The run id for `run_key`: the existing run when a training resumes, else a new run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        if found[0].info.status != "RUNNING":  # resumed after a failure or a kill: running again
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    return run.info.run_id


def flatten(tree: dict, prefix: str = "") -> dict:
    """A config tree as {dotted.key: value} for MLflow params; values that could hold a credential
    (strings) are redacted."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = redact(value) if isinstance(value, str) else value
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


SERVING_DEFAULTS_FILE = "serving.json"  # {"default_scales": [...], "max_request_pixels": N}, beside the model


def log_saved_model(model_dir: str | Path, default_scales: list[float], name: str = "model",
                    tags: dict[str, str] | None = None, max_request_pixels: int | None = None) -> str:
    """Log a saved-model directory as a pyfunc model (code, not pickle) to the active run.

    `default_scales` is the scale set a caller gets without passing one (the `scales` parameter);
    `max_request_pixels` bounds one request's work (register.max_request_pixels; its default if None).
    It travels as an artifact of the model, not as MLflow's model_config: MLflow also logs a
    model_config as params of the run, and a run that logs its trained model and later the served
    one (another default set) then fails to change the param, with a warning on a run that succeeds."""
    import tempfile

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    root = Path(__file__).resolve().parents[2]
    default_scales = [float(s) for s in default_scales]
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),  # encoded images; base64 in JSON requests
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1), "labels")]),  # one H x W map per image
        params=ParamSchema([ParamSpec("scales", "double", default_scales, shape=(-1,))]),
    )
    with tempfile.TemporaryDirectory(prefix="hmsa-serving-") as folder:
        defaults = Path(folder) / SERVING_DEFAULTS_FILE
        bound = max_request_pixels or RegisterConfig().max_request_pixels
        defaults.write_text(json.dumps({"default_scales": default_scales, "max_request_pixels": bound}))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(root / "pipeline" / "runtime" / "serving_model.py"),
            artifacts={"model_dir": str(model_dir), "serving_defaults": str(defaults)},
            code_paths=[str(root / "components")],
            signature=signature,
            # MLflow predicts on the example when it logs the model: a model that cannot load or
            # answer fails here, not when it is first served
            input_example=_input_example(),
            metadata=_model_metadata(model_dir),
            tags=tags,
            pip_requirements=["torch==2.13.0", "safetensors", "pydantic>=2", "numpy", "pyyaml", "pillow",
                              "albumentations", "opencv-python-headless", "pandas"],
        )
    return info.model_uri


def _input_example():
    """A request of one 64x64 PNG (a colour ramp), what a caller of the served model sends."""
    import cv2
    import numpy as np
    import pandas as pd

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    image = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)], -1)
    return pd.DataFrame({"image": [cv2.imencode(".png", image)[1].tobytes()]})


def _model_metadata(model_dir: str | Path) -> dict:
    """What a caller needs to read the label maps: the class of each index, and the method and
    scales it was trained with (from the saved model's config.json)."""
    from components.models.saved import read_saved_config

    model_cfg, metadata = read_saved_config(model_dir)
    return {"method": model_cfg.method, "train_scales": list(model_cfg.train_scales),
            "num_classes": model_cfg.num_classes, "class_names": (metadata.get("classes") or {}).get("names")}


@contextlib.contextmanager
def run_status(run_id: str):
    """Mark the run FINISHED when the block completes, FAILED on an error, KILLED on an interrupt
    (Ctrl-C or SIGTERM, which run_stage turns into SystemExit)."""
    from mlflow import MlflowClient

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        MlflowClient().set_terminated(run_id, status="KILLED")
        raise
    except BaseException:
        MlflowClient().set_terminated(run_id, status="FAILED")
        raise
    MlflowClient().set_terminated(run_id, status="FINISHED")
