"""DETR's training-only convergence aids: DN-DETR denoising and Group DETR query groups
(lit_tasks/models/detection/detr_queries.py), Co-DETR's auxiliary dense head (detr_aux_head.py); their attention
isolation, losses, and the paper model they leave unchanged at evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from lit_tasks.losses.set_criterion import denoising_losses
from lit_tasks.models.detection.detr_aux_head import DenseAuxiliaryHead, dense_auxiliary_criterion, selected_anchors
from lit_tasks.models.detection.detr import DETROutput, build_detr
from lit_tasks.models.detection.detr_convert import load_detr_weights
from lit_tasks.models.detection.detr_queries import (BoxPositionEmbedding, DenoisingQueries, DenoisingTargets,
                                                     box_sine_embedding, group_attention_mask, noised_boxes,
                                                     noised_labels)
from lit_tasks.models.detection.fcos import FCOSOutput
from lit_tasks.ops.assigners import grid_points
from lit_tasks.ops.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

TINY = dict(backbone="test_resnet.r160_in1k", d_model=32, nheads=4, num_encoder_layers=1, num_decoder_layers=2,
            dim_feedforward=64, num_queries=4, dropout=0.0, frozen_stages=-1, frozen_bn=False)


def _detr(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_detr(3, **{**TINY, **kwargs})


def _targets(counts=(2, 0, 1), size=64, seed=0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * size / 2
        wh = 4 + torch.rand(n, 2, generator=g) * size / 3
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (n,), generator=g)})
    return out


def test_box_noise_stays_within_dn_detr_bounds() -> None:
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(4000, 1)
    noised = noised_boxes(boxes, 0.4)
    shift = (noised[:, :2] - boxes[:, :2]).abs()
    assert (shift <= 0.4 * boxes[:, 2:] / 2 + 1e-6).all()  # centre within scale * (w, h) / 2
    assert (noised[:, 2:] >= 0.6 * boxes[:, 2:] - 1e-6).all() and (noised[:, 2:] <= 1.4 * boxes[:, 2:] + 1e-6).all()
    # uniform: each coordinate's extremes are reached (4000 draws: the top 1 % is missed with probability 1e-17)
    assert (shift[:, 0] > 0.99 * 0.04).any() and (noised[:, 3] > 0.4 * 1.39).any()
    edge = noised_boxes(torch.tensor([[0.99, 0.01, 0.5, 0.5]]).repeat(100, 1), 1.0)
    assert edge.min() >= 0 and edge.max() <= 1  # clipped
    assert torch.equal(noised_boxes(boxes, 0.0), boxes)


def test_label_noise_flips_with_its_probability() -> None:
    torch.manual_seed(0)
    labels = torch.zeros(20000, dtype=torch.int64)
    noised = noised_labels(labels, 5, 0.5)
    # a flip draws any of the 5 classes: P(changed) = 0.5 * 4 / 5 = 0.4; binomial std sqrt(.4 * .6 / 2e4) = 0.0035
    assert abs((noised != 0).float().mean().item() - 0.4) < 5 * 0.0035
    assert noised.max() == 4 and noised.min() == 0
    assert torch.equal(noised_labels(labels, 5, 0.0), labels)


def test_box_sine_embedding_layout() -> None:
    boxes = torch.tensor([[0.25, 0.5, 0.1, 1.0]])
    emb = box_sine_embedding(boxes, 8)
    assert emb.shape == (1, 32)
    # coordinate c, frequency pair i: sin / cos of 2 pi c / 10000 ** (2 i / 8), at [8 c + 2 i], [8 c + 2 i + 1]
    for c, value in enumerate(boxes[0].tolist()):
        for i in range(4):
            angle = 2 * math.pi * value / 10000 ** (2 * i / 8)
            assert emb[0, 8 * c + 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert emb[0, 8 * c + 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_attention_mask_by_hand() -> None:
    """2 query groups of 2 queries; 2 denoising groups of 2 slots; image 0 has 1 object, image 1 has 2."""
    labels = torch.tensor([[1, -1, 1, -1], [0, 2, 0, 2]])
    mask = group_attention_mask(2, 2, DenoisingTargets(labels, torch.zeros(2, 4, 4), 2), labels.device)
    group = [0, 0, 1, 1, 2, 2, 3, 3]
    for b in range(2):
        for i in range(8):
            for j in range(8):
                padded_key = j >= 4 and labels[b, j - 4] < 0
                expected = group[i] != group[j] or (padded_key and i != j)
                assert bool(mask[b, i, j]) == expected, (b, i, j)
    assert group_attention_mask(1, 5, None) is None
    only_groups = group_attention_mask(3, 2, None)
    assert only_groups.shape == (1, 6, 6) and only_groups[0].logical_not().sum() == 3 * 4


def _images(n=3, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_matching_queries_do_not_see_the_extra_queries() -> None:
    """In training, the first query group's outputs are the plain model's: the other groups and the denoising
    queries are invisible to it (DN-DETR §3.4's mask; Group DETR's group-wise self-attention)."""
    images, targets = _images(), _targets()
    plain, _, _ = _detr()
    plain.train()
    reference = plain(images, targets=targets)
    for options in ({"query_groups": 3}, {"dn_groups": 2}, {"dn_groups": 2, "query_groups": 2}):
        model, _, _ = _detr(**options)
        model.load_state_dict(plain.state_dict(), strict=False)
        model.train()
        torch.manual_seed(1)
        out = model(images, targets=targets)
        first = out.logits[:, :, :4]
        assert out.logits.shape[2] == 4 * options.get("query_groups", 1)
        # same arithmetic on the same values except the masked softmax: float32 to a few ulps of O(1) values
        torch.testing.assert_close(first, reference.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.boxes[:, :, :4], reference.boxes, rtol=1e-5, atol=1e-5)
        if options.get("dn_groups"):
            # 2 groups x 2 slots (the batch's most objects); image 1 has none, image 2 one
            assert out.dn_logits.shape == (2, 3, 4, 4)
            assert out.dn_targets.valid.tolist() == [[True, True, True, True], [False] * 4,
                                                     [True, False, True, False]]


def test_denoising_queries_of_one_group_do_not_see_another() -> None:
    """Changing group 1's queries leaves group 0's outputs as they were."""
    model, _, _ = _detr(dn_groups=2)
    model.train()
    images, targets = _images(2), _targets((2, 1))
    captured = []
    original = model.denoising.forward

    def with_group_1_moved(labels, boxes):
        content, shown, dn = original(labels, boxes)
        if captured:
            content = torch.cat([content[:, :2], content[:, 2:] + 1.0], dim=1)  # group 1 slots: 2, 3
        captured.append(True)
        return content, shown, dn

    model.denoising.forward = with_group_1_moved
    torch.manual_seed(3)
    first = model(images, targets=targets)
    torch.manual_seed(3)
    second = model(images, targets=targets)
    torch.testing.assert_close(second.dn_logits[:, :, :2], first.dn_logits[:, :, :2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(second.dn_logits[:, :, 2:], first.dn_logits[:, :, 2:], atol=1e-3)


def test_evaluation_is_the_paper_model() -> None:
    """In eval mode (or without targets) neither option changes anything: the paper network, the same outputs."""
    images = _images(2)
    plain, _, _ = _detr()
    model, _, _ = _detr(dn_groups=3, query_groups=2, aux_dense_head=True)
    model.load_state_dict(plain.state_dict(), strict=False)
    expected = plain.eval()(images)
    out = model.eval()(images, targets=_targets((1, 2)))
    assert out.dn_logits is None and out.aux_dense is None and out.query_groups == 1
    assert out.logits.shape == expected.logits.shape
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)


def test_denoising_losses_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[2, -1, 0, -1], [1, 0, 1, 0]])  # 2 groups x 2 slots
    boxes = torch.rand(2, 4, 4, generator=g) * 0.3 + 0.2
    targets = DenoisingTargets(labels, boxes * (labels[..., None] >= 0), 2)
    logits = torch.randn(2, 4, 4, generator=g)
    pred = torch.rand(2, 4, 4, generator=g) * 0.3 + 0.2
    num_boxes = torch.tensor(3.0)
    ce, l1, giou = denoising_losses(logits, pred, targets, num_boxes)
    slots = [(b, p) for b in range(2) for p in range(4) if labels[b, p] >= 0]
    ce_ref = sum(-torch.log_softmax(logits[b, p], -1)[labels[b, p]] for b, p in slots) / len(slots)
    l1_ref = sum((pred[b, p] - boxes[b, p]).abs().sum() for b, p in slots) / (3.0 * 2)
    giou_ref = sum(1 - generalized_box_iou(box_cxcywh_to_xyxy(pred[b, p][None]),
                                           box_cxcywh_to_xyxy(boxes[b, p][None]))[0, 0] for b, p in slots) / (3.0 * 2)
    # sums of <= 6 float32 terms of O(1): rtol 1e-5 is ~100 ulps
    for got, want in ((ce, ce_ref), (l1, l1_ref), (giou, giou_ref)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    empty = DenoisingTargets(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, 4), 2)
    zero = denoising_losses(logits[:, :0].requires_grad_(), pred[:, :0].requires_grad_(), empty, torch.tensor(1.0))
    assert all(float(x.detach()) == 0.0 for x in zero)


def test_query_groups_loss_is_the_mean_over_groups() -> None:
    """Two groups whose predictions are both group 0's: the same loss as one group (the mean over groups)."""
    _, criterion, _ = _detr()
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 2, 4, 4, generator=g), torch.rand(2, 2, 4, 4, generator=g) * 0.4 + 0.3
    sizes = torch.tensor([[64, 64], [64, 64]])
    targets = _targets((2, 1))
    one = criterion(DETROutput(logits, boxes, sizes), targets)
    two = criterion(DETROutput(logits.repeat(1, 1, 2, 1), boxes.repeat(1, 1, 2, 1), sizes, query_groups=2), targets)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(dn_groups=2, query_groups=2, aux_dense_head=True),
    dict(aux_dense_head=True, anchor_queries=True, query_selection=True, selection_content=True),  # the shapes demo
], ids=["training_queries", "query_selection"])
def test_every_parameter_gets_a_gradient_when_no_image_has_objects(options: dict) -> None:
    """A DDP rank whose batch has no objects still reaches every parameter (zero gradients), so no rank waits."""
    model, criterion, _ = _detr(**options)
    model.train()
    targets = _targets((0, 0))
    losses = criterion(model(_images(2), targets=targets), targets)
    assert {"loss_cls_aux", "loss_box_aux"} <= set(losses)
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"} <= set(losses) or not options.get("dn_groups")
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_published_weights_load_into_a_model_with_training_queries() -> None:
    """The file has no denoising / extra query parameters: they keep their initialisation, the rest loads."""
    plain, _, _ = _detr(seed=1)
    model, _, _ = _detr(seed=2, dn_groups=2, query_groups=3, aux_dense_head=True)
    kept = {k: v.clone() for k, v in model.state_dict().items()
            if k.startswith(("denoising.", "box_position.", "extra_query", "aux_head."))}
    load_detr_weights(model, plain.state_dict())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in kept.items()) and kept
    assert torch.equal(state["query_embed.weight"], plain.state_dict()["query_embed.weight"])
    with pytest.raises(ValueError, match="not in the model"):
        load_detr_weights(plain, model.state_dict())  # the other way: extra keys are an error, as before


@pytest.mark.parametrize("options, message", [
    ({"dn_groups": -1}, "dn_groups must be >= 0"),
    ({"query_groups": 0}, "query_groups must be >= 1"),
    ({"dn_label_noise": 1.5}, "dn_label_noise must be in"),
    ({"dn_box_noise": -0.1}, "dn_box_noise must be >= 0"),
])
def test_bad_options_are_named(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        _detr(**options)


def test_denoising_queries_hide_padded_slots() -> None:
    queries = DenoisingQueries(num_classes=3, d_model=16, groups=2)
    content, boxes, targets = queries([torch.tensor([1]), torch.tensor([0, 2])],
                                      [torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.rand(2, 4)])
    assert content.shape == (2, 4, 16) and boxes.shape == (2, 4, 4)
    assert targets.labels.tolist() == [[1, -1, 1, -1], [0, 2, 0, 2]]
    assert (content[0, [1, 3]] == 0).all() and boxes[0, [1, 3]].tolist() == [[0.5, 0.5, 1.0, 1.0]] * 2


def test_box_position_embedding_has_the_learned_queries_scale() -> None:
    """LayerNorm last: unit variance per query at initialisation, as nn.Embedding's N(0, 1) queries."""
    torch.manual_seed(0)
    position = BoxPositionEmbedding(32)(torch.rand(50, 4))
    torch.testing.assert_close(position.var(-1, unbiased=False), torch.ones(50), rtol=0, atol=1e-3)


def test_anchor_queries_predict_relative_to_their_boxes() -> None:
    """DAB-DETR's parametrisation: with a zero box head the prediction is the anchor itself (matching queries: the
    learned anchors; denoising queries: their noised boxes)."""
    model, _, _ = _detr(anchor_queries=True, dn_groups=1, dn_box_noise=0.0)
    assert not hasattr(model, "query_embed") and model.query_anchors.weight.shape == (4, 4)
    torch.nn.init.zeros_(model.bbox_embed.layers[-1].weight)
    torch.nn.init.zeros_(model.bbox_embed.layers[-1].bias)
    targets = _targets((2, 1))
    out = model.train()(_images(2), targets=targets)
    anchors = model.query_anchors.weight.sigmoid().clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(out.boxes, anchors.expand_as(out.boxes), rtol=1e-5, atol=1e-6)
    valid = out.dn_targets.valid
    torch.testing.assert_close(out.dn_boxes[:, valid], out.dn_targets.boxes[valid].expand(2, -1, -1),
                               rtol=1e-5, atol=1e-6)  # no box noise: the anchors are the true boxes
    assert model.eval()(_images(1)).boxes.shape == (2, 1, 4, 4)


def test_auxiliary_head_reads_the_memory_as_its_feature_map() -> None:
    """Token y * W + x of the encoder memory is cell (y, x), whose point is (x s + s / 2, y s + s / 2)."""
    head = DenseAuxiliaryHead(num_classes=3, d_model=8, stride=16)
    memory = torch.arange(6.0)[None, :, None].expand(2, 6, 8)  # (B, S = 2 x 3, d): every channel holds the index
    seen = {}

    def record(maps):
        seen["map"] = maps[0]
        return torch.zeros(2, 6, 3), torch.zeros(2, 6, 4), torch.zeros(2, 6)

    head.head.forward = record
    out = head(memory, (2, 3))
    assert seen["map"].shape == (2, 8, 2, 3)
    assert seen["map"][0, 5].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert out.points.tolist() == [[8, 8], [24, 8], [40, 8], [8, 24], [24, 24], [40, 24]]
    assert out.strides.tolist() == [16] * 6


def test_auxiliary_losses_are_fcos_on_one_any_size_level() -> None:
    """A 64 x 64 image, stride 16: a box over the whole image makes every cell within 1.5 strides of its centre
    positive (centre sampling), whatever its size (one level, no regress range)."""
    criterion = dense_auxiliary_criterion(3)
    points, strides, levels = grid_points([(4, 4)], [16])
    out = FCOSOutput(torch.zeros(1, 16, 3), torch.ones(1, 16, 4), torch.zeros(1, 16), points, strides, levels)
    big = [{"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0]]), "labels": torch.tensor([1])}]
    losses = criterion(out, big)
    # centre (32, 32), radius 24: the cells at 8 px from it in both axes, (24|40, 24|40): 4 positives
    # focal loss at logit 0 (p = 1/2): positives alpha (1/2)^2 ln 2, negatives (1 - alpha) (1/2)^2 ln 2 per class
    per = 0.25 * math.log(2)
    expected_cls = (4 * (0.25 * per + 2 * 0.75 * per) + 12 * 3 * 0.75 * per) / 4
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(expected_cls), rtol=1e-5, atol=1e-6)


def test_selected_anchors_by_hand() -> None:
    """Best class probability first, locations outside the image's own size never chosen, boxes clipped to the
    image and normalised; an image with fewer locations inside than queries repeats its best ones."""
    points, strides, levels = grid_points([(2, 2)], [16])  # (8, 8), (24, 8), (8, 24), (24, 24); 20 x 30: 2 inside
    logits = torch.full((1, 4, 2), -5.0)
    logits[0, 3, 1], logits[0, 1, 0], logits[0, 0, 0] = 4.0, 3.0, 2.0  # (24, 24) is outside a 20 x 30 image
    ltrb = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.5, 1.0, 0.5], [0.1] * 4, [0.1] * 4]])  # in strides
    out = FCOSOutput(logits, ltrb, torch.zeros(1, 4), points, strides, levels)
    anchors, where = selected_anchors(out, torch.tensor([[20, 30]]), 2)
    assert where.tolist() == [[1, 0]]
    # location 1, (24, 8): 16 px left/right, 8 up/down -> (8, 0, 40, 16) clipped to (8, 0, 30, 16) in a 30 x 20 image
    # location 0, (8, 8): 4 px each way -> (4, 4, 12, 12)
    expected = torch.tensor([[[19 / 30, 8 / 20, 22 / 30, 16 / 20], [8 / 30, 8 / 20, 8 / 30, 8 / 20]]])
    torch.testing.assert_close(anchors, expected, rtol=1e-6, atol=1e-6)
    anchors, where = selected_anchors(out, torch.tensor([[20, 30]]), 5)  # 2 locations inside, 5 queries
    assert where.tolist() == [[1, 0, 1, 0, 1]]
    torch.testing.assert_close(anchors, expected[:, [0, 1, 0, 1, 0]], rtol=1e-6, atol=1e-6)
    three = FCOSOutput(logits.expand(3, -1, -1), ltrb.expand(3, -1, -1), torch.zeros(3, 4), points, strides, levels)
    _, where = selected_anchors(three, torch.tensor([[20, 30], [64, 64], [4, 4]]), 3)
    assert where.tolist() == [[1, 0, 1], [3, 1, 0], [3, 3, 3]]  # the 4 x 4 image has none inside: its best


def test_query_selection_anchors_the_queries_at_the_dense_heads_best_boxes() -> None:
    """With a zero box head the predictions are the selected boxes, in training and evaluation alike."""
    model, _, _ = _detr(aux_dense_head=True, anchor_queries=True, query_selection=True)
    assert not hasattr(model, "query_embed") and not hasattr(model, "query_anchors")
    torch.nn.init.zeros_(model.bbox_embed.layers[-1].weight)
    torch.nn.init.zeros_(model.bbox_embed.layers[-1].bias)
    images = _images(2)
    out = model.eval()(images)
    memory_out = {}
    model.aux_head.register_forward_hook(lambda m, i, o: memory_out.setdefault("dense", o))
    out = model(images)
    expected = selected_anchors(memory_out["dense"], out.image_sizes, 4)[0].clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(out.boxes, expected.expand_as(out.boxes), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="query_selection needs"):
        _detr(aux_dense_head=False, anchor_queries=True, query_selection=True)


@pytest.mark.parametrize("training", [False, True])
def test_selection_content_starts_the_decoder_from_the_memory_at_the_selected_locations(training: bool) -> None:
    """Efficient DETR / RT-DETR: the matching queries' decoder input is the encoder output at the dense head's best
    locations (zeros without the option); in training the denoising queries keep their label embeddings after them."""
    model, _, _ = _detr(aux_dense_head=True, anchor_queries=True, query_selection=True, selection_content=True,
                        dn_groups=2 if training else 0)
    model.train(training)
    seen = {}
    decode = model.transformer.decode
    def spy(memory, mask, pos, queries, content=None, blocked=None):  # noqa: E306
        seen.update(memory=memory, content=content)
        return decode(memory, mask, pos, queries, content, blocked)
    model.transformer.decode = spy
    model.aux_head.register_forward_hook(lambda m, i, o: seen.setdefault("dense", o))
    if training:
        model.denoising.register_forward_hook(lambda m, i, o: seen.setdefault("denoising", o))
    images, targets = _images(3), _targets()
    sizes = [(64, 64), (40, 64), (64, 30)]  # padded batch: the last two have feature cells outside them
    out = model(images, sizes, targets=targets if training else None)
    _, where = selected_anchors(seen["dense"], out.image_sizes, 4)
    points = seen["dense"].points[where]  # (B, Q, 2) x, y
    assert (points < torch.tensor(sizes).flip(-1)[:, None]).all()  # only locations inside each image
    expected = torch.stack([seen["memory"][b, where[b]] for b in range(3)])  # (B, Q, d), gathered by hand
    torch.testing.assert_close(seen["content"][:, :4], expected, rtol=0, atol=0)
    if training:  # after them, the denoising slots exactly as the denoising module built them (label embeddings)
        dn_content = seen["denoising"][0]
        assert dn_content.shape[1] == out.dn_targets.labels.shape[1] > 0
        torch.testing.assert_close(seen["content"][:, 4:], dn_content, rtol=0, atol=0)
    # the content carries gradient back into the encoder (Efficient DETR; RT-DETR would detach it)
    out.logits.sum().backward()
    assert model.transformer.encoder_layers[0].linear1.weight.grad is not None
    with pytest.raises(ValueError, match="selection_content needs query_selection"):
        _detr(aux_dense_head=True, anchor_queries=True, selection_content=True)
