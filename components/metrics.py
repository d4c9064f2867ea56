"""Confusion-matrix metrics: per-class IoU and mIoU, mergeable across data shards and workers."""

from __future__ import annotations

import torch


class ConfusionMatrix:
    """Rows are targets, columns predictions. Pixels whose target is `ignore_index` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        pred = pred.detach().reshape(-1).to("cpu", torch.int64)
        target = target.detach().reshape(-1).to("cpu", torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        out_of_range = (target < 0) | (target >= self.num_classes) | (pred < 0) | (pred >= self.num_classes)
        if out_of_range.any():
            raise ValueError(f"class ids outside [0, {self.num_classes}) besides the ignore index {self.ignore_index}")
        index = target * self.num_classes + pred
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class and {self.num_classes}-class matrices")
        self.matrix += other.matrix
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrices of all workers in the torch.distributed group (DDP, Ray Train).

        Without an initialised group this is a no-op, so the same code serves one process.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            summed = self.matrix.to(device)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            self.matrix = summed.cpu()
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU; NaN for a class absent from both prediction and target."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        iou = tp / union
        iou[union == 0] = float("nan")
        return iou

    def miou(self, classes: list[int] | None = None) -> float:
        """Mean IoU over classes (optionally a subset), ignoring NaN entries."""
        iou = self.iou()
        if classes is not None:
            iou = iou[list(classes)]
        return float(torch.nanmean(iou)) if (~iou.isnan()).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.matrix.diag().sum() / total) if total else float("nan")
