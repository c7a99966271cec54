"""Speed: our FCOS ResNet-50 FPN vs torchvision's ``fcos_resnet50_fpn``, like for like, in one run.

Same num_classes, no pretrained weights, the same 2 images of 512x512 with 5 boxes each, 2 threads.
torchvision's transform would upsize 512-px inputs to 800, so it is told min_size = max_size = 512.
Runs ours and torchvision's alternately and prints median training-step time (forward + backward + SGD step) and median inference time, and the
ratios ours / torchvision (target: both <= 1.0).

    python benchmarks/detection_speed.py [--steps 5] [--threads 2] [--device cuda]

On a GPU (``--device cuda``) both run there and every timed call is synchronised (benchmarks/gpu_check.py does this).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from lit_tasks import DetectionTask


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


def synchronize() -> None:
    """Wait for queued GPU work, so a wall time covers it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_pair(a, b, steps: int) -> tuple[float, float]:
    """Median wall times of ``a()`` and ``b()``, run alternately (after one warm-up each) so load hits both alike."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(steps):
        for fn, times in ((a, times_a), (b, times_b)):
            synchronize()
            t0 = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times_a), statistics.median(times_b)


def to_device(images: torch.Tensor, targets: list[dict], device: str) -> tuple[torch.Tensor, list[dict]]:
    return images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--channels-last", type=int, default=1, help="our channels_last flag (1/0; the task default is 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, targets = to_device(*make_batch(args.num_classes), args.device)

    ours = DetectionTask(num_classes=args.num_classes, backbone="resnet50", channels_last=args.channels_last).to(args.device)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)

    def ours_train() -> None:
        ours.train()
        loss = ours.losses(ours.model(images, [tuple(images.shape[-2:])] * len(images)), targets)["loss"]
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()

    def ours_infer() -> None:
        ours.eval()
        with torch.no_grad():
            ours(images)

    # torchvision: num_classes counts no background for FCOS (sigmoid classifier), like ours.
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
                                                        num_classes=args.num_classes, min_size=512, max_size=512)
    tv = tv.to(args.device)
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

    rows = []
    for name, a, b in (("train step", ours_train, tv_train), ("inference", ours_infer, tv_infer)):
        t_ours, t_tv = timed_pair(a, b, args.steps)
        rows.append((name, t_ours, t_tv, t_ours / t_tv))
    where = args.device if args.device != "cpu" else f"{args.threads} threads"
    print(f"FCOS R50-FPN, 2 x 3 x 512 x 512, {where}, median of {args.steps}")
    print(f"{'':12} {'ours (s)':>10} {'torchvision (s)':>16} {'ours/tv':>8}")
    for name, t_ours, t_tv, ratio in rows:
        print(f"{name:12} {t_ours:10.3f} {t_tv:16.3f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
