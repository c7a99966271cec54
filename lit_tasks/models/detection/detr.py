"""DETR: End-to-End Object Detection with Transformers (Carion et al. 2020), as facebookresearch/detr defines it.

Network = timm backbone (C5; DC5 = dilated last stage) -> 1x1 conv to d_model -> encoder-decoder transformer
(:mod:`lit_tasks.models.detection.detr_transformer`) with 2-D positional encodings -> per decoder layer a class head
(C + 1 logits, no-object last) and a 3-layer box MLP + sigmoid (normalised cx, cy, w, h). Trained with
:class:`lit_tasks.losses.set_criterion.SetCriterion`; :class:`DETRPostprocess` turns the last layer into detections.
Defaults are the reference's (REFERENCE.md §5.1): R-50, frozen BN, stem + layer1 frozen, d 256, 8 heads, 6 + 6
layers, FFN 2048, dropout 0.1, 100 queries, sine encoding, auxiliary losses.

Batch-mates (REFERENCE.md §5.7): the reference's predictions for an image change when it is padded next to a
larger image. The backbone's cells near the padding border see padding activations where the image alone sees
the convolutions' own zero padding (the input padding itself is zero in either case: zero after normalisation),
and unless the padded size is a multiple of the stride, the nearest-neighbour downsampled pixel mask marks other
cells valid than the image's own feature map has (an image 90 px high padded to 200 gets 4 valid C5 rows, alone
3). Models trained with one image per GPU lose ~10 AP when evaluated in batches.

Here, by default (``backbone_on_padded_batch=False``), the backbone runs on each image at its own size (images of
the same size share one call) and the feature maps are zero-padded afterwards, the padding mask taken from each
image's own feature size: the transformer ignores padded keys, the sine encoding is normalised over the valid
cells, the learned one is indexed by absolute position, so an image gets the same predictions alone or in any
batch, in training and evaluation alike (tests/test_detr.py: equal to 1e-4; ~1e-6 measured). What still couples
batch-mates: a trainable (not frozen) BatchNorm in training mode normalises over each same-size group, and
floating-point summation order may change with the batch. ``backbone_on_padded_batch=True`` runs the backbone
once on the zero-padded batch as the reference and Hugging Face do (mask by nearest interpolation): their
outputs exactly, with the dependence above; one call instead of one per distinct size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tasks.losses.set_criterion import SetCriterion, normalized_targets
from lit_tasks.models.backbone import Normalize, build_backbone
from lit_tasks.models.detection.detr_aux_head import DenseAuxiliaryHead, dense_auxiliary_criterion, selected_anchors
from lit_tasks.models.detection.detr_queries import (BoxPositionEmbedding, DenoisingQueries, DenoisingTargets,
                                                     check_query_options, group_attention_mask, inverse_sigmoid)
from lit_tasks.models.detection.detr_transformer import Transformer
from lit_tasks.models.detection.fcos import FCOSOutput
from lit_tasks.models.detection.position_encoding import build_position_embedding
from lit_tasks.ops.box_ops import box_cxcywh_to_xyxy
from lit_tasks.ops.matcher import HungarianMatcher


@dataclass
class DETROutput:
    """Per decoder layer (last layer last; only the last one when the model has no auxiliary losses).

    logits: ``(L, B, Q, C + 1)``, no-object last.
    boxes: ``(L, B, Q, 4)`` sigmoid (cx, cy, w, h) relative to each image's unpadded size.
    image_sizes: ``(B, 2)`` int64 unpadded (h, w) in input pixels.
    query_groups: in training with Group DETR's query groups, Q = query_groups x the model's queries (group-major).
    dn_logits, dn_boxes, dn_targets: in training with denoising queries, their outputs ``(L, B, P, ...)`` and what
        they must reconstruct (:mod:`lit_tasks.models.detection.detr_queries`).
    aux_dense: in training with Co-DETR's auxiliary dense head, its FCOS outputs on the encoder memory
        (:mod:`lit_tasks.models.detection.detr_aux_head`).
    """

    logits: Tensor
    boxes: Tensor
    image_sizes: Tensor
    query_groups: int = 1
    dn_logits: Tensor | None = None
    dn_boxes: Tensor | None = None
    dn_targets: DenoisingTargets | None = None
    aux_dense: FCOSOutput | None = None

    @property
    def pred_logits(self) -> Tensor:
        """Last decoder layer's logits ``(B, Q, C + 1)``."""
        return self.logits[-1]

    @property
    def pred_boxes(self) -> Tensor:
        """Last decoder layer's boxes ``(B, Q, 4)``."""
        return self.boxes[-1]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (DETR's box head: 3 layers, d -> d -> d -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def check_image_sizes(images: Tensor, image_sizes: Sequence[Sequence[int]] | Tensor | None) -> list[tuple[int, int]]:
    """``image_sizes`` as a list of (h, w) ints, each within the padded ``(B, 3, H, W)`` batch (None = all full)."""
    batch, _, height, width = images.shape
    if image_sizes is None:
        return [(height, width)] * batch
    sizes = [(int(h), int(w)) for h, w in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
    if len(sizes) != batch:
        raise ValueError(f"DETR: {batch} images but {len(sizes)} image_sizes")
    for i, (h, w) in enumerate(sizes):
        if not (1 <= h <= height and 1 <= w <= width):
            raise ValueError(f"DETR: image_sizes[{i}] = {(h, w)} is not within the padded batch ({height}, {width})")
    return sizes


def _padding_mask(heights: Sequence[int], widths: Sequence[int], size: tuple[int, int], device: torch.device) -> Tensor:
    """``(B, H, W)`` bool, True outside each image's top-left ``heights[i] x widths[i]`` region."""
    h = torch.tensor(heights, device=device)[:, None, None]
    w = torch.tensor(widths, device=device)[:, None, None]
    rows = torch.arange(size[0], device=device)[None, :, None]
    cols = torch.arange(size[1], device=device)[None, None, :]
    return (rows >= h) | (cols >= w)


class DETR(nn.Module):
    """``forward(images, image_sizes) -> DETROutput``; images ``(B, 3, H, W)`` in [0, 1], zero-padded bottom / right.

    ``image_sizes``: unpadded (h, w) per image (list of int pairs or a ``(B, 2)`` tensor; None = no padding).
    The parts are built by :func:`build_detr` and injected, as the reference's ``build()`` does:

    Args:
        backbone: a timm ``features_only`` network whose last feature map (``feature_info.channels()[-1]``
            channels) is C5 (DC5: dilated).
        transformer: the encoder-decoder; its ``d_model`` sizes the input projection, queries and heads, its
            ``return_intermediate`` must equal ``aux_loss`` (every decoder layer's output for the auxiliary losses).
        position_embedding: ``mask (B, Hf, Wf) -> (B, d_model, Hf, Wf)``
            (:mod:`lit_tasks.models.detection.position_encoding`).
        num_classes: real classes; the class head has one more logit, no-object, last.
        num_queries: object queries, the most objects an image can have detected.
        aux_loss: outputs of every decoder layer (True) or the last one only.
        backbone_on_padded_batch: see the module docstring.
        denoising: DN-DETR's denoising queries (training only; None: none, the paper's), fed the ground truth through
            ``forward(..., targets=)`` (:mod:`lit_tasks.models.detection.detr_queries`).
        query_groups: Group DETR's sets of object queries in training (1: the paper's); evaluation uses the first.
        aux_head: Co-DETR's auxiliary dense head on the encoder memory, training only (None: none, the paper's).
        anchor_queries: DAB-DETR's anchor boxes as queries (not the paper's network: it changes inference too): each
            query is a learned box whose ``MLP(sine(box))`` is its positional query, and the box head predicts
            ``sigmoid(delta + logit(anchor))`` instead of an absolute box; denoising queries anchor at their noised
            boxes (DN-DETR's DAB base). False: the paper's learned positional queries and absolute boxes.
        query_selection: the anchors are not learned but the auxiliary dense head's best ``num_queries`` boxes of
            each image (Deformable DETR's two-stage §4.2, DINO §4.3 pure query selection); needs ``aux_head`` and
            ``anchor_queries``, and the head then runs in evaluation too. Not the paper's network.
        selection_content: with ``query_selection``, the content queries (the decoder's input) are the encoder
            memory at the selected locations instead of zeros (Efficient DETR §3.2, RT-DETR §4.3: the decoder starts
            from features the dense head already classifies; DINO §4.3 keeps them static instead). With gradient,
            as Efficient DETR; RT-DETR detaches them. Not the paper's network.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        transformer: Transformer,
        position_embedding: nn.Module,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
        backbone_on_padded_batch: bool = False,
        denoising: DenoisingQueries | None = None,
        query_groups: int = 1,
        aux_head: DenseAuxiliaryHead | None = None,
        anchor_queries: bool = False,
        query_selection: bool = False,
        selection_content: bool = False,
    ) -> None:
        super().__init__()
        if transformer.return_intermediate != aux_loss:
            raise ValueError(f"DETR: aux_loss={aux_loss} needs a transformer with return_intermediate={aux_loss}")
        d_model = transformer.d_model
        self.num_classes, self.aux_loss = num_classes, aux_loss
        self.backbone_on_padded_batch = backbone_on_padded_batch
        self.normalize = Normalize()
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.feature_info.channels()[-1], d_model, kernel_size=1)
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.num_queries, self.query_groups, self.anchor_queries = num_queries, query_groups, anchor_queries
        self.query_selection = query_selection
        self.selection_content = selection_content
        if query_selection and (aux_head is None or not anchor_queries or query_groups != 1):
            raise ValueError("DETR: query_selection needs aux_dense_head and anchor_queries, and one query group")
        if selection_content and not query_selection:
            raise ValueError("DETR: selection_content needs query_selection")
        if anchor_queries and not query_selection:  # DAB-DETR: box logits, centres uniform (selection: per image)
            self.query_anchors = nn.Embedding(num_queries * query_groups, 4)
            with torch.no_grad():
                self.query_anchors.weight[:, :2] = inverse_sigmoid(torch.rand(num_queries * query_groups, 2))
        elif not anchor_queries:
            self.query_embed = nn.Embedding(num_queries, d_model)
            if query_groups > 1:  # its own module: the published weights' query_embed keeps its shape
                self.extra_query_embed = nn.Embedding((query_groups - 1) * num_queries, d_model)
        self.denoising = denoising
        if anchor_queries or denoising is not None:
            self.box_position = BoxPositionEmbedding(d_model)
        self.aux_head = aux_head

    def forward(self, images: Tensor, image_sizes: Sequence[Sequence[int]] | Tensor | None = None,
                targets: Sequence[dict[str, Tensor]] | None = None) -> DETROutput:
        """``targets`` (as :class:`~lit_tasks.losses.set_criterion.SetCriterion` takes them) feed the denoising
        queries in training; without them, or in eval mode, the network is the paper's."""
        sizes = check_image_sizes(images, image_sizes)
        if self.backbone_on_padded_batch:
            features, mask = self.features_of_padded_batch(images, sizes)
        else:
            features, mask = self.features_per_image(images, sizes)
        src = self.input_proj(features)
        pos_mask = mask if mask is not None else torch.zeros_like(src[:, 0], dtype=torch.bool)
        pos = self.position_embedding(pos_mask).to(src.dtype)
        if image_sizes is None:  # every image the batch's size; the batch dimension stays symbolic when traced
            image_sizes = torch.tensor(images.shape[-2:], device=images.device).expand(images.shape[0], 2)
        else:
            image_sizes = torch.tensor(sizes, dtype=torch.int64, device=images.device)
        groups = self.query_groups if self.training else 1
        memory = self.transformer.encode(src, mask, pos)
        aux_dense = None
        if self.aux_head is not None and (self.training or self.query_selection):
            aux_dense = self.aux_head(memory, tuple(src.shape[-2:]))
        selected, selected_content = None, None
        if self.query_selection:
            selected, where = selected_anchors(aux_dense, image_sizes, self.num_queries)
            if self.selection_content:
                selected_content = memory.gather(1, where[..., None].expand(-1, -1, memory.shape[-1]))
        queries, content, blocked, dn_targets, anchors = self.decoder_queries(groups, image_sizes, targets, selected,
                                                                              selected_content)
        hs = self.transformer.decode(memory, mask, pos, queries, content, blocked)  # (L, B, Q, d)
        aux_dense = aux_dense if self.training else None
        delta = self.bbox_embed(hs)
        logits, boxes = self.class_embed(hs), (delta if anchors is None else delta + inverse_sigmoid(anchors)).sigmoid()
        if dn_targets is None:
            return DETROutput(logits, boxes, image_sizes, groups, aux_dense=aux_dense)
        num_matching = groups * self.num_queries
        return DETROutput(logits[:, :, :num_matching], boxes[:, :, :num_matching], image_sizes, groups,
                          logits[:, :, num_matching:], boxes[:, :, num_matching:], dn_targets, aux_dense)

    def decoder_queries(self, groups: int, image_sizes: Tensor, targets: Sequence[dict[str, Tensor]] | None,
                        selected: Tensor | None = None, selected_content: Tensor | None = None
                        ) -> tuple[Tensor, Tensor | None, Tensor | None, DenoisingTargets | None, Tensor | None]:
        """The decoder's positional queries ``(Q', d)`` or ``(B, Q', d)``, content (None: zeros), self-attention mask,
        denoising targets and anchor boxes (None without ``anchor_queries``): the queries of ``groups`` query groups,
        then (in training, with targets) the denoising queries. ``selected``: query selection's anchors (B, Q, 4)."""
        anchors = None
        if self.anchor_queries:
            anchors = selected if selected is not None else \
                self.query_anchors.weight[: groups * self.num_queries].sigmoid()
            queries = self.box_position(anchors)
        else:
            queries = self.query_embed.weight
            if groups > 1:
                queries = torch.cat([queries, self.extra_query_embed.weight])
        if not (self.training and self.denoising is not None and targets is not None):
            return queries, selected_content, group_attention_mask(groups, self.num_queries, None, queries.device), \
                None, anchors
        labels, boxes = normalized_targets(targets, image_sizes, self.num_classes)
        dn_content, dn_boxes, dn_targets = self.denoising(labels, boxes)
        batch, num_matching = len(image_sizes), queries.shape[-2]
        position = self.box_position(dn_boxes).to(queries.dtype)
        queries = torch.cat([queries.expand(batch, -1, -1), position], dim=1)
        matching_content = torch.zeros_like(queries[:, :num_matching]) if selected_content is None else \
            selected_content.to(queries.dtype)
        content = torch.cat([matching_content, dn_content.to(queries.dtype)], dim=1)
        if anchors is not None:
            anchors = torch.cat([anchors.expand(batch, -1, -1), dn_boxes], dim=1)
        blocked = group_attention_mask(groups, self.num_queries, dn_targets, queries.device)
        return queries, content, blocked, dn_targets, anchors

    def features_per_image(self, images: Tensor, sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor | None]:
        """C5 of each image at its own size (one backbone call per distinct size), zero-padded to the largest.

        Returns features ``(B, C, Hf, Wf)`` and the padding mask ``(B, Hf, Wf)`` (None when no image is padded).
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        if len(groups) == 1:
            (h, w), = groups
            return self.backbone(self.normalize(images[:, :, :h, :w]))[-1], None
        maps, order, feature_sizes = [], [], [(0, 0)] * len(sizes)
        for (h, w), index in groups.items():
            maps.append(self.backbone(self.normalize(images[index, :, :h, :w]))[-1])
            order += index
            for i in index:
                feature_sizes[i] = tuple(maps[-1].shape[-2:])
        height, width = max(h for h, _ in feature_sizes), max(w for _, w in feature_sizes)
        padded = torch.cat([F.pad(f, (0, width - f.shape[-1], 0, height - f.shape[-2])) for f in maps])
        features = padded[torch.tensor(order, device=images.device).argsort()]  # back to batch order
        mask = _padding_mask([h for h, _ in feature_sizes], [w for _, w in feature_sizes], (height, width),
                             images.device)
        return features, mask

    def features_of_padded_batch(self, images: Tensor, sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor | None]:
        """C5 of the padded batch in one call, as the reference (its padding is zero after normalisation).

        The mask is the pixel padding mask downsampled by nearest interpolation (reference backbone.py).
        """
        if all(size == tuple(images.shape[-2:]) for size in sizes):
            return self.backbone(self.normalize(images))[-1], None
        pixel_mask = _padding_mask([h for h, _ in sizes], [w for _, w in sizes], tuple(images.shape[-2:]),
                                   images.device)
        features = self.backbone(self.normalize(images, sizes))[-1]
        mask = F.interpolate(pixel_mask[None].float(), size=features.shape[-2:])[0].bool()
        return features, mask


class DETRPostprocess(nn.Module):
    """Detections from the last decoder layer (reference PostProcess): ``forward(outputs, image_sizes)``.

    Per query: softmax over the C + 1 logits, score and label = the best of the C real classes (no-object
    excluded); every query is a detection (no NMS, no threshold), sorted by descending score, the best
    ``max_detections`` kept (None: all Q, as the reference; COCO evaluation reads at most 100 per image). Boxes are
    scaled to each image's unpadded (h, w) in ``image_sizes``.

    Returns per image ``{"boxes": (N, 4) xyxy input pixels, "scores": (N,), "labels": (N,) int64}``, N =
    min(Q, max_detections).
    """

    def __init__(self, max_detections: int | None = None) -> None:
        super().__init__()
        if max_detections is not None and max_detections < 1:
            raise ValueError(f"DETRPostprocess: max_detections must be >= 1 or None, got {max_detections}")
        self.max_detections = max_detections

    @torch.no_grad()
    def forward(self, outputs: DETROutput, image_sizes: Sequence[Sequence[int]] | Tensor) -> list[dict[str, Tensor]]:
        prob = outputs.pred_logits.float().softmax(-1)
        scores, labels = prob[..., :-1].max(-1)
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=prob.device)
        if sizes.shape != (prob.shape[0], 2):
            raise ValueError(f"DETRPostprocess: image_sizes must be {prob.shape[0]} (h, w) pairs, got shape "
                             f"{tuple(sizes.shape)}")
        scale = sizes.flip(-1).repeat(1, 2)[:, None, :]  # (B, 1, 4): w, h, w, h
        boxes = box_cxcywh_to_xyxy(outputs.pred_boxes.float()) * scale
        order = scores.argsort(dim=-1, descending=True)[:, : self.max_detections]
        return [{"boxes": b[o], "scores": s[o], "labels": lab[o]} for b, s, lab, o in zip(boxes, scores, labels, order)]


# build_detr's options that DetectionTask takes under the same names (the backbone's are shared with FCOS / VFNet).
DETR_OPTIONS = ("dilation", "position_embedding", "d_model", "nheads", "num_encoder_layers", "num_decoder_layers",
                "dim_feedforward", "dropout", "num_queries", "aux_loss", "eos_coef", "cost_class", "cost_bbox",
                "cost_giou", "weight_ce", "weight_bbox", "weight_giou", "dn_groups", "dn_label_noise", "dn_box_noise",
                "query_groups", "aux_dense_head", "anchor_queries", "query_selection", "selection_content")


def check_detr_args(
    *,
    num_classes: int,
    position_embedding: str,
    d_model: int,
    nheads: int,
    num_encoder_layers: int,
    num_decoder_layers: int,
    dim_feedforward: int,
    dropout: float,
    num_queries: int,
    eos_coef: float,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
    weight_ce: float,
    weight_bbox: float,
    weight_giou: float,
    dn_groups: int = 0,
    dn_label_noise: float = 0.2,
    dn_box_noise: float = 0.4,
    query_groups: int = 1,
) -> None:
    """Fail early, naming the argument, on DETR settings that cannot build or train (names as :func:`build_detr`)."""
    costs, weights = (cost_class, cost_bbox, cost_giou), (weight_ce, weight_bbox, weight_giou)
    problems = check_query_options(dn_groups, dn_label_noise, dn_box_noise, query_groups)
    if num_classes < 1:
        problems.append(f"num_classes must be >= 1, got {num_classes}")
    if position_embedding not in ("sine", "learned"):
        problems.append(f"position_embedding must be 'sine' or 'learned', got {position_embedding!r}")
    if d_model < 1 or nheads < 1 or d_model % nheads:
        problems.append(f"d_model ({d_model}) must be a positive multiple of nheads ({nheads})")
    elif d_model % (4 if position_embedding == "sine" else 2):
        problems.append(f"d_model ({d_model}) must be a multiple of 4 for the sine position embedding (sin and cos "
                        f"of d_model / 2 frequencies per axis), of 2 for the learned one")
    if num_encoder_layers < 0 or num_decoder_layers < 1:
        problems.append(f"num_encoder_layers must be >= 0 and num_decoder_layers >= 1, got {num_encoder_layers}, "
                        f"{num_decoder_layers}")
    if dim_feedforward < 1:
        problems.append(f"dim_feedforward must be >= 1, got {dim_feedforward}")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {dropout}")
    if num_queries < 1:
        problems.append(f"num_queries must be >= 1, got {num_queries}")
    if not 0.0 < eos_coef <= 1.0:
        problems.append(f"eos_coef (no-object class weight) must be in (0, 1], got {eos_coef}")
    if min(costs) < 0 or max(costs) == 0:
        problems.append(f"cost_class, cost_bbox, cost_giou must be >= 0 and not all 0, got {costs}")
    if min(weights) < 0:
        problems.append(f"weight_ce, weight_bbox, weight_giou must be >= 0, got {weights}")
    if problems:
        raise ValueError("DETR: " + "; ".join(problems))


def build_detr(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    pretrained: bool = False,
    dilation: bool = False,
    position_embedding: str = "sine",
    d_model: int = 256,
    nheads: int = 8,
    num_encoder_layers: int = 6,
    num_decoder_layers: int = 6,
    dim_feedforward: int = 2048,
    dropout: float = 0.1,
    num_queries: int = 100,
    aux_loss: bool = True,
    frozen_stages: int = 1,
    frozen_bn: bool = True,
    backbone_on_padded_batch: bool = False,
    eos_coef: float = 0.1,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    weight_ce: float = 1.0,
    weight_bbox: float = 5.0,
    weight_giou: float = 2.0,
    dn_groups: int = 0,
    dn_label_noise: float = 0.2,
    dn_box_noise: float = 0.4,
    query_groups: int = 1,
    aux_dense_head: bool = False,
    anchor_queries: bool = False,
    query_selection: bool = False,
    selection_content: bool = False,
    max_detections: int | None = None,
) -> tuple[DETR, SetCriterion, DETRPostprocess]:
    """The DETR detector trio: network, set criterion and post-processor (defaults: the paper's R-50 recipe).

    Every option is stated here once: the backbone, position embedding, transformer and matcher are built from
    them and injected into :class:`DETR` and :class:`~lit_tasks.losses.set_criterion.SetCriterion`, as the
    reference's ``build(args)`` does. ``num_classes`` counts real classes only (labels in [0, num_classes)); the
    class head has one more logit for "no object". Unlike the reference's COCO setup (91 = max category id + 1,
    detr#108), ids are expected contiguous. ``frozen_stages=1`` and ``frozen_bn=True`` freeze the stem, layer1 and
    every BatchNorm as the reference does (``frozen_stages=4`` freezes the whole ResNet, the reference with
    lr_backbone 0). They only make sense with pretrained or converted weights: on a randomly initialised timm
    ResNet, frozen BN keeps identity statistics and timm's zero-initialised last BN of every residual block at 0,
    so those blocks add nothing, ever. Train a backbone from scratch with ``frozen_bn=False, frozen_stages=-1``.
    ``max_detections``: see :class:`DETRPostprocess`. Training-only convergence aids, off by default
    (:mod:`lit_tasks.models.detection.detr_queries`): ``dn_groups`` groups of DN-DETR denoising queries with
    ``dn_label_noise`` / ``dn_box_noise`` (DN-DETR's 0.2 / 0.4), ``query_groups`` Group DETR query sets,
    ``aux_dense_head`` Co-DETR's auxiliary FCOS head on the encoder
    (:mod:`lit_tasks.models.detection.detr_aux_head`). ``anchor_queries``: DAB-DETR's anchor-box queries,
    ``query_selection`` and ``selection_content``: anchors and content queries from the auxiliary head's best
    locations, changes of the network itself (see :class:`DETR`), off by default. Bad values raise ValueError naming
    the argument (:func:`check_detr_args`).
    """
    check_detr_args(num_classes=num_classes, position_embedding=position_embedding, d_model=d_model, nheads=nheads,
                    num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
                    dim_feedforward=dim_feedforward, dropout=dropout, num_queries=num_queries, eos_coef=eos_coef,
                    cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, weight_ce=weight_ce,
                    weight_bbox=weight_bbox, weight_giou=weight_giou, dn_groups=dn_groups,
                    dn_label_noise=dn_label_noise, dn_box_noise=dn_box_noise, query_groups=query_groups)
    # C5 only; DC5 = the last stage dilated instead of strided (output stride 16), as torchvision's
    # replace_stride_with_dilation=[False, False, True] in the reference.
    network = build_backbone(backbone, pretrained=pretrained, out_indices=(-1,),
                             output_stride=16 if dilation else None, frozen_stages=frozen_stages, frozen_bn=frozen_bn)
    positions = build_position_embedding(position_embedding, d_model)
    transformer = Transformer(d_model=d_model, num_heads=nheads, num_encoder_layers=num_encoder_layers,
                              num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=dropout,
                              return_intermediate=aux_loss)
    denoising = DenoisingQueries(num_classes, d_model, dn_groups, dn_label_noise, dn_box_noise) if dn_groups else None
    model = DETR(backbone=network, transformer=transformer, position_embedding=positions, num_classes=num_classes,
                 num_queries=num_queries, aux_loss=aux_loss, backbone_on_padded_batch=backbone_on_padded_batch,
                 denoising=denoising, query_groups=query_groups,
                 aux_head=DenseAuxiliaryHead(num_classes, d_model, network.feature_info.reduction()[-1])
                 if aux_dense_head else None, anchor_queries=anchor_queries, query_selection=query_selection,
                 selection_content=selection_content)
    matcher = HungarianMatcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou)
    criterion = SetCriterion(num_classes=num_classes, matcher=matcher, eos_coef=eos_coef, weight_ce=weight_ce,
                             weight_bbox=weight_bbox, weight_giou=weight_giou,
                             dense_criterion=dense_auxiliary_criterion(num_classes) if aux_dense_head else None)
    return model, criterion, DETRPostprocess(max_detections)


# -- export (tools/export.py): the network up to its raw outputs, and back --------------------------------------------
DETR_EXPORT_NAMES = ("class_logits", "boxes")


def detr_export_tensors(out: DETROutput) -> tuple[Tensor, Tensor]:
    """The raw outputs an exported DETR returns (last decoder layer): logits ``(B, Q, C + 1)``, no-object last, and
    boxes ``(B, Q, 4)`` sigmoid (cx, cy, w, h) relative to the (unpadded) input image."""
    return out.pred_logits, out.pred_boxes


def detr_output_from_export(tensors: tuple[Tensor, ...], image_size: tuple[int, int], model: nn.Module) -> DETROutput:
    """A :class:`DETROutput` (one decoder layer) from the raw outputs of ``(H, W)`` images, for
    :class:`DETRPostprocess`."""
    logits, boxes = tensors
    sizes = torch.tensor([[int(image_size[0]), int(image_size[1])]] * logits.shape[0], device=logits.device)
    return DETROutput(logits[None], boxes[None], sizes)
