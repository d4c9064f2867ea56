"""Losses for the five methods; models return tensors and the loss is computed here.

- every method: cross-entropy (ignore 255) on the fused logits;
- hierarchical: plus `aux_scale_weight` x cross-entropy of each scale's own logits (Tao et al.);
- explicit: plus `explicit_scale_weight` x cross-entropy of each scale's own logits (the extra
  per-scale supervision of Chen et al. 2016).
Per-scale logits are resized to the label's resolution, so the label is never interpolated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.config import ModelConfig
from components.models.fusion import resize
from components.models.multiscale import MultiScaleOutput

IGNORE_INDEX = 255


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels; 0 (with a gradient) when a batch has none."""
    logits = resize(logits, target.shape[-2:]).float()
    total = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


def segmentation_loss(output: MultiScaleOutput, target: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    loss = cross_entropy(output.fused, target)
    per_scale_weight = {"hierarchical": cfg.aux_scale_weight, "explicit": cfg.explicit_scale_weight}.get(cfg.method, 0.0)
    if per_scale_weight > 0:
        for logits in output.logits.values():
            loss = loss + per_scale_weight * cross_entropy(logits, target)
    return loss
