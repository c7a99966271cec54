"""Speed of the detectors, each against its reference, measured alternately in one run (load hits both alike).

1. FCOS: our FCOS ResNet-50 FPN vs torchvision's ``fcos_resnet50_fpn`` (target ours / tv <= 1.0).
2. VFNet: our VFNet ResNet-50 FPN vs our FCOS, same backbone (target VFNet / FCOS: training step <= 1.25,
   inference <= 1.2; the paper reports VFNet at about ATSS / FCOS speed), VFNet twice: with the star-shaped
   deformable convolution as ``lit_tasks.ops.star_conv`` computes it (forced onto ``--device``) and with
   ``torchvision.ops.deform_conv2d``.
3. DETR: our DETR R-50 vs Hugging Face ``DetrForObjectDetection`` (random init, timm ``resnet50`` backbone, the
   recipe's freezing on both sides: frozen BN, stem + layer1 frozen; 100 queries, 6 + 6 layers, auxiliary losses)
   (target ours / HF <= 0.8), the share of our Hungarian matching in our training step, and our matcher against
   the reference's way (the whole [B*Q, sum T] cost matrix built and copied to the CPU, then split) at B=8, Q=100,
   20 boxes per image.

Same num_classes (80), no pretrained weights, the same 2 images of 512x512 with 5 boxes each, ``--threads``
threads. torchvision's transform would upsize 512-px inputs to 800, so it is told min_size = max_size = 512.
Prints median training-step time (forward + backward + optimizer step) and median inference time.

    python benchmarks/detection_speed.py [--steps 5] [--threads 2] [--only fcos,vfnet,detr,matcher] [--device cuda]

On a GPU (``--device cuda``) every model runs there and every timed call is synchronised (benchmarks/gpu_check.py
does this); the matcher part stays on CPU tensors.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: busy-waiting threads under load
import torch  # noqa: E402
import torchvision  # noqa: E402
from timing import time_call, time_calls  # noqa: E402  (benchmarks/ is on the path when a script runs)

from lit_tasks import DetectionTask
from lit_tasks.ops.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from lit_tasks.ops.matcher import hungarian_match


def make_batch(num_classes: int, size: int = 512, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Two [0, 1] images with 5 random boxes each."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, size, size, generator=g)
    targets = []
    for _ in range(2):
        xy = torch.rand(5, 2, generator=g) * (size - 160)
        wh = 20 + torch.rand(5, 2, generator=g) * 140
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, num_classes, (5,), generator=g),
                        "size": torch.tensor([size, size]), "orig_size": torch.tensor([size, size])})
    return images, targets


def timed_pair(a, b, steps: int) -> tuple[float, float]:
    """Median wall times of ``a()`` and ``b()``, run alternately, the order reversed every other round (after one
    warm-up each), so load and cache state hit both alike."""
    times = time_calls({"a": a, "b": b}, warmup=1, repeats=steps, alternate=True, sync=True)
    return times["a"].median, times["b"].median


def sizes_of(images: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(images.shape[-2:])] * len(images)


def to_device(images: torch.Tensor, targets: list[dict], device: str) -> tuple[torch.Tensor, list[dict]]:
    return images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]


def task_step(task: DetectionTask, images: torch.Tensor, targets: list[dict]):
    """(train step, inference) closures of a DetectionTask with its default optimizer's kind at a small LR."""
    task.to(images.device)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-5) if task.hparams.model == "detr" else
           torch.optim.SGD(params, lr=1e-4, momentum=0.9))

    def train() -> None:
        task.train()
        loss = task.total_loss(task.compute_losses((images, targets), task.model(images, sizes_of(images))), "train")
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer() -> None:
        task.eval()
        with torch.no_grad():
            task(images)

    return train, infer


def where(args) -> str:
    return args.device if args.device != "cpu" else f"{args.threads} threads"


def print_rows(title: str, names: tuple[str, str], rows: list[tuple[str, float, float]]) -> None:
    a, b = names
    print(f"\n{title}")
    print(f"{'':12} {a + ' (s)':>14} {b + ' (s)':>14} {a + '/' + b:>14}")
    for name, t_a, t_b in rows:
        print(f"{name:12} {t_a:14.3f} {t_b:14.3f} {t_a / t_b:14.2f}")


def bench_fcos(args, images, targets) -> None:
    ours = DetectionTask(num_classes=args.num_classes, backbone="resnet50", channels_last=args.channels_last)
    ours_train, ours_infer = task_step(ours, images, targets)

    # torchvision: num_classes counts no background for FCOS (sigmoid classifier), like ours.
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
                                                        num_classes=args.num_classes, min_size=512, max_size=512)
    tv = tv.to(images.device)
    tv_opt = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)
    tv_images = list(images)
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]

    def tv_train() -> None:
        tv.train()
        loss = sum(tv(tv_images, tv_targets).values())
        tv_opt.zero_grad()
        loss.backward()
        tv_opt.step()

    def tv_infer() -> None:
        tv.eval()
        with torch.no_grad():
            tv(tv_images)

    rows = [(name, *timed_pair(a, b, args.steps))
            for name, a, b in (("train step", ours_train, tv_train), ("inference", ours_infer, tv_infer))]
    print_rows(f"FCOS R50-FPN, 2 x 3 x 512 x 512, {where(args)}, median of {args.steps}",
               ("ours", "tv"), rows)


def star_conv_on(task: DetectionTask, devices: frozenset[str]) -> DetectionTask:
    """Make every VFNet star-shaped deformable convolution of ``task`` take the star path on ``devices`` (empty:
    always ``torchvision.ops.deform_conv2d``)."""
    from lit_tasks.models.detection.vfnet import DeformConv3x3

    for module in task.modules():
        if isinstance(module, DeformConv3x3):
            module.STAR_DEVICES = devices
    return task


def bench_vfnet(args, images, targets) -> None:
    """VFNet (star conv, and torchvision's deform_conv2d) vs FCOS: the same backbone, FPN width, frozen parts (none)
    and images; paper head depths. The three run alternately, so load hits them alike."""
    device = images.device.type
    cases = {}
    for name, model, star in (("VFNet star", "vfnet", frozenset({device})), ("VFNet dcn", "vfnet", frozenset()),
                              ("FCOS", "fcos", None)):
        torch.manual_seed(0)
        task = DetectionTask(num_classes=args.num_classes, model=model, backbone="resnet50",
                             channels_last=args.channels_last)
        cases[name] = task_step(star_conv_on(task, star) if star is not None else task, images, targets)
    print(f"\nVFNet (star conv / torchvision deform_conv2d) vs FCOS, R50-FPN, 2 x 3 x 512 x 512, {where(args)}, "
          f"median of {args.steps} (targets VFNet star / FCOS: train <= 1.25, inference <= 1.2)")
    print("(wall-time medians; the last column is the ratio of this process's CPU-time medians, which other "
          "processes on the machine disturb less)")
    print(f"{'':12} {'star (s)':>10} {'dcn (s)':>10} {'FCOS (s)':>10} {'star/FCOS':>10} {'dcn/FCOS':>10} "
          f"{'star/dcn':>10} {'star/FCOS cpu':>14}")
    for i, stage in enumerate(("train step", "inference")):
        times = time_calls({name: fns[i] for name, fns in cases.items()}, warmup=1, repeats=args.steps, sync=True)
        star, dcn, fcos = (times[name].median for name in cases)
        cpu = times["VFNet star"].median_cpu / times["FCOS"].median_cpu
        print(f"{stage:12} {star:10.3f} {dcn:10.3f} {fcos:10.3f} {star / fcos:10.2f} {dcn / fcos:10.2f} "
              f"{star / dcn:10.2f} {cpu:14.2f}", flush=True)


def bench_detr(args, images, targets) -> None:
    """Our DETR R-50 against Hugging Face's, recipe freezing on both; plus our matcher's share of the step."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from lit_tasks.models.backbone import Normalize

    torch.manual_seed(0)
    ours = DetectionTask(num_classes=args.num_classes, model="detr", backbone="resnet50", frozen_stages=1,
                         frozen_bn=True, channels_last=args.channels_last)
    ours_train, ours_infer = task_step(ours, images, targets)
    config = transformers.DetrConfig(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False,
                                     num_labels=args.num_classes, auxiliary_loss=True)
    hf = transformers.DetrForObjectDetection(config).to(images.device)
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5)
    pixel_values = Normalize()(images)
    pixel_mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long, device=images.device)
    scale = torch.tensor([images.shape[-1], images.shape[-2]] * 2, dtype=torch.float32, device=images.device)
    labels = [{"class_labels": t["labels"], "boxes": box_xyxy_to_cxcywh(t["boxes"]) / scale} for t in targets]
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)

    def hf_train() -> None:
        hf.train()
        loss = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
        hf_opt.zero_grad()
        loss.backward()
        hf_opt.step()

    def hf_infer() -> None:
        hf.eval()
        with torch.no_grad():
            out = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
            out.logits.softmax(-1)[..., :-1].max(-1)  # the same post-processing work as ours
            box_cxcywh_to_xyxy(out.pred_boxes) * scale

    rows = [(name, *timed_pair(a, b, args.steps))
            for name, a, b in (("train step", ours_train, hf_train), ("inference", ours_infer, hf_infer))]
    print_rows(f"DETR R-50 (frozen BN, stem + layer1 frozen; {n_ours / 1e6:.2f}M vs {n_hf / 1e6:.2f}M trainable "
               f"parameters), 2 x 3 x 512 x 512, {where(args)}, median of {args.steps} (target <= 0.8)",
               ("ours", "HF"), rows)

    # The matching's share of our step: the same call the criterion makes (every decoder layer at once).
    ours.train()
    with torch.no_grad():
        out = ours.model(images, sizes_of(images))
        tgt_labels = [t["labels"] for t in targets]
        tgt_boxes = [box_xyxy_to_cxcywh(t["boxes"]) / scale for t in targets]
    layers = out.logits.shape[0]
    match = lambda: hungarian_match(out.logits.flatten(0, 1), out.boxes.flatten(0, 1),  # noqa: E731
                                    tgt_labels * layers, tgt_boxes * layers)
    t_match = time_call(match, warmup=1, repeats=args.steps, sync=True).median
    print(f"matching in our train step ({layers} decoder layers x 2 images): {t_match * 1e3:.1f} ms = "
          f"{100 * t_match / rows[0][1]:.1f} % of the step")


def reference_match(logits: torch.Tensor, boxes: torch.Tensor, labels: list[torch.Tensor], tgt: list[torch.Tensor],
                    weights=(1.0, 5.0, 2.0), return_costs: bool = False) -> list:
    """facebookresearch/detr's HungarianMatcher, restated: one [B*Q, sum T] cost matrix, copied whole to the CPU."""
    from scipy.optimize import linear_sum_assignment

    batch, queries = logits.shape[:2]
    prob = logits.flatten(0, 1).softmax(-1)
    out_bbox = boxes.flatten(0, 1)
    tgt_ids, tgt_bbox = torch.cat(labels), torch.cat(tgt)
    cost = (weights[1] * torch.cdist(out_bbox, tgt_bbox, p=1) - weights[0] * prob[:, tgt_ids]
            - weights[2] * generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox)))
    cost = cost.view(batch, queries, -1).cpu()
    sizes = [len(t) for t in tgt]
    blocks = [c[i] for i, c in enumerate(cost.split(sizes, -1))]
    return blocks if return_costs else [linear_sum_assignment(c) for c in blocks]


def bench_matcher(args) -> None:
    g = torch.Generator().manual_seed(0)
    batch, queries, per_image, classes = 8, 100, 20, 91
    logits = torch.randn(batch, queries, classes + 1, generator=g)
    boxes = torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25
    labels = [torch.randint(0, classes, (per_image,), generator=g) for _ in range(batch)]
    tgt = [torch.rand(per_image, 4, generator=g) * 0.5 + 0.25 for _ in range(batch)]
    ours = lambda: hungarian_match(logits, boxes, labels, tgt)  # noqa: E731
    ref = lambda: reference_match(logits, boxes, labels, tgt)  # noqa: E731
    # Same optimum (indices may differ on ties): our assignment's cost on the reference's cost blocks.
    blocks = reference_match(logits, boxes, labels, tgt, return_costs=True)
    total_ref = sum(float(c[i, j].sum()) for c, (i, j) in zip(blocks, ref()))
    total_ours = sum(float(c[i.numpy(), j.numpy()].sum()) for c, (i, j) in zip(blocks, ours()))
    assert abs(total_ours - total_ref) < 1e-3, (total_ours, total_ref)
    t_ours, t_ref = timed_pair(ours, ref, max(args.steps, 20))
    print(f"\nMatcher, B={batch}, Q={queries}, {per_image} boxes per image, CPU tensors, median of "
          f"{max(args.steps, 20)}: ours {t_ours * 1e3:.2f} ms, whole cost matrix copied (reference) "
          f"{t_ref * 1e3:.2f} ms, ratio {t_ours / t_ref:.2f} (on a GPU the reference also copies {batch}x the "
          f"{queries * per_image * batch * 4 / 1e3:.0f} kB it needs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--channels-last", type=int, default=1,
                        help="our channels_last flag (1/0; the task default is 1)")
    parser.add_argument("--only", default="fcos,vfnet,detr,matcher", help="comma-separated parts to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, targets = to_device(*make_batch(args.num_classes), args.device)
    print(f"load average before: {os.getloadavg()}")
    parts = set(args.only.split(","))
    if "fcos" in parts:
        bench_fcos(args, images, targets)
    if "vfnet" in parts:
        bench_vfnet(args, images, targets)
    if "detr" in parts:
        bench_detr(args, images, targets)
    if "matcher" in parts:
        bench_matcher(args)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
