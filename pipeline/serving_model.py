"""The MLflow pyfunc model, defined as code (no pickle): it wraps a saved-model directory.

`predict` takes a batch of RGB uint8 images (N, H, W, 3) and the scale set as an inference
parameter, so one registered model serves any scale set the method allows:

    model = mlflow.pyfunc.load_model("models:/hmsa@champion")
    labels = model.predict(images, params={"scales": [0.5, 1.0, 2.0]})   # (N, H, W) uint8
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class MultiScaleSegmentationModel(PythonModel):
    def load_context(self, context) -> None:
        from components.models import load_saved_model

        self.model, self.cfg = load_saved_model(context.artifacts["model_dir"])  # model.metadata: classes

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        from components.data.dataset import to_tensor

        scales = [float(s) for s in (params or {}).get("scales") or self.default_scales()]
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected RGB uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        with torch.no_grad():
            batch = torch.stack([to_tensor(image) for image in images])
            labels = self.model(batch, scales).fused.argmax(1)
        return labels.to(torch.uint8).numpy()

    def default_scales(self) -> list[float]:
        return self.cfg.train_scales if self.cfg.method in ("explicit", "hierarchical") else [1.0]


mlflow.models.set_model(MultiScaleSegmentationModel())
