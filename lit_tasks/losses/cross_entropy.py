"""Pixel-wise cross entropy for dense labelling, normalised by the labelled pixels only; the segmentation criterion."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None) -> Tensor:
    """Pixel cross entropy averaged over the labelled pixels only (weighted mean with class weights).

    ``logits`` ``(B, C, H, W)``, ``target`` ``(B, H, W)``. The normaliser is the number of pixels whose label
    is not ``ignore_index`` (or the sum of their class weights), so the loss scale does not depend on how much
    of a crop is padding or unlabelled. mmsegmentation's ``CrossEntropyLoss`` does *not* do this by default
    (``avg_non_ignore=False`` divides by every pixel). A batch with no labelled pixel gives 0, not NaN.
    """
    # Cross entropy in fp32 even under autocast: log-softmax of bf16 logits loses the small probabilities.
    total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    norm = weight[target[valid]].sum() if weight is not None else valid.sum()
    return total / norm.clamp_min(1e-12) if bool(valid.any()) else total * 0.0


class SegmentationCriterion(nn.Module):
    """The segmentation loss: decode-head cross entropy plus ``aux_weight`` x the auxiliary head's (PSPNet §3.3).

    ``forward(logits, aux, target)``: logits ``(B, C, H, W)``, auxiliary logits of the same shape or None, target
    ``(B, H, W)`` int64 -> ``{"loss_decode"}`` and, with ``aux``, ``{"loss_aux"}`` already multiplied by ``aux_weight``
    (each :func:`masked_cross_entropy` over the labelled pixels, ``class_weights`` per class when given).
    """

    def __init__(self, *, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4) -> None:
        super().__init__()
        self.ignore_index, self.aux_weight = ignore_index, aux_weight
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: Tensor, aux: Tensor | None, target: Tensor) -> dict[str, Tensor]:
        losses = {"loss_decode": masked_cross_entropy(logits, target, self.ignore_index, self.class_weights)}
        if aux is not None:
            losses["loss_aux"] = self.aux_weight * masked_cross_entropy(aux, target, self.ignore_index,
                                                                        self.class_weights)
        return losses
