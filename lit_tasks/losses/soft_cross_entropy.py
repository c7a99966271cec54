"""Soft-target cross entropy without the "ambiguous" class, and OadTR's two-head criterion (REFERENCE §9.3).

OadTR (``util/loss.py`` ``SetCriterion.loss_labels``) scores every frame with
``-sum_c y_c log softmax(z)_c`` where the softmax runs over every class but the ambiguous one (THUMOS: 21)
and the targets ``y`` are the (one-, multi-hot or soft) frame labels; frames labelled ambiguous are left out
of the mean. The current-frame head is weighted 1.0, the anticipation head (all Q anticipated frames
flattened) 0.5.

Where we differ, knowingly: a row whose targets carry no mass outside the ambiguous column (an unlabelled
frame, e.g. an anticipated frame past the end of a video) is left out of the mean too, where the reference
would count it as a zero loss in the denominator. A row is ambiguous when its ambiguous target is >= 0.5
(the reference tests ``== 1``; the same for hard labels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_tasks.losses.reduction import loss_normaliser


def valid_rows(targets: Tensor, ignore_index: int | None = None) -> Tensor:
    """``(..., C)`` targets -> ``(...)`` bool: not ambiguous and with target mass on some kept class."""
    if ignore_index is None:
        return targets.sum(-1) > 0
    kept = torch.ones(targets.shape[-1], dtype=torch.bool, device=targets.device)
    kept[ignore_index] = False
    return (targets[..., kept].sum(-1) > 0) & (targets[..., ignore_index] < 0.5)


def soft_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int | None = None) -> Tensor:
    """Per-row ``-sum_c y_c log softmax(z)_c`` over the classes other than ``ignore_index``, in float32.

    Args:
        logits: ``(..., C)`` logits, any float dtype (cast to float32; float64 kept).
        targets: ``(..., C)`` one-hot, multi-hot or soft targets.
        ignore_index: the ambiguous column, removed from the softmax and the sum; None keeps every column.

    Returns:
        ``(...)`` losses; 0 on rows that :func:`valid_rows` rejects (ambiguous or unlabelled).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"soft_cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    c = logits.shape[-1]
    if ignore_index is not None and not 0 <= ignore_index < c:
        raise ValueError(f"soft_cross_entropy: ignore_index {ignore_index} outside [0, {c})")
    with torch.autocast(logits.device.type, enabled=False):
        z = logits if logits.dtype == torch.float64 else logits.float()
        y = targets.to(z.dtype)
        valid = valid_rows(y, ignore_index)
        if ignore_index is not None:
            kept = torch.arange(c, device=z.device) != ignore_index
            z, y = z[..., kept], y[..., kept]
        loss = -(y * z.log_softmax(-1)).sum(-1)
        return torch.where(valid, loss, torch.zeros_like(loss))


class OadTRCriterion(nn.Module):
    """OadTR's loss: soft cross entropy of the current frame (weight 1.0) and of the Q anticipated frames (0.5).

    ``forward(current, anticipation, current_target, anticipation_target)``:
        current: ``(B, C)`` current-frame logits; anticipation: ``(B, Q, C)`` anticipation logits.
        current_target: ``(B, C)``; anticipation_target: ``(B, Q, C)`` frame targets (rows past the end of a
            video all zero).
    Returns ``{"loss_current": w_cur * mean, "loss_anticipation": w_ant * mean}`` (weights applied), each the
    mean over valid rows (:func:`valid_rows`); 0, still attached to the graph, when no row is valid. In
    training the number of valid rows is averaged over processes (``loss_normaliser``), so DDP's gradient
    average weighs every valid row of the global batch equally; in evaluation no collective call is made.

    Args:
        ambiguous_index: the ambiguous column (OadTR: 21), or None.
        current_weight: weight of the current-frame loss (``classification_h_loss_coef`` 1.0).
        anticipation_weight: weight of the anticipation loss (``classification_pred_loss_coef`` 0.5).
    """

    def __init__(self, *, ambiguous_index: int | None = None, current_weight: float = 1.0,
                 anticipation_weight: float = 0.5) -> None:
        super().__init__()
        self.ambiguous_index = ambiguous_index
        self.current_weight = current_weight
        self.anticipation_weight = anticipation_weight

    def forward(self, current: Tensor, anticipation: Tensor, current_target: Tensor,
                anticipation_target: Tensor) -> dict[str, Tensor]:
        if anticipation.ndim != 3 or anticipation.shape[0] != current.shape[0]:
            raise ValueError(f"OadTRCriterion: anticipation logits {tuple(anticipation.shape)} must be (B, Q, C) "
                             f"with B = {current.shape[0]}")
        parts = {
            "loss_current": (current, current_target, self.current_weight),
            "loss_anticipation": (anticipation, anticipation_target, self.anticipation_weight),
        }
        # Every normaliser is computed (and, in training, all-reduced) before any loss, whatever the data.
        counts = {k: loss_normaliser(valid_rows(t.float(), self.ambiguous_index).sum(), training=self.training)
                  for k, (_, t, _) in parts.items()}
        losses = {}
        for key, (logits, target, weight) in parts.items():
            total = soft_cross_entropy(logits, target, self.ambiguous_index).sum()
            # No clamp at 1: the process mean of the counts may be fractional (e.g. 0.5) and still exact.
            n = counts[key]
            losses[key] = weight * torch.where(n > 0, total / n.clamp(min=1e-12), total * 0.0)
        return losses
