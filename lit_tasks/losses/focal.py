"""Sigmoid focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_tasks.losses.reduction import reduce_loss


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float | None = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """FL = -alpha_t (1 - p_t)^gamma log(p_t), elementwise over logits of any shape.

    p_t = p t + (1 - p)(1 - t) and alpha_t = alpha t + (1 - alpha)(1 - t) with p = sigmoid(logit), so soft
    targets t in [0, 1] (e.g. IoU-aware scores) work; the log term is BCE-with-logits for numerical stability.
    ``alpha=None`` (or torchvision's -1) switches class balancing off. Computed in float32 (float64 kept).
    Equal to ``torchvision.ops.sigmoid_focal_loss``, except that an empty input's mean is 0, not NaN.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"focal loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if alpha is not None and alpha != -1 and not 0 <= alpha <= 1:
        raise ValueError(f"focal loss: alpha must be in [0, 1], None or -1, got {alpha}")
    if logits.dtype != torch.float64:
        logits = logits.float()
    targets = targets.to(logits.dtype)

    p = logits.sigmoid()
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (1 - p_t) ** gamma
    if alpha is not None and alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss

    return reduce_loss(loss, reduction, "focal loss")
