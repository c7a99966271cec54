"""DETR's set prediction loss (Carion et al. 2020, §3.1, Eq. 2): Hungarian matching, then class and box losses.

Per decoder layer: predictions are matched one-to-one to the ground truth (an injected
:class:`~lit_tasks.ops.matcher.HungarianMatcher`, the paper's costs by default), matched queries learn their object's
class and box, the others learn "no object" (the last class, down-weighted by ``eos_coef``). Every intermediate
decoder layer gets the same losses with its own matching (§3.2, auxiliary decoding losses). Everything runs in fp32
whatever the autocast state.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tasks.losses.iou import giou_loss
from lit_tasks.losses.reduction import loss_normaliser
from lit_tasks.ops.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from lit_tasks.ops.matcher import HungarianMatcher


def normalized_targets(
    targets: Sequence[dict[str, Tensor]], image_sizes: Tensor, num_classes: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Labels and boxes DETR learns: crowd boxes dropped, xyxy pixels -> cxcywh in [0, 1] of the unpadded image.

    Args:
        targets: per image ``boxes`` (N, 4) xyxy input pixels, ``labels`` (N,) in [0, num_classes), optional
            ``iscrowd`` (N,).
        image_sizes: ``(B, 2)`` unpadded (h, w) of each image.

    Returns:
        B label tensors ``(T_i,)`` int64 and B box tensors ``(T_i, 4)`` float32, on ``image_sizes.device``.
    """
    device = image_sizes.device
    scale = image_sizes.to(device, torch.float32).flip(-1).repeat(1, 2)  # (B, 4): w, h, w, h
    labels_out, boxes_out = [], []
    for i, target in enumerate(targets):
        labels = target["labels"].to(device, torch.int64).reshape(-1)
        boxes = target["boxes"].to(device, torch.float32).reshape(-1, 4)
        if len(labels) != len(boxes):
            raise ValueError(f"target {i}: {len(labels)} labels but {len(boxes)} boxes")
        crowd = target.get("iscrowd")
        if crowd is not None:
            keep = crowd.to(device).reshape(-1) == 0
            labels, boxes = labels[keep], boxes[keep]
        labels_out.append(labels)
        boxes_out.append(box_xyxy_to_cxcywh(boxes) / scale[i])
    all_labels = torch.cat(labels_out) if labels_out else torch.empty(0, dtype=torch.int64)
    if all_labels.numel() and bool(((all_labels < 0) | (all_labels >= num_classes)).any()):
        bad = next(i for i, t in enumerate(labels_out) if t.numel() and bool(((t < 0) | (t >= num_classes)).any()))
        raise ValueError(f"target {bad}: labels {labels_out[bad].tolist()} outside [0, {num_classes})")
    return labels_out, boxes_out


class SetCriterion(nn.Module):
    """DETR losses for every decoder layer: ``forward(outputs, targets)`` -> weighted ``loss_*`` dict + logged values.

    Per layer (the last unsuffixed, intermediate layer l suffixed ``_l``, as the reference names them):

    - ``loss_ce``: cross entropy over all B*Q queries, unmatched ones targeting no-object, class weights 1 and
      ``eos_coef`` for no-object (``sum w_i CE_i / sum w_i``, PyTorch's weighted mean), times ``weight_ce``;
    - ``loss_bbox``: L1 on normalised (cx, cy, w, h) of matched pairs, summed / num_boxes, times ``weight_bbox``;
    - ``loss_giou``: 1 - GIoU of matched pairs, summed / num_boxes, times ``weight_giou``.

    num_boxes = number of (non-crowd) target boxes in the batch; in training mode the mean over processes
    (computed before anything else, so every rank makes the same collective call whatever its data), min 1.
    Logged, not losses (last layer only): ``class_error`` = 100 - top-1 accuracy of matched queries (0 when
    nothing is matched; the reference reports 100 there), ``cardinality_error`` = mean over images of
    |#queries whose argmax is not no-object - #targets|.

    GIoU is :func:`lit_tasks.losses.iou.giou_loss` (eps 1e-7 added to the union and the enclosing area, as
    torchvision): finite for degenerate predicted boxes where the reference asserts (REFERENCE.md §5.7); it
    differs from the eps-free reference by < 1e-7 / (union area) per box.

    Training-only queries (:mod:`lit_tasks.models.detection.detr_queries`), when ``outputs`` carries them: query
    groups (``query_groups`` > 1, Group DETR) are matched each on its own and each term is the mean of the groups'
    terms (Group DETR sums them: the same up to a constant factor); denoising queries add ``loss_ce_dn``,
    ``loss_bbox_dn``, ``loss_giou_dn`` per layer (:func:`denoising_losses`, the same weights; DN-DETR §3.4);
    Co-DETR's auxiliary dense head (``outputs.aux_dense``) adds ``dense_criterion``'s losses suffixed ``_aux``.

    ``outputs`` is any object with ``logits`` ``(L, B, Q, C + 1)`` (no-object last), ``boxes`` ``(L, B, Q, 4)``
    (sigmoid, normalised cxcywh of each unpadded image), last decoder layer last, and ``image_sizes`` ``(B, 2)``
    (h, w). ``targets`` as :func:`normalized_targets` takes them. ``matcher``: the Hungarian matching (None: the
    paper's costs, 1, 5, 2).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        eos_coef: float = 0.1,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        dense_criterion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dense_criterion = dense_criterion
        self.matcher = HungarianMatcher() if matcher is None else matcher
        self.weight_ce, self.weight_bbox, self.weight_giou = weight_ce, weight_bbox, weight_giou
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(self, outputs: Any, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        logits_all, boxes_all = outputs.logits, outputs.boxes
        num_layers, batch = logits_all.shape[:2]  # (L, B, Q, C + 1)
        if logits_all.shape[-1] != self.num_classes + 1:
            raise ValueError(f"SetCriterion for {self.num_classes} classes got {logits_all.shape[-1]} logits "
                             f"(expected num_classes + 1, no-object last)")
        if len(targets) != batch:
            raise ValueError(f"SetCriterion: {batch} images of predictions but {len(targets)} targets")
        tgt_labels, tgt_boxes = normalized_targets(targets, outputs.image_sizes, self.num_classes)

        # The normaliser first: every process must reach this collective call, whatever its targets.
        num_boxes = torch.tensor(float(sum(len(t) for t in tgt_labels)), device=logits_all.device)
        num_boxes = loss_normaliser(num_boxes, training=self.training, min_value=1.0)

        # Query groups (Group DETR) are matched each on its own: (L, B, G * Q) -> (L, G * B, Q), group-major.
        groups = getattr(outputs, "query_groups", 1)
        if groups > 1:
            logits_all, boxes_all = (x.unflatten(2, (groups, -1)).transpose(1, 2).flatten(1, 2)
                                     for x in (logits_all, boxes_all))
            tgt_labels, tgt_boxes, batch = tgt_labels * groups, tgt_boxes * groups, batch * groups
        # Every layer gets its own matching; all layers are matched in one call (one device-to-host copy).
        all_indices = self.matcher(logits_all.flatten(0, 1), boxes_all.flatten(0, 1), tgt_labels * num_layers,
                                   tgt_boxes * num_layers)
        losses: dict[str, Tensor] = {}
        dn_targets = getattr(outputs, "dn_targets", None)
        with torch.autocast(device_type=logits_all.device.type, enabled=False):
            for layer in range(num_layers):
                logits, boxes = logits_all[layer].float(), boxes_all[layer].float()
                indices = all_indices[layer * batch: (layer + 1) * batch]
                suffix = "" if layer == num_layers - 1 else f"_{layer}"
                losses.update(self.layer_losses(logits, boxes, tgt_labels, tgt_boxes, indices, num_boxes, suffix,
                                                groups))
                if dn_targets is not None:
                    ce, l1, giou = denoising_losses(outputs.dn_logits[layer].float(), outputs.dn_boxes[layer].float(),
                                                    dn_targets, num_boxes)
                    losses.update({f"loss_ce_dn{suffix}": self.weight_ce * ce,
                                   f"loss_bbox_dn{suffix}": self.weight_bbox * l1,
                                   f"loss_giou_dn{suffix}": self.weight_giou * giou})
            if self.dense_criterion is not None and getattr(outputs, "aux_dense", None) is not None:
                dense = self.dense_criterion(outputs.aux_dense, targets)
                losses.update({f"{k}_aux": v for k, v in dense.items()})
            first = batch // groups  # errors are logged for the first query group, the one evaluated
            losses.update(self.logged_errors(logits[:first], tgt_labels[:first], indices[:first]))
        return losses

    def layer_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        tgt_labels: Sequence[Tensor],
        tgt_boxes: Sequence[Tensor],
        indices: Sequence[tuple[Tensor, Tensor]],
        num_boxes: Tensor,
        suffix: str = "",
        groups: int = 1,
    ) -> dict[str, Tensor]:
        """Weighted losses of one layer, ``logits`` (B, Q, C + 1), ``boxes`` (B, Q, 4), for a given matching; with
        ``groups`` query groups (B = groups x images) each term is the mean of the groups' terms."""
        batch_idx, query_idx = _matched_queries(indices, logits.device)
        matched_labels = torch.cat([t[j.to(t.device)] for t, (_, j) in zip(tgt_labels, indices)])
        matched_tgt = torch.cat([t[j.to(t.device)] for t, (_, j) in zip(tgt_boxes, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = matched_labels
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.class_weight)

        matched_pred = boxes[batch_idx, query_idx]  # (M, 4); M = 0 gives graph-connected zero sums
        loss_bbox = F.l1_loss(matched_pred, matched_tgt, reduction="sum") / (num_boxes * groups)
        loss_giou = giou_loss(box_cxcywh_to_xyxy(matched_pred), box_cxcywh_to_xyxy(matched_tgt), reduction="sum")
        return {
            f"loss_ce{suffix}": self.weight_ce * loss_ce,
            f"loss_bbox{suffix}": self.weight_bbox * loss_bbox,
            f"loss_giou{suffix}": self.weight_giou * loss_giou / (num_boxes * groups),
        }

    @torch.no_grad()
    def logged_errors(
        self, logits: Tensor, tgt_labels: Sequence[Tensor], indices: Sequence[tuple[Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """``class_error`` (%) of matched queries and ``cardinality_error`` for one layer's ``logits`` (B, Q, C + 1)."""
        batch_idx, query_idx = _matched_queries(indices, logits.device)
        matched_labels = torch.cat([t[j.to(t.device)] for t, (_, j) in zip(tgt_labels, indices)])
        if len(matched_labels):
            correct = (logits[batch_idx, query_idx].argmax(-1) == matched_labels).float().mean()
            class_error = 100.0 * (1.0 - correct)
        else:
            class_error = logits.new_zeros(())
        num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        num_tgt = torch.tensor([float(len(t)) for t in tgt_labels], device=logits.device)
        return {"class_error": class_error, "cardinality_error": (num_pred - num_tgt).abs().mean()}


def _matched_queries(indices: Sequence[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(image index, query index) of every matched pair, on ``device`` (one host-to-device copy)."""
    batch_idx = torch.cat([torch.full_like(i, b) for b, (i, _) in enumerate(indices)])
    query_idx = torch.cat([i for i, _ in indices])
    both = torch.stack([batch_idx, query_idx]).to(device, non_blocking=True)
    return both[0], both[1]


def denoising_losses(logits: Tensor, boxes: Tensor, targets: Any, num_boxes: Tensor) -> tuple[Tensor, ...]:
    """Unweighted (CE, L1, 1 - GIoU) of one decoder layer's denoising outputs ``(B, P, C + 1)`` / ``(B, P, 4)``
    against ``targets`` (a :class:`~lit_tasks.models.detection.detr_queries.DenoisingTargets`), DN-DETR §3.4.

    Over the object slots only: CE is their mean (each has a real class: no no-object term); L1 and GIoU are
    summed and divided by ``num_boxes * groups`` (per group, as the matching losses per image set). No object in
    the batch: graph-connected zeros.
    """
    valid = targets.valid
    logits, boxes = logits[valid], boxes[valid]
    labels, true_boxes = targets.labels[valid], targets.boxes[valid]
    ce = F.cross_entropy(logits, labels, reduction="sum") / max(len(labels), 1)
    l1 = F.l1_loss(boxes, true_boxes, reduction="sum")
    giou = giou_loss(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(true_boxes), reduction="sum")
    norm = num_boxes * targets.groups
    return ce, l1 / norm, giou / norm
