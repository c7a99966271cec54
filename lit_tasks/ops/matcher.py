"""Hungarian matching of set predictions to ground truth (DETR, Carion et al. 2020, §3.1, Eq. 1).

Each image's Q predictions are matched one-to-one to its T ground-truth boxes by minimising the summed pairwise
cost (:func:`matching_cost`); unmatched predictions are trained towards "no object". The optimal assignment is
solved on the CPU by ``scipy.optimize.linear_sum_assignment``.

Unlike the reference (detr models/matcher.py), the cost is not built as one ``[B*Q, sum T]`` matrix of which only
the diagonal blocks are used: targets are padded to ``(B, T_max)``, the ``(B, Q, T_max)`` costs are built in one
batched pass, and only each image's own ``(Q, T_i)`` block crosses to the CPU, in a single copy
(facebookresearch/detr#562, roboflow/rf-detr#1281).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from lit_tasks.ops.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# Stands in for NaN / inf costs (diverged predictions) so that scipy does not refuse the matrix; the loss of such
# predictions is itself non-finite, so nothing is hidden.
_LARGE_COST = 1e8


def matching_cost(
    prob: Tensor,
    pred_boxes_cxcywh: Tensor,
    tgt_labels: Tensor,
    tgt_boxes_cxcywh: Tensor,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
) -> Tensor:
    """Pairwise matching cost of DETR (Eq. 1 and Appendix A.1), ``(..., Q, T)``.

    ``cost = -cost_class * p(target class) + cost_bbox * ||b - b_gt||_1 - cost_giou * GIoU(b, b_gt)``. The class
    term is ``-p`` rather than ``1 - p`` (a constant changes no assignment), the L1 distance is on normalised
    (cx, cy, w, h), GIoU on the same boxes as corners, as in the reference.

    Args:
        prob: ``(..., Q, K)`` class probabilities (softmax over the K = C + 1 logits, no-object last).
        pred_boxes_cxcywh: ``(..., Q, 4)`` predicted boxes, normalised.
        tgt_labels: ``(..., T)`` int64 class indices in ``[0, K - 1)``.
        tgt_boxes_cxcywh: ``(..., T, 4)`` target boxes, normalised.
        cost_class, cost_bbox, cost_giou: weights (the paper's 1, 5, 2 by default).
    """
    index = tgt_labels.unsqueeze(-2).expand(*prob.shape[:-1], tgt_labels.shape[-1])
    class_term = prob.gather(-1, index)
    l1_term = torch.cdist(pred_boxes_cxcywh, tgt_boxes_cxcywh, p=1)
    giou_term = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes_cxcywh), box_cxcywh_to_xyxy(tgt_boxes_cxcywh))
    return -cost_class * class_term + cost_bbox * l1_term - cost_giou * giou_term


@torch.no_grad()
def hungarian_match(
    logits: Tensor,
    pred_boxes_cxcywh: Tensor,
    tgt_labels: Sequence[Tensor],
    tgt_boxes_cxcywh: Sequence[Tensor],
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
) -> list[tuple[Tensor, Tensor]]:
    """Optimal one-to-one assignment of predictions to targets per image, in fp32 whatever the autocast state.

    Args:
        logits: ``(B, Q, K)`` class logits, no-object last.
        pred_boxes_cxcywh: ``(B, Q, 4)`` normalised predicted boxes.
        tgt_labels: B tensors ``(T_i,)`` int64; T_i = 0 is valid.
        tgt_boxes_cxcywh: B tensors ``(T_i, 4)`` normalised target boxes.
        cost_class, cost_bbox, cost_giou: see :func:`matching_cost`.

    Returns:
        B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors of length ``min(Q, T_i)``, ``pred_idx`` ascending.
    """
    batch, num_queries = logits.shape[:2]
    if len(tgt_labels) != batch or len(tgt_boxes_cxcywh) != batch:
        raise ValueError(f"hungarian_match: {batch} images of predictions but {len(tgt_labels)} label and "
                         f"{len(tgt_boxes_cxcywh)} box tensors")
    sizes = [len(labels) for labels in tgt_labels]
    empty = torch.empty(0, dtype=torch.int64)
    if max(sizes, default=0) == 0:
        return [(empty, empty) for _ in range(batch)]

    device = logits.device
    with torch.autocast(device_type=device.type, enabled=False):
        labels = pad_sequence([t.to(device, torch.int64) for t in tgt_labels], batch_first=True)  # (B, T_max)
        boxes = pad_sequence([t.to(device, torch.float32) for t in tgt_boxes_cxcywh], batch_first=True)
        cost = matching_cost(logits.float().softmax(-1), pred_boxes_cxcywh.float(), labels, boxes,
                             cost_class, cost_bbox, cost_giou)  # (B, Q, T_max)
        # Only the valid (Q, T_i) blocks cross to the CPU, in one copy.
        blocks = torch.cat([cost[i, :, :n].reshape(-1) for i, n in enumerate(sizes) if n]).cpu().numpy()

    blocks = np.nan_to_num(blocks, nan=_LARGE_COST, posinf=_LARGE_COST, neginf=-_LARGE_COST)
    indices, offset = [], 0
    for n in sizes:
        if n == 0:
            indices.append((empty, empty))
            continue
        rows, cols = linear_sum_assignment(blocks[offset: offset + num_queries * n].reshape(num_queries, n))
        offset += num_queries * n
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


@dataclass(frozen=True, kw_only=True)
class HungarianMatcher:
    """:func:`hungarian_match` with its cost weights fixed (the reference's ``HungarianMatcher``, built once)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0

    def __call__(
        self,
        logits: Tensor,
        pred_boxes_cxcywh: Tensor,
        tgt_labels: Sequence[Tensor],
        tgt_boxes_cxcywh: Sequence[Tensor],
    ) -> list[tuple[Tensor, Tensor]]:
        """B pairs ``(pred_idx, tgt_idx)``: see :func:`hungarian_match`."""
        return hungarian_match(logits, pred_boxes_cxcywh, tgt_labels, tgt_boxes_cxcywh,
                               self.cost_class, self.cost_bbox, self.cost_giou)
