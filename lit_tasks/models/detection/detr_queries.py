"""Training-only extra decoder queries that make DETR converge faster; both off by default (the paper's DETR).

- **Denoising queries** (DN-DETR, Li et al. CVPR 2022, §3.2-3.4; IDEA-Research/DN-DETR ``dn_components.py``):
  ``groups`` noised copies of every ground-truth object join the decoder as extra queries and learn to reconstruct
  their object's class and box, a task without the unstable bipartite matching. Noise as DN-DETR's: each label is
  replaced by a random class with probability ``label_noise`` (0.2); each box centre moves by up to
  ``box_noise * (w, h) / 2`` and its size scales by a factor in ``[1 - box_noise, 1 + box_noise]`` (0.4), uniformly,
  clipped to [0, 1]. A denoising query's content is a learned embedding of its (noised) label, its positional
  query ``MLP(sine(box))`` (DAB-DETR's anchor encoding: 4 coordinates x d/2 sine features -> 2-layer MLP -> d):
  vanilla DETR has no anchor boxes, so unlike DN-DETR's DAB base the decoder still predicts absolute boxes.
- **Query groups** (Group DETR, Chen et al. ICCV 2023, §3): ``num_groups`` sets of the Q learned object queries,
  each matched one-to-one to the ground truth on its own; more queries per object supervise the decoder at once.
  Only the first group is used at evaluation, so the detector is the same size.

Attention: in the decoder's self-attention every query sees only the queries of its own group (each query group,
each denoising group); padded denoising slots (images with fewer objects than the batch's most) are hidden from the
others. DN-DETR lets denoising queries also see the matching queries; here they do not, so no group sees the
ground truth another group was given (the matching part never does, as in DN-DETR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from lit_tasks.models.detection.position_encoding import sin_cos_pairs


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """``(..., 4)`` normalised boxes -> ``(..., 4 * num_feats)``: per coordinate c, the sin / cos pairs of
    ``2 pi c`` at the feature-map encoding's frequencies (DAB-DETR's anchor encoding)."""
    return sin_cos_pairs(boxes.float() * (2 * math.pi), num_feats, temperature).flatten(-2)


def noised_boxes(boxes: Tensor, scale: float) -> Tensor:
    """DN-DETR's box noise on normalised (cx, cy, w, h): centre shifted by up to ``scale * (w, h) / 2``, size scaled
    by ``1 + u * scale``, u uniform in [-1, 1] per coordinate; clipped to [0, 1]."""
    if scale <= 0 or boxes.numel() == 0:
        return boxes
    spread = torch.cat([boxes[..., 2:] / 2, boxes[..., 2:]], dim=-1)
    return (boxes + (torch.rand_like(boxes) * 2 - 1) * spread * scale).clamp(0.0, 1.0)


def noised_labels(labels: Tensor, num_classes: int, probability: float) -> Tensor:
    """Each label replaced by a uniformly drawn class (possibly itself) with ``probability`` (DN-DETR §3.3)."""
    if probability <= 0 or labels.numel() == 0:
        return labels
    flip = torch.rand(labels.shape, device=labels.device) < probability
    return torch.where(flip, torch.randint_like(labels, num_classes), labels)


@dataclass
class DenoisingTargets:
    """What the denoising queries must reconstruct, ``P = groups * T_max`` slots per image (group-major).

    labels: ``(B, P)`` int64 true class, -1 in padded slots.
    boxes: ``(B, P, 4)`` true normalised (cx, cy, w, h), zero in padded slots.
    groups: number of denoising groups.
    """

    labels: Tensor
    boxes: Tensor
    groups: int

    @property
    def valid(self) -> Tensor:
        """``(B, P)`` True where a slot holds an object."""
        return self.labels >= 0


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``logit(x)`` with ``x`` and ``1 - x`` clamped to ``eps`` (DAB-DETR's), finite for boxes at the border."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class BoxPositionEmbedding(nn.Module):
    """Positional query of a box (DAB-DETR Eq. 3): ``MLP(sine(box))``, 4 x d/2 sine features -> 2-layer MLP -> d.

    A LayerNorm ends it so the positional queries have the learned ones' scale (``nn.Embedding``: N(0, 1) per
    channel); an MLP's default initialisation gives ~0.1, and such queries would barely steer the attention.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model),
                                 nn.LayerNorm(d_model))

    def forward(self, boxes: Tensor) -> Tensor:
        """``(..., 4)`` normalised (cx, cy, w, h) -> ``(..., d)``."""
        return self.mlp(box_sine_embedding(boxes, self.mlp[0].in_features // 4))


class DenoisingQueries(nn.Module):
    """Builds the denoising queries of a batch: ``forward(labels, boxes)`` -> (content, noised boxes, targets).

    ``labels`` / ``boxes``: per image ``(T_i,)`` and ``(T_i, 4)`` normalised (cx, cy, w, h) ground truth. Returns the
    content queries ``(B, P, d)`` (the noised labels' embeddings), the noised boxes ``(B, P, 4)`` whose positional
    queries the model makes (:class:`BoxPositionEmbedding`), and the :class:`DenoisingTargets`. Padded slots get a
    zero content and the box (0.5, 0.5, 1, 1). P = 0 when no image has objects (the modules still join the graph,
    so every parameter gets a gradient on every process).
    """

    def __init__(self, num_classes: int, d_model: int, groups: int, label_noise: float = 0.2,
                 box_noise: float = 0.4) -> None:
        super().__init__()
        self.num_classes, self.groups = num_classes, groups
        self.label_noise, self.box_noise = label_noise, box_noise
        self.label_embed = nn.Embedding(num_classes, d_model)

    def forward(self, labels: Sequence[Tensor], boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor, DenoisingTargets]:
        device = self.label_embed.weight.device
        true_labels = pad_sequence([t.to(device, torch.int64).reshape(-1) for t in labels], batch_first=True,
                                   padding_value=-1)  # (B, T_max)
        true_boxes = pad_sequence([t.to(device, torch.float32).reshape(-1, 4) for t in boxes], batch_first=True)
        true_labels = true_labels.repeat(1, self.groups)  # (B, P), group-major
        true_boxes = true_boxes.repeat(1, self.groups, 1)
        valid = true_labels >= 0
        shown_labels = noised_labels(true_labels.clamp(min=0), self.num_classes, self.label_noise)
        shown_boxes = noised_boxes(true_boxes, self.box_noise)
        shown_boxes = torch.where(valid[..., None], shown_boxes, shown_boxes.new_tensor([0.5, 0.5, 1.0, 1.0]))
        content = self.label_embed(shown_labels) * valid[..., None]
        return content, shown_boxes, DenoisingTargets(true_labels, true_boxes, self.groups)


def group_attention_mask(query_groups: int, num_queries: int, targets: DenoisingTargets | None,
                         device: torch.device | None = None) -> Tensor | None:
    """Decoder self-attention mask ``(B or 1, S, S)``, True = blocked, for ``[query groups | denoising groups]``.

    A query sees the queries of its own group only; padded denoising slots are hidden from every other query (each
    still sees itself, so no row is fully masked). None when there is one query group and no denoising.
    """
    denoising = targets is not None and targets.labels.shape[1] > 0
    if query_groups == 1 and not denoising:
        return None
    group = torch.arange(query_groups, device=device).repeat_interleave(num_queries)
    if not denoising:
        return (group[:, None] != group[None, :])[None]
    per_group = targets.labels.shape[1] // targets.groups
    dn_group = query_groups + torch.arange(targets.groups, device=device).repeat_interleave(per_group)
    group = torch.cat([group, dn_group])
    size = len(group)
    blocked = (group[:, None] != group[None, :])[None]  # (1, S, S)
    key_valid = torch.cat([torch.ones(targets.labels.shape[0], query_groups * num_queries, dtype=torch.bool,
                                      device=device), targets.valid], dim=1)  # (B, S)
    itself = torch.eye(size, dtype=torch.bool, device=device)[None]
    return blocked | (~key_valid[:, None, :] & ~itself)


def check_query_options(groups: int, label_noise: float, box_noise: float, query_groups: int) -> list[str]:
    """Problems with the denoising / query-group options, each naming the argument."""
    problems = []
    if groups < 0:
        problems.append(f"dn_groups must be >= 0 (0 = no denoising queries), got {groups}")
    if not 0.0 <= label_noise <= 1.0:
        problems.append(f"dn_label_noise must be in [0, 1], got {label_noise}")
    if box_noise < 0:
        problems.append(f"dn_box_noise must be >= 0, got {box_noise}")
    if query_groups < 1:
        problems.append(f"query_groups must be >= 1 (1 = the paper's one set of queries), got {query_groups}")
    return problems
