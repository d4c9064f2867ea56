"""The MLflow model registry as the `register` stage (pipeline/register.py) uses it: the champion
and its per-image matrices, the served model logged once per weights and scale set, aliases.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from components.config import PipelineConfig
from components.scales import scale_set_key
from pipeline.runtime import tracking


def champion(client, name: str) -> dict | None:
    version = version_by_alias(client, name, "champion")
    if version is None:
        return None
    return {"version": version.version, "miou": float(version.tags["val_miou"]),
            "gflops": float(version.tags["gflops"]), "dataset": version.tags.get("dataset_manifest", ""),
            "run_id": version.run_id, "gate_images": version.tags.get("gate_images")}


def champion_matrices(champion: dict) -> np.ndarray | None:
    """The champion's per-image confusion matrices, from its training run's artifacts (None for a
    version registered before versions kept them)."""
    import mlflow

    if not champion.get("gate_images"):
        return None
    with tempfile.TemporaryDirectory(prefix="hmsa-gate-") as directory:
        local = mlflow.artifacts.download_artifacts(run_id=champion["run_id"], artifact_path=champion["gate_images"],
                                                    dst_path=directory)
        return np.load(local)


def log_matrices(client, run_id: str, weights_sha: str, served: dict) -> str:
    """The served set's per-image matrices as an artifact of the training run, at a path of these
    weights and this set (a rerun after a kill writes the same file again); returns that path."""
    folder = f"gate/{weights_sha[:16]}-{scale_set_key(served['scales'], '_')}"
    with tempfile.TemporaryDirectory(prefix="hmsa-gate-") as directory:
        local = Path(directory) / "val_image_matrices.npy"
        np.save(local, served["image_matrices"])
        client.log_artifact(run_id, str(local), artifact_path=folder)
    return f"{folder}/{local.name}"


def served_model(client, cfg: PipelineConfig, run_id: str, scales: list[float], tags: dict[str, str]) -> str:
    """URI of the served model (the trained weights serving `scales`) logged to the training run,
    logged once: a rerun after a kill reuses the one that finished and deletes one left half-logged."""
    import mlflow

    experiment_id = client.get_run(run_id).info.experiment_id
    matching = " AND ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
    for logged in client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'served' AND {matching}"):
        if logged.status.value == "READY":
            return logged.model_uri
        client.delete_logged_model(logged.model_id)  # a kill during its upload left it unfinished
    with mlflow.start_run(run_id=run_id):
        return tracking.log_saved_model(cfg.train.output, scales, name="served", tags=tags,
                                        max_request_pixels=cfg.register.max_request_pixels)


def logged_model_id(version) -> str:
    """The logged model a registry version was made from: MLflow 3 names it in the version's source
    (`models:/<model id>`; the version's own model_id field stays empty for a registered URI)."""
    return version.model_id or version.source.removeprefix("models:/")


def version_by_alias(client, name: str, alias: str):
    """The model version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
