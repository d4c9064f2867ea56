"""Load a model for evaluation or prediction from a saved-model directory or the MLflow registry."""

from __future__ import annotations

from pathlib import Path

from components.config import ModelConfig, PipelineConfig
from components.models import MultiScaleSegmenter, load_saved_model


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/"))


def load_model(source: str, cfg: PipelineConfig) -> tuple[MultiScaleSegmenter, ModelConfig]:
    """`source` is a directory or `models:/name@alias` (through the pyfunc wrapper of training)."""
    if not is_mlflow_uri(source):
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model {source!r}: no such saved-model directory (train first, or give "
                                    "models:/name@alias)")
        return load_saved_model(source)
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.runtime.environment import Environment

    uri = Environment.from_environ().tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        wrapper = mlflow.pyfunc.load_model(source).unwrap_python_model()
    except MlflowException as err:
        raise FileNotFoundError(f"model {source!r} cannot be loaded from {uri}: "
                                f"{err.message}") from None
    return wrapper.model, wrapper.cfg
