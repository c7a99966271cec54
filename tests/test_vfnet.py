"""VarifocalNet trio (REFERENCE.md §4.2): star offsets, head, criterion, postprocess, precision, DDP."""

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from lit_tasks.losses.varifocal import varifocal_loss
from lit_tasks.models.detection.vfnet import (
    VFNET_STRIDES,
    DeformConv3x3,
    VFNetHead,
    VFNetOutput,
    VFNetPostprocess,
    build_vfnet,
    star_dcn_offsets,
)
from lit_tasks.ops.assigners import fcos_targets, grid_points, pad_targets
from lit_tasks.ops.box_ops import distance2bbox

NUM_CLASSES = 3
TINY = dict(backbone="resnet10t", fpn_channels=16)


def tiny_vfnet(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_vfnet(NUM_CLASSES, **{**TINY, **kwargs})


def batch_two_sizes():
    """Two images padded to 96 x 80: the first 96 x 80 with three objects, the second 64 x 72 with none."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 96, 80)
    images[0] = torch.rand(3, 96, 80, generator=g)
    images[1, :, :64, :72] = torch.rand(3, 64, 72, generator=g)
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 50.0, 60.0], [40.0, 30.0, 78.0, 90.0], [20.0, 50.0, 36.0, 70.0]]),
         "labels": torch.tensor([0, 2, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    return images, [(96, 80), (64, 72)], targets


def total(losses):
    return sum(v for k, v in losses.items() if k.startswith("loss_"))


# -- star-shaped deformable convolution ------------------------------------------------------------
def test_star_offsets_sample_the_nine_box_points():
    # A feature map whose two channels are the x and y coordinates of each cell: bilinear sampling of a
    # linear ramp is exact, so a kernel with a single 1 at tap (i, j) outputs the point that tap samples.
    h = w = 16
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    coords = torch.stack((xs, ys))[None]  # (1, 2, H, W): channel 0 = x, 1 = y
    stride = 8
    l, t, r, b = 12.0, 20.0, 28.0, 4.0  # pixels -> (1.5, 2.5, 3.5, 0.5) cells
    ltrb = torch.tensor([l, t, r, b]).view(1, 4, 1, 1).expand(1, 4, h, w) / stride
    offset = star_dcn_offsets(ltrb)
    assert offset.shape == (1, 18, h, w)
    conv = DeformConv3x3(2, 2)
    y_taps = (-t / stride, 0.0, b / stride)
    x_taps = (-l / stride, 0.0, r / stride)
    inner = (slice(3, h - 1), slice(2, w - 4))  # locations whose nine samples stay inside the map
    for i in range(3):
        for j in range(3):
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[0, 0, i, j] = 1.0
                conv.weight[1, 1, i, j] = 1.0
                out = conv(coords, offset)[0]
            want_x = xs + x_taps[j]
            want_y = ys + y_taps[i]
            torch.testing.assert_close(out[0][inner], want_x[inner], rtol=0, atol=1e-6)
            torch.testing.assert_close(out[1][inner], want_y[inner], rtol=0, atol=1e-6)
    # e.g. tap (0, 0) of the location (8, 8) samples the top-left corner (8 - 1.5, 8 - 2.5)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = conv.weight[1, 1, 0, 0] = 1.0
        assert conv(coords, offset)[0, :, 8, 8].tolist() == [6.5, 5.5]


def test_head_initial_box_scales_and_star_offsets():
    torch.manual_seed(0)
    head = VFNetHead(num_classes=NUM_CLASSES, channels=16, num_convs=1)
    feats = [torch.randn(2, 16, s, s + 1) for s in (8, 4, 2, 1, 1)]
    captured = []
    head.cls_dconv.register_forward_pre_hook(lambda mod, args: captured.append(args[1].detach().clone()))
    with torch.no_grad():
        cls, init, refine = head(feats)
    sizes = [f.shape[-2:] for f in feats]
    assert cls.shape == (2, sum(h * w for h, w in sizes), NUM_CLASSES) and init.dtype == torch.float32
    start = 0
    for level, (h, w) in enumerate(sizes):
        ltrb = init[:, start : start + h * w].transpose(1, 2).reshape(2, 4, h, w)
        torch.testing.assert_close(captured[level], star_dcn_offsets(ltrb / VFNET_STRIDES[level]),
                                   rtol=1e-6, atol=1e-6)
        start += h * w
    # exp(0) = 1: zero initial-box conv -> boxes of the level's denominator; zero refine conv -> refined = initial
    with torch.no_grad():
        for conv in (head.reg_init, head.reg_refine):
            conv.weight.zero_()
            conv.bias.zero_()
        _, init, refine = head(feats)
    denoms = torch.cat([torch.full((h * w,), d) for (h, w), d in zip(sizes, (64.0, 128.0, 256.0, 512.0, 1024.0))])
    assert torch.equal(init, denoms.view(1, -1, 1).expand_as(init))
    assert torch.equal(refine, init)


def test_offsets_pass_a_tenth_of_the_gradient_to_the_initial_box():
    torch.manual_seed(0)
    feats = [torch.randn(1, 16, 6, 6), torch.randn(1, 16, 3, 3)]
    grads = {}
    for mul in (1.0, 0.1):
        torch.manual_seed(1)
        head = VFNetHead(num_classes=NUM_CLASSES, channels=16, num_convs=1, strides=(8, 16), reg_denoms=(8.0, 16.0),
                         gradient_mul=mul)
        cls, _, _ = head(feats)
        cls.sum().backward()  # the scores reach the initial box only through the star offsets
        grads[mul] = head.reg_init.weight.grad.clone()
    assert grads[1.0].abs().max() > 0
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0], rtol=1e-4, atol=1e-9)


def test_refined_box_does_not_backpropagate_into_the_initial_box_values():
    torch.manual_seed(0)
    head = VFNetHead(num_classes=NUM_CLASSES, channels=16, num_convs=1, strides=(8,), reg_denoms=(16.0,),
                     gradient_mul=0.0)
    _, _, refine = head([torch.randn(1, 16, 5, 5)])
    refine.sum().backward()  # refined = exp(delta) * initial.detach(), offsets with gradient_mul 0: no path
    assert head.reg_init.weight.grad is None or not head.reg_init.weight.grad.any()
    assert head.reg_refine.weight.grad.abs().max() > 0


# -- the trio ---------------------------------------------------------------------------------------
def test_trio_runs_on_two_sizes_with_an_empty_image():
    model, criterion, postprocess = tiny_vfnet()
    images, sizes, targets = batch_two_sizes()
    out = model(images, sizes)
    assert isinstance(out, VFNetOutput)
    num_points = sum(h * w for h, w in out.level_sizes)
    assert out.level_sizes == [(12, 10), (6, 5), (3, 3), (2, 2), (1, 1)]
    assert out.cls_logits.shape == (2, num_points, NUM_CLASSES)
    assert out.ltrb_init.shape == out.ltrb_refine.shape == (2, num_points, 4)
    assert out.points[:2].tolist() == [[0.0, 0.0], [8.0, 0.0]]  # ATSS: centre offset 0, as mmdet's VFNet
    criterion.train()
    losses = criterion(out, targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_box_refine", "num_pos"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["num_pos"] > 3 and losses["loss_box"] > 0 and losses["loss_box_refine"] > 0
    total(losses).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(images, sizes)
    postprocess.score_threshold = 0.0  # an untrained net scores ~0.01 everywhere
    postprocess.nms_threshold = 1.0  # and predicts the same clipped boxes at neighbouring locations
    dets = postprocess(out, sizes)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, sizes):
        assert det["boxes"].shape == (100, 4) and det["scores"].shape == det["labels"].shape == (100,)
        assert det["labels"].dtype == torch.int64 and det["labels"].max() < NUM_CLASSES
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_criterion_equals_direct_formula():
    # The three losses rebuilt from the assignment with torchvision's GIoU loss and box IoU.
    model, criterion, _ = tiny_vfnet()
    images, sizes, targets = batch_two_sizes()
    with torch.no_grad():
        out = model(images, sizes)
    criterion.train()
    losses = criterion(out, targets)
    labels, gt = criterion.assign(out, targets)
    pos = labels < NUM_CLASSES
    pts = out.points.expand(2, -1, -1)[pos]
    target = gt[pos]
    init = distance2bbox(pts, out.ltrb_init[pos])
    refine = distance2bbox(pts, out.ltrb_refine[pos])
    w_init = torchvision.ops.box_iou(init, target).diagonal().clamp(min=1e-6)
    w_refine = torchvision.ops.box_iou(refine, target).diagonal().clamp(min=1e-6)
    q = torch.zeros_like(out.cls_logits)
    q[pos] = torch.nn.functional.one_hot(labels[pos], NUM_CLASSES).float() * w_refine[:, None]
    num_pos = pos.sum().item()
    assert num_pos > 3 and w_init.sum() > 1 and w_refine.sum() > 1  # no normaliser sits at its clamp
    want = {
        "loss_cls": varifocal_loss(out.cls_logits, q, reduction="sum") / num_pos,
        "loss_box": 1.5 * (torchvision.ops.generalized_box_iou_loss(init, target) * w_init).sum() / w_init.sum(),
        "loss_box_refine": 2.0 * (torchvision.ops.generalized_box_iou_loss(refine, target) * w_refine).sum()
        / w_refine.sum(),
    }
    for key, value in want.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert losses["num_pos"].item() == num_pos


def test_criterion_without_any_object_gives_connected_zeros():
    model, criterion, _ = tiny_vfnet()
    images, sizes, targets = batch_two_sizes()
    out = model(images, sizes)
    criterion.train()
    losses = criterion(out, [targets[1], targets[1]])
    assert losses["loss_box"].item() == 0 and losses["loss_box_refine"].item() == 0
    assert losses["loss_cls"] > 0 and losses["num_pos"].item() == 0
    total(losses).backward()
    assert model.head.reg_init.weight.grad is not None  # every parameter is reached (DDP needs it)


def test_collectives_only_in_training(monkeypatch):
    import lit_tasks.losses.reduction as reduction

    calls = []
    monkeypatch.setattr(reduction, "reduce_mean", lambda x: calls.append(x.shape) or x.detach().float())
    model, criterion, _ = tiny_vfnet()
    images, sizes, targets = batch_two_sizes()
    with torch.no_grad():
        out = model(images, sizes)
    criterion.eval()
    evaluated = criterion(out, targets)
    assert calls == []
    criterion.train()
    for batch_targets in (targets, [targets[1], targets[1]]):  # with and without positives: the same call
        criterion(out, batch_targets)
    assert calls == [torch.Size([3]), torch.Size([3])]
    torch.testing.assert_close(evaluated, criterion(out, targets))


def test_postprocess_matches_a_naive_loop():
    g = torch.Generator().manual_seed(9)
    level_sizes = [(2, 3), (1, 2)]
    points, strides, levels = grid_points(level_sizes, [8, 16])
    num_points = points.shape[0]
    out = VFNetOutput(
        cls_logits=torch.randn(2, num_points, NUM_CLASSES, generator=g) * 2 - 1,
        ltrb_init=torch.full((2, num_points, 4), 1e4),  # must not be used
        ltrb_refine=1 + torch.rand(2, num_points, 4, generator=g) * 30,
        points=points, strides=strides, levels=levels, level_sizes=level_sizes, image_sizes=[(30, 40), (20, 25)],
    )
    post = VFNetPostprocess(score_threshold=0.2, pre_nms_top_k=3, nms_threshold=0.5, max_detections=5)
    prob = out.cls_logits[:, :6].sigmoid()  # level 0: locations ranked by max class score, not by their sum
    by_max, by_sum = prob.max(-1).values.topk(3).indices, prob.sum(-1).topk(3).indices
    assert by_max.sort().values.tolist() != by_sum.sort().values.tolist()
    got = post(out, out.image_sizes)
    for i, (h, w) in enumerate(out.image_sizes):
        boxes, scores, labels = [], [], []
        start = 0
        for lh, lw in level_sizes:
            prob = out.cls_logits[i, start : start + lh * lw].sigmoid()
            top = prob.max(1).values.argsort(descending=True)[:3].tolist()
            for loc in top:
                x, y = points[start + loc].tolist()
                l, t, r, b = out.ltrb_refine[i, start + loc].tolist()
                box = [min(max(x - l, 0), w), min(max(y - t, 0), h), min(max(x + r, 0), w), min(max(y + b, 0), h)]
                for c in range(NUM_CLASSES):
                    if prob[loc, c] > 0.2:
                        boxes.append(box)
                        scores.append(prob[loc, c].item())
                        labels.append(c)
            start += lh * lw
        boxes, scores, labels = torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels)
        keep = []
        for c in range(NUM_CLASSES):
            idx = (labels == c).nonzero().flatten()
            keep += idx[torchvision.ops.nms(boxes[idx], scores[idx], 0.5)].tolist()
        keep = sorted(keep, key=lambda k: -scores[k])[:5]
        assert len(keep) >= 3  # the case keeps several detections, of several classes
        torch.testing.assert_close(got[i]["boxes"], boxes[keep])
        torch.testing.assert_close(got[i]["scores"], scores[keep])
        assert got[i]["labels"].tolist() == labels[keep].tolist()


def test_fcos_targets_fallback():
    """use_atss=False: FCOS targets without centre sampling, as mmdet's VFNetHead (``center_sampling=False`` in
    vfnet_r50_fpn_1x_coco.py and the head's default): every location inside a box of its level's range is positive."""
    model, criterion, _ = tiny_vfnet(use_atss=False)
    images, sizes, targets = batch_two_sizes()
    with torch.no_grad():
        out = model(images, sizes)
    assert out.points[:2].tolist() == [[4.0, 4.0], [12.0, 4.0]]  # FCOS locations: s // 2
    labels, gt = criterion.assign(out, targets)
    boxes, gt_labels, valid = pad_targets(targets, torch.device("cpu"))
    want_labels, ltrb = fcos_targets(out.points, out.strides, out.levels, boxes, gt_labels, valid, NUM_CLASSES, 0.0)
    assert torch.equal(labels, want_labels) and (labels < NUM_CLASSES).sum() > 3
    centre_only, _ = fcos_targets(out.points, out.strides, out.levels, boxes, gt_labels, valid, NUM_CLASSES, 1.5)
    assert (labels < NUM_CLASSES).sum() > (centre_only < NUM_CLASSES).sum()  # centre sampling would drop some
    pos = labels < NUM_CLASSES
    torch.testing.assert_close(gt[pos], distance2bbox(out.points.expand(2, -1, -1)[pos], ltrb[pos]))
    criterion.train()
    assert all(torch.isfinite(v) for v in criterion(out, targets).values())


def test_bad_input_errors():
    model, criterion, _ = tiny_vfnet()
    images, sizes, targets = batch_two_sizes()
    with torch.no_grad():
        out = model(images, sizes)
    bad = [targets[0], {"boxes": torch.tensor([[1.0, 2, 3, 4]]), "labels": torch.tensor([NUM_CLASSES])}]
    with pytest.raises(ValueError, match=r"image 1 .* \[0, 3\)"):
        criterion(out, bad)
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        criterion(out, targets[:1])
    with pytest.raises(ValueError, match="image_sizes"):
        model(images, sizes[:1])
    with pytest.raises(ValueError, match="regress_ranges"):
        build_vfnet(NUM_CLASSES, **TINY, regress_ranges=[[0, 64], [64, 1e8]])


def test_optimizer_steps_decrease_the_loss():
    model, criterion, _ = tiny_vfnet(frozen_stages=1, frozen_bn=True)  # the COCO recipe's freezing
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    images, sizes, targets = batch_two_sizes()
    criterion.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for _ in range(10):
        loss = total(criterion(model(images, sizes), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.85 * history[0], history


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_finite(dtype):
    model, criterion, postprocess = tiny_vfnet()
    images, sizes, targets = batch_two_sizes()
    criterion.train()
    with torch.autocast("cpu", dtype=dtype):
        out = model(images, sizes)
        losses = criterion(out, targets)
    assert out.cls_logits.dtype == dtype  # the network did run in reduced precision
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    total(losses).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert len(postprocess(out, sizes)) == 2


# -- two processes (gloo) ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a missed collective fails instead of hanging
    try:
        data = torch.load(path, weights_only=False)
        model, criterion, _ = build_vfnet(NUM_CLASSES, **TINY)
        model.load_state_dict(data["state"])
        model.eval()  # BatchNorm statistics fixed: per-sample outputs do not depend on the batch
        criterion.train()
        mine = slice(2 * rank, 2 * rank + 2)
        losses = criterion(model(data["images"][mine], data["sizes"][mine]), data["targets"][mine])
        total(losses).backward()
        result = {k: v.detach() for k, v in losses.items()}
        result["grad"] = model.head.cls_logits.weight.grad.clone()
        torch.save(result, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_over_the_union(tmp_path):
    # Rank 0 gets two images with objects, rank 1 two without (one of them smaller than the padding).
    images, sizes, targets = batch_two_sizes()
    g = torch.Generator().manual_seed(1)
    more = {"boxes": torch.tensor([[30.0, 5.0, 75.0, 40.0], [5.0, 40.0, 60.0, 92.0]]), "labels": torch.tensor([1, 0])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    noise = torch.rand(2, 3, 96, 80, generator=g)
    all_images = torch.cat((images[:1], noise[:1], images[1:], noise[1:]))
    all_sizes = [sizes[0], (96, 80), sizes[1], (96, 80)]
    all_targets = [targets[0], more, empty, empty]
    model, criterion, _ = tiny_vfnet()
    path = str(tmp_path / "data.pt")
    torch.save({"state": model.state_dict(), "images": all_images, "sizes": all_sizes, "targets": all_targets}, path)

    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), path), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("two-process VFNet criterion hung")
    ranks = [torch.load(f"{path}.rank{r}", weights_only=False) for r in range(2)]

    # One process over the union of both batches (no process group: normalisers are local).
    model.eval()
    criterion.train()
    single = criterion(model(all_images, all_sizes), all_targets)
    total(single).backward()
    assert single["num_pos"] > 5
    for r in range(2):  # the normaliser every rank used is the union's, averaged over the 2 processes
        assert ranks[r]["num_pos"].item() == single["num_pos"].item() / 2
    assert ranks[1]["loss_box"].item() == 0 and ranks[1]["loss_cls"] > 0
    for key in ("loss_cls", "loss_box", "loss_box_refine"):  # DDP averages the ranks' gradients
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, single[key], rtol=1e-5, atol=1e-7, msg=key)
    torch.testing.assert_close((ranks[0]["grad"] + ranks[1]["grad"]) / 2, model.head.cls_logits.weight.grad,
                               rtol=1e-4, atol=1e-7)
