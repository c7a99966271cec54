"""Varifocal loss (Zhang et al. 2021, "VarifocalNet: An IoU-aware Dense Object Detector", Eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_tasks.losses.reduction import reduce_loss


def varifocal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.75, gamma: float = 2.0,
                   iou_weighted: bool = True, reduction: str = "sum") -> Tensor:
    """VFL(p, q) = BCE(p, q) * w: positives weighted by q, negatives down-weighted by alpha * p^gamma.

    ``q`` is the IoU-aware classification score target: the IoU of the predicted box with its ground truth
    at the ground-truth class of a positive location, 0 everywhere else. Per element (paper Eq. 2, mmdet
    ``varifocal_loss``):

    - q > 0: w = q (``iou_weighted=True``; 1 with ``iou_weighted=False``): positives are not down-weighted,
      high-IoU positives count more;
    - q <= 0: w = alpha * |sigmoid(p) - q|^gamma (= alpha * sigmoid(p)^gamma at q = 0): alpha weights the
      *negatives* here, unlike the focal loss, where it weights the positives.

    The BCE is ``binary_cross_entropy_with_logits`` (max(p, 0) - p q + log(1 + exp(-|p|))), so logits of
    any size give finite values and gradients (VarifocalNet#26: log(sigmoid(p)) written out gave inf).
    Computed in float32 with autocast off (float64 stays float64); the result is float32/float64.

    Args:
        logits: class logits, any shape, e.g. ``(B, P, C)``.
        targets: IoU-aware targets of the same shape, in [0, 1].
        alpha, gamma: weight and exponent of the negatives' modulating factor (paper: 0.75, 2.0).
        iou_weighted: weight positives by q (paper) or by 1.
        reduction: ``"sum"`` (the caller divides by the number of positives), ``"mean"`` or ``"none"``.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"varifocal loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with torch.autocast(logits.device.type, enabled=False):
        logits, targets = logits.to(dtype), targets.to(dtype)
        positive = targets > 0
        negative_weight = alpha * (logits.sigmoid() - targets).abs().pow(gamma)
        positive_weight = targets if iou_weighted else torch.ones_like(targets)
        weight = torch.where(positive, positive_weight, negative_weight)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight
    return reduce_loss(loss, reduction, "varifocal loss")
