"""The MLflow pyfunc model, defined as code (no pickle): it wraps a saved-model directory.

Input: a table with one column `image` of encoded images (PNG, JPEG, ...; base64 in JSON, as MLflow
sends binary columns). The scale set is an inference parameter; its default is the set the model
was registered with (the inference-scale search's recommendation), so one registered model serves
any scale set the method allows. Output: one label map (H x W class indices) per image.

    model = mlflow.pyfunc.load_model("models:/hmsa@champion")
    labels = model.predict(pd.DataFrame({"image": [png_bytes]}), params={"scales": [0.5, 1.0]})

Over HTTP (`mlflow models serve -m models:/hmsa@champion --env-manager local`):

    POST /invocations  {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"]]},
                        "params": {"scales": [0.5, 1.0]}}
    -> {"predictions": [[[0, 0, 13, ...], ...]]}

A request the model cannot serve (an undecodable image, a scale set the method does not allow, more
work than register.max_request_pixels: its images' pixels x the sum of its squared scales, read from
the images' headers before any is decoded) is answered 400 with the reason; a failure of the model
itself is answered 500 with one line, its traceback going to the server's log, never to the caller.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"
log = logging.getLogger(__name__)


class MultiScaleSegmentationModel(PythonModel):
    def load_context(self, context) -> None:
        from components.config import RegisterConfig
        from components.models import load_saved_model

        self.model, self.cfg = load_saved_model(context.artifacts["model_dir"])  # model.metadata: classes
        defaults = context.artifacts.get("serving_defaults")
        # models logged before the defaults were an artifact carry them in model_config
        config = json.loads(Path(defaults).read_text()) if defaults else (context.model_config or {})
        self.scales = [float(s) for s in config.get("default_scales") or self.trained_scales()]
        # models logged before the bound was part of serving.json get its default
        self.max_request_pixels = int(config.get("max_request_pixels") or RegisterConfig().max_request_pixels)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[np.ndarray]:
        try:
            scales = self.model.check_scales(_requested_scales((params or {}).get("scales"), self.scales))
            encoded = [bytes(data) for data in _image_column(model_input)]
            self.check_work(encoded, scales)
            return [self.label_map(data, f"row {row}", scales) for row, data in enumerate(encoded)]
        except ValueError as err:  # the request's fault: 400 with the reason
            raise MlflowException.invalid_parameter_value(str(err)) from None
        except Exception as err:  # ours: logged here, one line to the caller, no traceback
            log.exception("prediction failed")
            raise MlflowException(f"the model failed on this request ({type(err).__name__}); the server's log "
                                  "has the details", error_code=INTERNAL_ERROR) from None

    def check_work(self, encoded: list[bytes], scales: list[float]) -> None:
        """Refuse, from the images' headers, a request whose work (pixels x sum of squared scales)
        is above the bound: a 215-byte request at scale 200 used to take the server to gigabytes."""
        from components.data.images import declared_size

        pixels = sum(w * h for w, h in (declared_size(data, f"row {row}") for row, data in enumerate(encoded)))
        work = pixels * sum(s * s for s in scales)
        if work > self.max_request_pixels:
            raise ValueError(f"the request asks for {work:.4g} pixels of work ({pixels} image pixels x the sum of the "
                             f"squared scales {scales}); this model serves at most {self.max_request_pixels} per "
                             "request (register.max_request_pixels): send fewer or smaller images or smaller scales")

    @torch.no_grad()
    def label_map(self, data: bytes, name: str, scales: list[float]) -> np.ndarray:
        """One image decoded and predicted (one at a time: a request's images may differ in size)."""
        from components.data.dataset import to_tensor
        from components.data.images import decode_image
        from components.data.pyramid import image_levels

        image = decode_image(data, name)
        # the scale levels as the pyramid makes them, so the served model sees what evaluation saw
        inputs = {s: to_tensor(level)[None] for s, level in image_levels(image, scales).items()}
        return self.model(inputs, scales).fused.argmax(1)[0].to(torch.uint8).numpy()

    def trained_scales(self) -> list[float]:
        from components.methods import validation_scales

        return validation_scales(self.cfg.method, self.cfg.train_scales)


def _requested_scales(value, default: list[float]) -> list[float]:
    """The `scales` parameter as floats: a list of numbers (the method's rules are checked after)."""
    if value is None or (isinstance(value, (list, tuple, np.ndarray)) and len(value) == 0):
        return default
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if items is None or not all(isinstance(s, (int, float, np.number)) and not isinstance(s, bool) for s in items):
        raise ValueError(f"params.scales = {value!r}: expected a list of numbers, e.g. [0.5, 1.0]")
    return [float(s) for s in items]


def _image_column(model_input) -> list:
    if hasattr(model_input, "columns"):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a column {IMAGE_COLUMN!r} of encoded images, "
                             f"got columns {list(model_input.columns)}")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        return list(model_input[IMAGE_COLUMN])
    raise ValueError(f"the input needs a column {IMAGE_COLUMN!r} of encoded images, got {type(model_input).__name__}")


mlflow.models.set_model(MultiScaleSegmentationModel())
