"""DETR set criterion (lit_tasks/losses/set_criterion.py) against direct formulas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

import lit_tasks.losses.reduction as reduction_module
from lit_tasks.losses.set_criterion import SetCriterion, normalized_targets
from lit_tasks.ops.matcher import hungarian_match

NUM_CLASSES = 4


def _outputs(num_layers: int, batch: int, queries: int, image_sizes, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_layers, batch, queries, NUM_CLASSES + 1, generator=g) * 2).requires_grad_(requires_grad)
    raw = torch.randn(num_layers, batch, queries, 4, generator=g).requires_grad_(requires_grad)
    return SimpleNamespace(logits=logits, boxes=raw.sigmoid(), raw_boxes=raw,
                           image_sizes=torch.tensor(image_sizes, dtype=torch.int64))


def _targets(counts, image_sizes, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, (h, w) in zip(counts, image_sizes):
        x1 = torch.rand(n, generator=g) * w * 0.6
        y1 = torch.rand(n, generator=g) * h * 0.6
        bw = torch.rand(n, generator=g) * w * 0.35 + 1
        bh = torch.rand(n, generator=g) * h * 0.35 + 1
        out.append({"boxes": torch.stack([x1, y1, x1 + bw, y1 + bh], 1),
                    "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g)})
    return out


def _direct_losses(logits, boxes, labels, tgt_boxes, indices, eos_coef=0.1):
    """The formulas of DETR Eq. 2 / Appendix A.2 written out in float64 (one layer)."""
    logits, boxes = logits.double(), boxes.double()
    batch, queries, k = logits.shape
    num_boxes = max(sum(len(t) for t in labels), 1)
    log_prob = logits.log_softmax(-1)
    ce_num = ce_den = 0.0
    l1 = giou = 0.0
    for b in range(batch):
        target_class = {int(q): int(labels[b][t]) for q, t in zip(*indices[b])}
        for q in range(queries):
            c = target_class.get(q, k - 1)
            w = eos_coef if c == k - 1 else 1.0
            ce_num += -w * log_prob[b, q, c]
            ce_den += w
        for q, t in zip(*indices[b]):
            pred, tgt = boxes[b, q], tgt_boxes[b][t].double()
            l1 += (pred - tgt).abs().sum()
            giou += 1 - generalized_box_iou(box_convert(pred[None], "cxcywh", "xyxy"),
                                            box_convert(tgt[None], "cxcywh", "xyxy"))[0, 0]
    return {"loss_ce": ce_num / ce_den, "loss_bbox": 5 * l1 / num_boxes, "loss_giou": 2 * giou / num_boxes}


def test_normalized_targets_drop_crowd_and_use_each_image_size() -> None:
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([1, 2]),
         "iscrowd": torch.tensor([0, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    labels, boxes = normalized_targets(targets, torch.tensor([[100, 50], [80, 80]]), NUM_CLASSES)
    assert labels[0].tolist() == [1] and len(labels[1]) == 0 and boxes[1].shape == (0, 4)
    torch.testing.assert_close(boxes[0], torch.tensor([[20.0 / 50, 40.0 / 100, 20.0 / 50, 40.0 / 100]]))


def test_labels_outside_range_are_an_error() -> None:
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([NUM_CLASSES])}]
    with pytest.raises(ValueError, match=r"target 0: labels \[4\] outside \[0, 4\)"):
        normalized_targets(targets, torch.tensor([[10, 10]]), NUM_CLASSES)


def test_layer_losses_on_a_fixed_matching_equal_the_formula() -> None:
    sizes = [(60, 80), (40, 40), (50, 70)]
    out = _outputs(1, 3, 7, sizes)
    targets = _targets([3, 0, 5], sizes)
    criterion = SetCriterion(num_classes=NUM_CLASSES)
    labels, tgt_boxes = normalized_targets(targets, out.image_sizes, NUM_CLASSES)
    # A fixed, deliberately non-optimal matching: the losses must follow it, not re-match.
    indices = [(torch.tensor([0, 2, 6]), torch.tensor([2, 0, 1])), (torch.empty(0, dtype=torch.int64),) * 2,
               (torch.tensor([1, 3, 4, 5, 6]), torch.tensor([4, 3, 2, 1, 0]))]
    num_boxes = torch.tensor(8.0)
    ours = criterion.layer_losses(out.logits[0], out.boxes[0], labels, tgt_boxes, indices, num_boxes)
    direct = _direct_losses(out.logits[0], out.boxes[0], labels, tgt_boxes, indices)
    for key, value in direct.items():
        # fp32 sums of <= 21 terms of magnitude <= ~10: well inside 1e-5.
        assert ours[key].item() == pytest.approx(value.item(), abs=1e-5), key


def test_every_decoder_layer_gets_its_own_matching_and_losses() -> None:
    sizes = [(64, 64), (48, 96)]
    out = _outputs(4, 2, 6, sizes, seed=3)
    targets = _targets([4, 2], sizes, seed=4)
    criterion = SetCriterion(num_classes=NUM_CLASSES)
    losses = criterion(out, targets)
    expected_keys = {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1", "_2")}
    assert set(k for k in losses if k.startswith("loss_")) == expected_keys
    labels, tgt_boxes = normalized_targets(targets, out.image_sizes, NUM_CLASSES)
    final_indices = hungarian_match(out.logits[3], out.boxes[3], labels, tgt_boxes, 1.0, 5.0, 2.0)
    differs_from_final_matching = False
    for layer, suffix in ((0, "_0"), (1, "_1"), (2, "_2"), (3, "")):
        indices = hungarian_match(out.logits[layer], out.boxes[layer], labels, tgt_boxes, 1.0, 5.0, 2.0)
        direct = _direct_losses(out.logits[layer], out.boxes[layer], labels, tgt_boxes, indices)
        for name, value in direct.items():
            assert losses[name + suffix].item() == pytest.approx(value.item(), abs=1e-5), name + suffix
        with_final = _direct_losses(out.logits[layer], out.boxes[layer], labels, tgt_boxes, final_indices)
        differs_from_final_matching |= abs(with_final["loss_bbox"] - direct["loss_bbox"]).item() > 1e-4
    assert differs_from_final_matching  # the random layers do match differently: the test can tell


def test_logged_errors_by_hand() -> None:
    logits = torch.full((2, 3, NUM_CLASSES + 1), -5.0)
    logits[0, 0, 1] = logits[0, 1, 2] = 5.0  # image 0: queries 0, 1 predict objects, query 2 no-object
    logits[0, 2, -1] = 5.0
    logits[1, :, 3] = 5.0  # image 1: all three predict class 3
    labels = [torch.tensor([1, 3]), torch.tensor([3])]
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    errors = SetCriterion(num_classes=NUM_CLASSES).logged_errors(logits, labels, indices)
    assert errors["class_error"].item() == pytest.approx(100 / 3)  # query 1 says 2, its target is 3
    assert errors["cardinality_error"].item() == pytest.approx((0 + 2) / 2)


@pytest.mark.parametrize("counts", [[0, 0], [0, 3]])
def test_images_without_objects_give_finite_connected_losses(counts) -> None:
    sizes = [(32, 32), (40, 24)]
    out = _outputs(2, 2, 5, sizes, seed=5, requires_grad=True)
    losses = SetCriterion(num_classes=NUM_CLASSES)(out, _targets(counts, sizes))
    total = sum(v for k, v in losses.items() if k.startswith("loss_"))
    assert torch.isfinite(total)
    total.backward()
    assert out.logits.grad is not None and out.raw_boxes.grad is not None
    if sum(counts) == 0:
        assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou_0"].item() == 0.0
        assert losses["class_error"].item() == 0.0
        assert out.raw_boxes.grad.abs().sum().item() == 0.0


def test_crowd_boxes_are_not_trained_on() -> None:
    sizes = [(64, 64)]
    out = _outputs(1, 1, 5, sizes, seed=6)
    targets = _targets([3], sizes)
    crowd = [dict(targets[0], iscrowd=torch.tensor([0, 1, 0]))]
    without = [{"boxes": targets[0]["boxes"][[0, 2]], "labels": targets[0]["labels"][[0, 2]]}]
    criterion = SetCriterion(num_classes=NUM_CLASSES)
    a, b = criterion(out, crowd), criterion(out, without)
    assert all(a[k].item() == pytest.approx(b[k].item(), abs=1e-6) for k in b)


def test_fp32_under_bf16_autocast_with_degenerate_boxes() -> None:
    sizes = [(64, 64), (64, 48)]
    out = _outputs(3, 2, 6, sizes, seed=7, requires_grad=True)
    boxes = out.boxes.clone()
    boxes[:, 0, :2, 2:] = 0.0  # zero-size predictions (DETR's generalized_box_iou asserts / NaNs on such)
    degenerate = SimpleNamespace(logits=out.logits.bfloat16(), boxes=boxes.bfloat16(), image_sizes=out.image_sizes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = SetCriterion(num_classes=NUM_CLASSES)(degenerate, _targets([3, 2], sizes))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
    assert torch.isfinite(out.raw_boxes.grad).all() and torch.isfinite(out.logits.grad).all()


def test_num_boxes_is_reduced_over_processes_in_training_only(monkeypatch) -> None:
    calls = []

    def fake_reduce_mean(value):
        calls.append(value.item())
        return value * 0 + 10.0  # as if the other processes held more boxes

    monkeypatch.setattr(reduction_module, "reduce_mean", fake_reduce_mean)
    sizes = [(64, 64)]
    out = _outputs(1, 1, 5, sizes, seed=8)
    targets = _targets([2], sizes)
    criterion = SetCriterion(num_classes=NUM_CLASSES)
    eval_losses = criterion.eval()(out, targets)
    assert calls == []  # evaluation makes no collective call
    train_losses = criterion.train()(out, targets)
    assert calls == [2.0]
    assert train_losses["loss_bbox"].item() == pytest.approx(eval_losses["loss_bbox"].item() * 2 / 10, rel=1e-6)
    calls.clear()
    criterion(out, _targets([0], sizes))  # a process without objects still makes the call
    assert calls == [0.0]
