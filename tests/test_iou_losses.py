"""IoU / GIoU / DIoU / CIoU losses against torchvision.ops, hand-computed cases, gradients and dtypes."""

import math

import pytest
import torch
import torchvision.ops as tvo

from lit_tasks.losses.iou import IOU_LOSSES, box_loss, ciou_loss, diou_loss, giou_loss, iou_loss
from lit_tasks.ops.box_ops import aligned_box_iou

TORCHVISION = [(giou_loss, tvo.generalized_box_iou_loss), (diou_loss, tvo.distance_box_iou_loss),
               (ciou_loss, tvo.complete_box_iou_loss)]

# (pred, target) pairs: the cases that break naive implementations.
CASES = {
    "overlap": ([0, 0, 2, 2], [1, 1, 3, 3]),
    "identical": ([1, 2, 4, 6], [1, 2, 4, 6]),
    "touching_edge": ([0, 0, 1, 1], [1, 0, 2, 1]),
    "touching_corner": ([0, 0, 1, 1], [1, 1, 2, 2]),
    "nested": ([0, 0, 4, 4], [1, 1, 2, 3]),
    "nested_swapped": ([1, 1, 2, 3], [0, 0, 4, 4]),
    "disjoint": ([0, 0, 1, 1], [3, 3, 5, 6]),
    "zero_width_inside": ([1, 0.5, 1, 1.5], [0, 0, 2, 2]),
    "zero_height_inside": ([0, 1, 2, 1], [0, 0, 2, 2]),
    "point_inside": ([1, 1, 1, 1], [0, 0, 2, 2]),
    "box_vs_point": ([0, 0, 2, 2], [1, 1, 1, 1]),
    "identical_points": ([1, 1, 1, 1], [1, 1, 1, 1]),
    "identical_lines": ([1, 0, 1, 3], [1, 0, 1, 3]),
    "disjoint_points": ([0, 0, 0, 0], [2, 3, 2, 3]),
    "point_on_line": ([1, 1, 1, 1], [0, 1, 2, 1]),
}
PRED = torch.tensor([p for p, _ in CASES.values()], dtype=torch.float32)
TARGET = torch.tensor([t for _, t in CASES.values()], dtype=torch.float32)
# torchvision's CIoU computes atan(w / h) = atan(0 / 0) for point boxes.
POINT = torch.tensor([name in {"point_inside", "box_vs_point", "identical_points", "disjoint_points",
                               "point_on_line"} for name in CASES])


def random_pairs(n: int, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 20.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(2, n, 2, generator=g, dtype=torch.float64) * scale
    wh = torch.rand(2, n, 2, generator=g, dtype=torch.float64) * scale / 2 + scale / 40
    boxes = torch.cat([xy, xy + wh], -1).to(dtype)
    return boxes[0], boxes[1]


@pytest.mark.parametrize(("ours", "theirs"), TORCHVISION)
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_losses_match_torchvision_on_random_boxes(ours, theirs, scale):
    pred, target = random_pairs(500, seed=int(scale), scale=scale)
    for reduction in ("none", "mean", "sum"):
        torch.testing.assert_close(ours(pred, target, reduction=reduction),
                                   theirs(pred, target, reduction=reduction), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("ours", "theirs"), TORCHVISION)
def test_losses_match_torchvision_on_special_boxes_without_nan(ours, theirs):
    pred, target = PRED.clone().requires_grad_(), TARGET.clone().requires_grad_()
    got, ref = ours(pred, target), theirs(PRED, TARGET)
    defined = ~POINT if ours is ciou_loss else torch.ones_like(POINT)
    assert torch.equal(ref.isfinite(), defined)
    torch.testing.assert_close(got[defined], ref[defined], rtol=0, atol=1e-6)
    assert got.isfinite().all()
    got.sum().backward()
    assert pred.grad.isfinite().all() and target.grad.isfinite().all()


def test_hand_computed_values():
    pred, target = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])
    # I = 1, U = 7, enclosing box 3x3: |C| = 9, c^2 = 18; centres (1, 1) and (2, 2): rho^2 = 2.
    iou = 1 / 7
    assert iou_loss(pred, target).item() == pytest.approx(-math.log(iou), rel=1e-6)
    assert iou_loss(pred, target, linear=True).item() == pytest.approx(1 - iou, rel=1e-6)
    assert giou_loss(pred, target).item() == pytest.approx(1 - (iou - 2 / 9), rel=1e-6)
    assert diou_loss(pred, target).item() == pytest.approx(1 - iou + 2 / 18, rel=1e-6)
    # Same-shape boxes: v = 0, CIoU = DIoU.
    assert ciou_loss(pred, target).item() == pytest.approx(1 - iou + 2 / 18, rel=1e-6)
    # A point at the centre of a square: IoU 0, rho 0; the point's aspect angle is defined as 0 and the
    # square's is pi/4, so v = 4/pi^2 (pi/4)^2 = 1/4, alpha = v / (1 + v) = 1/5, loss = 1 + 1/20.
    point, square = torch.tensor([[1.0, 1, 1, 1]]), torch.tensor([[0.0, 0, 2, 2]])
    assert ciou_loss(point, square).item() == pytest.approx(1.05, rel=1e-6)


def test_iou_loss_cases():
    losses = dict(zip(CASES, iou_loss(PRED, TARGET)))
    assert losses["identical"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["nested"].item() == pytest.approx(math.log(16 / 2), rel=1e-6)
    # No overlap: IoU is clamped at eps before the log (mmdet's default eps 1e-6 gives 13.8).
    for name in ("disjoint", "touching_edge", "point_inside", "identical_points"):
        assert losses[name].item() == pytest.approx(-math.log(1e-7), rel=1e-6)
    disjoint = torch.tensor([CASES["disjoint"][0]]), torch.tensor([CASES["disjoint"][1]])
    assert iou_loss(*disjoint, eps=1e-6).item() == pytest.approx(13.8155, abs=1e-4)
    # -ln IoU and 1 - IoU agree with the aligned IoU, which agrees with torchvision's pairwise IoU.
    pred, target = random_pairs(200, seed=3)
    iou = tvo.box_iou(pred, target).diagonal()
    torch.testing.assert_close(aligned_box_iou(pred, target), iou, rtol=0, atol=1e-6)
    torch.testing.assert_close(iou_loss(pred, target, linear=True, reduction="sum"), (1 - iou).sum())
    overlapping = iou > 1e-3
    torch.testing.assert_close(iou_loss(pred, target)[overlapping], -iou[overlapping].log(), rtol=1e-5, atol=1e-6)
    pred_, target_ = PRED.clone().requires_grad_(), TARGET.clone().requires_grad_()
    for linear in (False, True):
        iou_loss(pred_, target_, linear=linear).sum().backward()
        assert pred_.grad.isfinite().all() and target_.grad.isfinite().all()


def test_identical_boxes_give_zero_and_disjoint_giou_above_one():
    for name, fn in IOU_LOSSES.items():
        assert fn(PRED[1:2], TARGET[1:2]).item() == pytest.approx(0.0, abs=1e-6), name
    assert giou_loss(PRED[6:7], TARGET[6:7]).item() > 1


@pytest.mark.parametrize("fn", [giou_loss, diou_loss, iou_loss])
def test_gradcheck_float64(fn):
    pred, target = random_pairs(6, seed=7, dtype=torch.float64)
    pred.requires_grad_(), target.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: fn(p, t), (pred, target))


def test_ciou_gradient_treats_alpha_as_constant():
    """CIoU's analytic gradient is that of DIoU + alpha0 * v with alpha0 frozen (torchvision, paper Sec. 3.2).

    gradcheck on ciou_loss itself must fail (its finite differences see alpha move), so the float64 central
    differences are taken of the frozen-alpha function instead.
    """
    pred, target = random_pairs(6, seed=8, dtype=torch.float64)
    pred.requires_grad_()
    assert not torch.autograd.gradcheck(lambda p: ciou_loss(p, target), (pred,), raise_exception=False)

    def v_of(p):
        angle = lambda b: torch.atan((b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1]))  # noqa: E731
        return 4 / math.pi**2 * (angle(target) - angle(p)) ** 2

    with torch.no_grad():
        iou = torch.diagonal(tvo.box_iou(pred, target))
        alpha0 = v_of(pred) / (1 - iou + v_of(pred) + 1e-7)
    assert (alpha0 > 1e-3).all()  # the aspect term is active
    grad = torch.autograd.grad(ciou_loss(pred, target, reduction="sum"), pred)[0]

    def frozen(p):
        return (diou_loss(p, target) + alpha0 * v_of(p)).sum()

    numeric = torch.zeros_like(pred)
    h = 1e-6
    for idx in range(pred.numel()):
        step = torch.zeros_like(pred).view(-1)
        step[idx] = h
        step = step.view_as(pred)
        numeric.view(-1)[idx] = (frozen(pred.detach() + step) - frozen(pred.detach() - step)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)
    # And the same gradient as torchvision's autograd.
    ref = torch.autograd.grad(tvo.complete_box_iou_loss(pred, target, reduction="sum"), pred)[0]
    torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize(("ours", "theirs"), TORCHVISION)
def test_gradients_match_torchvision(ours, theirs):
    pred, target = random_pairs(100, seed=9, dtype=torch.float64)
    pred.requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(ours(pred, target).sum(), pred)[0],
                               torch.autograd.grad(theirs(pred, target).sum(), pred)[0])


def test_ciou_alpha_gate():
    pred, target = random_pairs(300, seed=10)
    iou = aligned_box_iou(pred, target)
    gated, plain, diou = ciou_loss(pred, target, alpha_gate=True), ciou_loss(pred, target), diou_loss(pred, target)
    low = iou <= 0.5
    assert low.any() and (~low).any()
    torch.testing.assert_close(gated[low], diou[low])
    torch.testing.assert_close(gated[~low], plain[~low])


def test_bfloat16_and_autocast_give_float32():
    pred, target = random_pairs(100, seed=11, scale=100.0)
    for name, fn in IOU_LOSSES.items():
        reference = fn(pred, target)
        out = fn(pred.bfloat16(), target.bfloat16())
        assert out.dtype == torch.float32, name
        torch.testing.assert_close(out, fn(pred.bfloat16().float(), target.bfloat16().float()), rtol=0, atol=0)
        if name == "iou":  # -ln IoU amplifies the rounding of tiny IoUs: compare the IoU itself
            torch.testing.assert_close((-out).exp(), (-reference).exp(), rtol=0, atol=0.02)
        else:
            torch.testing.assert_close(out, reference, rtol=0, atol=0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = fn(pred, target)
        assert under_autocast.dtype == torch.float32, name
        torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)


def test_lookup_reductions_and_bad_input():
    assert box_loss("giou") is giou_loss and box_loss("ciou") is ciou_loss
    torch.testing.assert_close(box_loss("linear_iou")(PRED, TARGET), iou_loss(PRED, TARGET, linear=True))
    with pytest.raises(ValueError, match="box_loss must be one of"):
        box_loss("smooth_l1")
    with pytest.raises(ValueError, match="reduction"):
        giou_loss(PRED, TARGET, reduction="avg")
    with pytest.raises(ValueError, match=r"same shape.*\(15, 4\).*\(1, 4\)"):
        diou_loss(PRED, TARGET[:1])
    empty = torch.zeros(0, 4, requires_grad=True)
    for fn in IOU_LOSSES.values():
        loss = fn(empty, empty, reduction="mean")
        assert loss.item() == 0 and loss.requires_grad
