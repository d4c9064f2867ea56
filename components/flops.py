"""FLOPs of inference and of a training step, counted by torch.utils.flop_counter.

The model is built on the `meta` device, so counting a ResNet-50 at 2048x4096 allocates no
memory and runs no arithmetic: only shapes flow through the network. A training step is the
forward pass, the method's loss and the backward pass, with the method's training scales.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from components.config import ModelConfig
from components.losses import segmentation_loss
from components.models.build import build_model


def count_flops(build: Callable[[], nn.Module], run: Callable[[nn.Module, torch.Tensor, torch.Tensor], None],
                image_size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of `run(model, image, target)` for the model `build()` makes, with a batch of images
    of `image_size` and their labels, all on the meta device (a multiply-add counts as 2)."""
    with torch.device("meta"):
        model = build()
        image = torch.empty(batch, 3, *image_size)
        target = torch.zeros(batch, *image_size, dtype=torch.int64)
    counter = FlopCounterMode(display=False)
    with counter:
        run(model, image, target)
    return counter.get_total_flops()


def _count(cfg: ModelConfig, scales: list[float], image_size: tuple[int, int], train: bool, batch: int) -> int:
    def run(model: nn.Module, image: torch.Tensor, target: torch.Tensor) -> None:
        model.train(train)
        if train:
            segmentation_loss(model(image, scales), target, cfg).backward()
        else:
            with torch.no_grad():
                model(image, scales)

    return count_flops(lambda: build_model(cfg.model_copy(update={"pretrained": None})), run, image_size, batch)


def inference_flops(cfg: ModelConfig, scales: list[float], image_size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of one forward pass over `scales` (a multiply-add counts as 2)."""
    return _count(cfg, scales, image_size, train=False, batch=batch)


def train_step_flops(cfg: ModelConfig, image_size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of forward + loss + backward at the method's training scales."""
    return _count(cfg, cfg.train_scales, image_size, train=True, batch=batch)
