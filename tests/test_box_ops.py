"""Box format converters and pairwise IoU / GIoU against torchvision.ops."""

import pytest
import torch
import torchvision.ops as tvo

from lit_tasks.ops import box_ops as B


def random_boxes(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 20
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 10 + 0.5
    return torch.cat([xy, xy + wh], 1).to(dtype)


# Hand-built boxes: ordinary, touching (edge / corner), nested, disjoint, identical and zero-area ones.
SPECIAL = torch.tensor([
    [0, 0, 2, 2], [2, 0, 3, 2], [2, 2, 4, 4], [0.5, 0.5, 1.5, 1.0], [0, 0, 2, 2], [10, 10, 12, 15],
    [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 3], [0, 1, 2, 1], [5, 5, 5, 5],
], dtype=torch.float32)


@pytest.mark.parametrize(("ours", "out_fmt"), [(B.box_xyxy_to_cxcywh, "cxcywh"), (B.box_xyxy_to_xywh, "xywh")])
def test_converters_match_torchvision_and_round_trip(ours, out_fmt):
    boxes = torch.cat([random_boxes(50), SPECIAL])
    converted = ours(boxes)
    torch.testing.assert_close(converted, tvo.box_convert(boxes, "xyxy", out_fmt), rtol=0, atol=1e-6)
    back = {"cxcywh": B.box_cxcywh_to_xyxy, "xywh": B.box_xywh_to_xyxy}[out_fmt](converted)
    torch.testing.assert_close(back, tvo.box_convert(converted, out_fmt, "xyxy"), rtol=0, atol=1e-6)
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-5)


def test_converters_hand_case_and_dtype():
    box = torch.tensor([[1.0, 2.0, 5.0, 8.0]])
    assert B.box_xyxy_to_cxcywh(box).tolist() == [[3.0, 5.0, 4.0, 6.0]]
    assert B.box_xyxy_to_xywh(box).tolist() == [[1.0, 2.0, 4.0, 6.0]]
    assert B.box_cxcywh_to_xyxy(torch.tensor([[3.0, 5.0, 4.0, 6.0]])).tolist() == box.tolist()
    # Half precision and integer boxes come back as float32; float64 stays float64.
    assert B.box_xyxy_to_cxcywh(box.bfloat16()).dtype == torch.float32
    assert B.box_xywh_to_xyxy(box.long()).dtype == torch.float32
    assert B.box_area(box.double()).dtype == torch.float64
    torch.testing.assert_close(B.box_area(SPECIAL), tvo.box_area(SPECIAL))


def test_distance_encoding_round_trip_and_hand_case():
    points = torch.tensor([[5.0, 5.0]])
    assert B.distance2bbox(points, torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[4.0, 3.0, 8.0, 9.0]]
    assert B.bbox2distance(points, torch.tensor([[4.0, 3.0, 8.0, 9.0]])).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    # Broadcasting gives every point against every box; a point outside a box has a negative distance.
    pts, boxes = torch.rand(7, 2) * 30, random_boxes(3)
    ltrb = B.bbox2distance(pts[:, None], boxes[None])
    assert ltrb.shape == (7, 3, 4)
    inside = (pts[:, None, 0] > boxes[None, :, 0]) & (pts[:, None, 0] < boxes[None, :, 2]) & \
             (pts[:, None, 1] > boxes[None, :, 1]) & (pts[:, None, 1] < boxes[None, :, 3])
    assert torch.equal(ltrb.min(-1).values > 0, inside)
    torch.testing.assert_close(B.distance2bbox(pts[:, None], ltrb), boxes[None].expand(7, 3, 4))


def test_pairwise_iou_and_giou_match_torchvision_on_random_boxes():
    a, b = random_boxes(40, seed=1), random_boxes(30, seed=2)
    torch.testing.assert_close(B.box_iou(a, b), tvo.box_iou(a, b), rtol=0, atol=1e-6)
    torch.testing.assert_close(B.generalized_box_iou(a, b), tvo.generalized_box_iou(a, b), rtol=0, atol=1e-6)
    assert (B.box_iou(a, b) > 0).any() and (B.generalized_box_iou(a, b) < 0).any()  # both regimes covered


def test_pairwise_on_special_boxes_equal_torchvision_where_defined_and_never_nan():
    boxes = SPECIAL.clone().requires_grad_()
    zero_area = B.box_area(SPECIAL) == 0
    enclosing = (torch.max(SPECIAL[:, None, 2:], SPECIAL[None, :, 2:])
                 - torch.min(SPECIAL[:, None, :2], SPECIAL[None, :, :2])).prod(-1)
    # torchvision divides 0 by 0 exactly where both boxes have zero area (union 0). We define IoU = 0 there,
    # so GIoU = 0 - |C| / |C| = -1 when the enclosing box has an area and 0 when it too is degenerate.
    undefined_values = {B.box_iou: torch.zeros_like(enclosing),
                        B.generalized_box_iou: torch.where(enclosing > 0, -1.0, 0.0)}
    for ours, theirs in [(B.box_iou, tvo.box_iou), (B.generalized_box_iou, tvo.generalized_box_iou)]:
        got, ref = ours(boxes, boxes), theirs(SPECIAL, SPECIAL)
        defined = ref.isfinite()
        torch.testing.assert_close(got[defined], ref[defined], rtol=0, atol=1e-6)
        assert torch.equal(~defined, zero_area[:, None] & zero_area[None, :])
        assert torch.equal(got[~defined].detach(), undefined_values[ours][~defined])
        got.sum().backward()
        assert boxes.grad.isfinite().all()
        boxes.grad = None
    # Hand values: touching boxes IoU 0, nested box IoU = inner / outer area, identical boxes 1.
    iou = B.box_iou(SPECIAL, SPECIAL)
    assert iou[0, 1] == 0 and iou[0, 2] == 0 and iou[0, 4] == 1
    assert iou[0, 3] == pytest.approx(0.5 / 4)
    # GIoU of corner-touching 2x2 boxes: 0 - (16 - 8) / 16.
    assert B.generalized_box_iou(SPECIAL, SPECIAL)[0, 2].item() == pytest.approx(-0.5)


def test_pairwise_giou_gradcheck():
    a = random_boxes(3, seed=3, dtype=torch.float64).requires_grad_()
    b = random_boxes(4, seed=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(B.generalized_box_iou, (a, b))


def test_half_precision_inputs_give_float32_close_to_float32():
    a, b = random_boxes(20, seed=5), random_boxes(25, seed=6)
    for fn in (B.box_iou, B.generalized_box_iou):
        out = fn(a.bfloat16(), b.bfloat16())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(a.bfloat16().float(), b.bfloat16().float()), rtol=0, atol=0)
        torch.testing.assert_close(out, fn(a, b), rtol=0, atol=2e-2)


def test_normalize_zeroes_the_padding_after_normalising():
    from lit_tasks.models.backbone import IMAGENET_MEAN, IMAGENET_STD, Normalize

    images = torch.zeros(2, 3, 4, 5)
    images[0, :, :3, :2] = 0.5
    out = Normalize()(images, [(3, 2), (4, 5)])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out[0, :, :3, :2], ((0.5 - mean) / std).expand(3, 3, 2))
    assert out[0, :, 3:].abs().sum() == 0 and out[0, :, :, 2:].abs().sum() == 0  # padding: zero after normalising
    torch.testing.assert_close(out[1], (-mean / std).expand(3, 4, 5))  # a full-size image: nothing masked
    torch.testing.assert_close(Normalize()(images), (images - mean) / std)
