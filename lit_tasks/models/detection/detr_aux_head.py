"""Co-DETR's auxiliary dense head (Zong et al. ICCV 2023, §3.2): one-to-many supervision of DETR's encoder, in
training only; off by default (the paper's DETR).

Bipartite matching gives each object one positive query, so the encoder, and a backbone trained from scratch,
learn from a sparse signal. Co-DETR attaches one-to-many detection heads (ATSS, Faster R-CNN) to the encoder output
while training and drops them at inference, so the detector is unchanged. Here the auxiliary head is this package's
FCOS head and loss (:mod:`lit_tasks.models.detection.fcos`: GroupNorm towers, focal loss, GIoU, centerness, centre
sampling 1.5) on the encoder memory laid back out as its feature map: one level at the backbone's stride that
regresses every box size, its losses added with weight 1 (Co-DETR's lambda_1) as ``loss_cls_aux``,
``loss_box_aux``, ``loss_centerness_aux``. Not included: Co-DETR's customized positive queries (§3.3), which feed
the auxiliary heads' positives to the decoder as extra query groups.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_tasks.models.detection.fcos import FCOSCriterion, FCOSHead, FCOSOutput
from lit_tasks.ops.assigners import INF, grid_points

# One level that takes every object, whatever its size.
ANY_SIZE = ((-1.0, INF),)


class DenseAuxiliaryHead(nn.Module):
    """FCOS head on the encoder memory: ``forward(memory (B, S, d), (Hf, Wf))`` -> :class:`FCOSOutput` (one level).

    ``stride``: the input pixels per feature cell (the backbone's reduction: 32, or 16 with DC5).
    """

    def __init__(self, num_classes: int, d_model: int, stride: int, num_convs: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.head = FCOSHead(num_classes=num_classes, channels=d_model, num_convs=num_convs, num_levels=1)

    def forward(self, memory: Tensor, feature_size: tuple[int, int]) -> FCOSOutput:
        feature_map = memory.transpose(1, 2).unflatten(2, feature_size)  # (B, d, Hf, Wf)
        cls_logits, ltrb, centerness = self.head([feature_map])
        points, strides, levels = grid_points([tuple(feature_size)], [self.stride], memory.device)
        return FCOSOutput(cls_logits, ltrb, centerness, points, strides, levels)


def dense_auxiliary_criterion(num_classes: int) -> FCOSCriterion:
    """FCOS's losses for :class:`DenseAuxiliaryHead` (GIoU, centre sampling 1.5, one any-size level)."""
    return FCOSCriterion(num_classes=num_classes, regress_ranges=ANY_SIZE, center_sampling_radius=1.5)
