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

A request the model cannot serve (an undecodable image, a scale set the method does not allow)
is answered 400 with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"


class MultiScaleSegmentationModel(PythonModel):
    def load_context(self, context) -> None:
        from components.models import load_saved_model

        self.model, self.cfg = load_saved_model(context.artifacts["model_dir"])  # model.metadata: classes
        defaults = context.artifacts.get("serving_defaults")
        # models logged before the defaults were an artifact carry them in model_config
        config = json.loads(Path(defaults).read_text()) if defaults else (context.model_config or {})
        self.scales = [float(s) for s in config.get("default_scales") or self.trained_scales()]

    def predict(self, context, model_input, params: dict | None = None) -> list[np.ndarray]:
        from components.data.dataset import to_tensor
        from components.data.images import decode_image
        from components.data.pyramid import image_levels

        scales = (params or {}).get("scales") or self.scales
        try:
            scales = self.model.check_scales([float(s) for s in scales])
            images = [decode_image(bytes(data), f"row {row}")
                      for row, data in enumerate(_image_column(model_input))]
        except ValueError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None
        labels = []
        with torch.no_grad():
            for image in images:  # one at a time: images of a request may differ in size
                # the scale levels as the pyramid makes them, so the served model sees what evaluation saw
                inputs = {s: to_tensor(level)[None] for s, level in image_levels(image, scales).items()}
                labels.append(self.model(inputs, scales).fused.argmax(1)[0].to(torch.uint8).numpy())
        return labels

    def trained_scales(self) -> list[float]:
        return self.cfg.train_scales if self.cfg.method in ("explicit", "hierarchical") else [1.0]


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
