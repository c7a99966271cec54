"""Pixel-wise cross entropy for dense labelling, normalised by the labelled pixels only."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
