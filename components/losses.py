"""Losses for the five methods; models return tensors and the loss is computed here.

- every method: on the fused logits, cross-entropy (ignore 255) or, with `train.loss: rmi`, the
  region mutual information loss (Zhao et al. 2019) that the reference implementation of
  hierarchical attention trains with: half sigmoid binary cross-entropy, half RMI lower bound;
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
    count = (target != ignore_index).sum().clamp(min=1)
    if logits.is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous():
        # Channels-last logits (the training default) are a (pixels, classes) matrix already: over
        # its last dimension, cross-entropy reads them in place; over dimension 1 it first copied
        # them to NCHW and the gradient back (about half of the loss's time on CPU).
        logits, target = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), target.reshape(-1)
    total = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")
    return total / count


# RMI as in its paper and reference code: 3x3 pixel neighbourhoods, on maps average-pooled by 3
# (stride 3, padding 1) to bound the cost; a 5e-4 ridge keeps the 9x9 covariances invertible.
RMI_RADIUS, RMI_POOL, RMI_RIDGE, RMI_BCE_SHARE = 3, 3, 5e-4, 0.5


def _neighbourhoods(maps: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, radius^2, (H - radius + 1) * (W - radius + 1)): for every position,
    the values of its radius x radius window, one window offset per row."""
    h, w = maps.shape[-2] - radius + 1, maps.shape[-1] - radius + 1
    rows = [maps[:, :, dy:dy + h, dx:dx + w].flatten(2) for dy in range(radius) for dx in range(radius)]
    return torch.stack(rows, dim=2)


def rmi_lower_bound(onehot: torch.Tensor, probs: torch.Tensor, radius: int = RMI_RADIUS) -> torch.Tensor:
    """Per class, the RMI loss term: 0.5 log det of the covariance of the label's neighbourhood
    vectors Y left unexplained by the prediction's vectors P (a Gaussian bound on -I(Y; P)),

        Var = Cov(Y) - Cov(Y, P) (Cov(P) + ridge I)^-1 Cov(Y, P)^T,  loss_c = 0.5 log det(Var + ridge I),

    averaged over the images and divided by radius^2; returns (C,). Computed in float64."""
    y = _neighbourhoods(onehot.double(), radius)
    p = _neighbourhoods(probs.double(), radius)
    y = y - y.mean(dim=3, keepdim=True)
    p = p - p.mean(dim=3, keepdim=True)
    ridge = RMI_RIDGE * torch.eye(radius * radius, dtype=torch.float64, device=probs.device)
    cov_y = y @ y.transpose(2, 3)
    cov_p = p @ p.transpose(2, 3)
    cov_yp = y @ p.transpose(2, 3)
    unexplained = cov_y - cov_yp @ torch.linalg.solve(cov_p + ridge, cov_yp.transpose(2, 3))
    chol = torch.linalg.cholesky(unexplained + ridge)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + 1e-8).sum(-1)
    return (0.5 * log_det).mean(dim=0).float() / (radius * radius)


def rmi_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Region mutual information loss on (N, C, H, W) logits: RMI_BCE_SHARE x per-class sigmoid
    binary cross-entropy over labelled pixels + the rest x the RMI bound summed over classes.
    Ignored pixels are zero in both the one-hot labels and the probabilities."""
    logits = resize(logits, target.shape[-2:]).float()
    classes = logits.shape[1]
    valid = (target != ignore_index) & (target < classes)
    onehot = F.one_hot(torch.where(valid, target, 0).long(), classes).permute(0, 3, 1, 2).float()
    mask = valid[:, None].float()
    onehot = onehot * mask
    bce = F.binary_cross_entropy_with_logits(logits, onehot, weight=mask.expand_as(logits), reduction="sum")
    bce = bce / (valid.sum() + 1)
    probs = torch.sigmoid(logits) * mask + 1e-6
    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=RMI_POOL, stride=RMI_POOL, padding=RMI_POOL // 2)

    bound = rmi_lower_bound(pool(onehot), pool(probs))
    return RMI_BCE_SHARE * bce + (1 - RMI_BCE_SHARE) * bound.sum()


def segmentation_loss(output: MultiScaleOutput, target: torch.Tensor, cfg: ModelConfig,
                      loss: str = "ce") -> torch.Tensor:
    """The training loss: `loss` ("ce" or "rmi", train.loss) on the fused logits, plus the method's
    per-scale cross-entropy terms (the reference code too supervises each scale with plain CE)."""
    total = rmi_loss(output.fused, target) if loss == "rmi" else cross_entropy(output.fused, target)
    per_scale_weight = {"hierarchical": cfg.aux_scale_weight, "explicit": cfg.explicit_scale_weight}.get(
        cfg.method, 0.0
    )
    if per_scale_weight > 0:
        for logits in output.logits.values():
            total = total + per_scale_weight * cross_entropy(logits, target)
    return total
