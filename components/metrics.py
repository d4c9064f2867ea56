"""Confusion-matrix metrics: per-class IoU and mIoU, mergeable across data shards and workers."""

from __future__ import annotations

import torch


class ConfusionMatrix:
    """Rows are targets, columns predictions. Pixels whose target is `ignore_index` are skipped.

    Counts stay on the device of the predictions until they are read (`matrix`, the metrics, a
    merge): an evaluation batch on a GPU costs no copy to the host and no wait for the device.
    A class id out of range is counted apart and raises when the counts are read."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._host = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._pending: torch.Tensor | None = None  # on the device: C*C cells, out-of-range ids, ignored

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        cells = self.num_classes**2
        pred = pred.detach().reshape(-1).long()
        target = target.detach().reshape(-1).to(pred.device, torch.int64)
        in_range = (target >= 0) & (target < self.num_classes) & (pred >= 0) & (pred < self.num_classes)
        # Every pixel lands in a bin (no boolean indexing, whose size the host would wait for).
        index = torch.where(in_range, target * self.num_classes + pred, cells)
        index = torch.where(target == self.ignore_index, cells + 1, index)
        counts = torch.bincount(index, minlength=cells + 2)
        self._pending = counts if self._pending is None else self._pending + counts.to(self._pending.device)

    @property
    def matrix(self) -> torch.Tensor:
        """The counts on the host (num_classes x num_classes, int64)."""
        if self._pending is not None:
            counts, self._pending = self._pending.cpu(), None
            cells = self.num_classes**2
            if counts[cells]:
                raise ValueError(f"{int(counts[cells])} pixels with class ids outside [0, {self.num_classes}) "
                                 f"besides the ignore index {self.ignore_index}")
            self._host = self._host + counts[:cells].reshape(self.num_classes, self.num_classes)
        return self._host

    @matrix.setter
    def matrix(self, value: torch.Tensor) -> None:
        self._pending = None
        self._host = value

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class and {self.num_classes}-class matrices")
        self.matrix = self.matrix + other.matrix
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
