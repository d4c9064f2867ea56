"""Training memory measured by what autograd keeps for the backward pass.

Activations saved for backward dominate a segmentation network's training memory and are what
multi-scale training multiplies. They are counted exactly, on the CPU, with saved-tensor hooks:
every distinct storage saved during one forward pass and loss, parameters excluded.
"""

from __future__ import annotations

import torch

from components.config import ModelConfig
from components.losses import segmentation_loss
from components.models import build_model


def saved_activation_bytes(cfg: ModelConfig, crop: tuple[int, int], batch: int = 2) -> int:
    torch.manual_seed(0)
    model = build_model(cfg.model_copy(update={"pretrained": None})).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    image = torch.randn(batch, 3, *crop)
    target = torch.randint(0, cfg.num_classes, (batch, *crop))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        segmentation_loss(model(image), target, cfg)
    return sum(seen.values())
