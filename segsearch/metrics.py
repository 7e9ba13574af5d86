"""Segmentation scores from one confusion matrix: per-class IoU and Dice, mIoU, pixel accuracy.

Counts (not scores) are accumulated and summed across workers, so the result is the same however
the data is split into batches and shards.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Pixel counts `matrix[truth, prediction]`, on the device of the tensors it is given.

    A class absent from both truth and prediction has no IoU or Dice (NaN in the per-class lists)
    and is left out of the means: it is neither a success (1) nor a failure (0).
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch of predicted and true class ids (same shape, e.g. N, H, W)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        k = self.num_classes
        pred, target = pred.long(), target.long()
        valid = target != self.ignore_index
        if (valid & ((pred < 0) | (pred >= k) | (target < 0) | (target >= k))).any():
            raise ValueError(
                f"class ids must be in [0, {k}) (targets may also be {self.ignore_index})"
            )
        index = torch.where(valid, target * k + pred, k * k).flatten()
        counts = torch.bincount(index, minlength=k * k + 1)[: k * k].view(k, k)
        self.matrix = self.matrix.to(counts.device) + counts

    def all_reduce(self) -> None:
        """Sum the counts over all workers when torch.distributed is initialized; else nothing."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = self.matrix.device
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        matrix = self.matrix.to(device)
        dist.all_reduce(matrix)
        self.matrix = matrix

    def reset(self) -> None:
        self.matrix = torch.zeros_like(self.matrix)

    def compute(self) -> dict[str, Any]:
        """`miou`, `iou`, `dice`, `dice_per_class`, `pixel_acc` and the raw `matrix` (lists)."""
        counts = self.matrix.cpu().numpy()
        m = counts.astype(np.float64)
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = np.full(self.num_classes, np.nan)
        dice = np.full(self.num_classes, np.nan)
        iou[present] = tp[present] / union[present]
        dice[present] = 2 * tp[present] / (union[present] + tp[present])
        total = m.sum()
        return {
            "miou": _mean(iou),
            "iou": iou.tolist(),
            "dice": _mean(dice),
            "dice_per_class": dice.tolist(),
            "pixel_acc": float(tp.sum() / total) if total else math.nan,
            "matrix": counts.tolist(),
        }


def _mean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN when there are none (nothing was counted)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan
