"""Frozen BatchNorms folded into their convolutions vs kept apart: DETR and FCOS R-50, timed alternately in one run.

Both models with the recipes' freezing (frozen BN, stem + layer1 frozen), the same weights on both sides (one is a
deep copy of the other, unfolded with ``unfold_frozen_batch_norm``), the 2 images of 512x512 of
``detection_speed.py`` and its step closures. Prints median wall and CPU seconds and folded / unfolded.

    PYTHONPATH=. python benchmarks/conv_bn_fold_speed.py [--steps 5] [--threads 2] [--only detr,fcos]
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: busy-waiting threads under load
import torch  # noqa: E402
from detection_speed import make_batch, task_step  # noqa: E402  (benchmarks/ is on the path when a script runs)
from timing import time_calls  # noqa: E402

from lit_tasks import DetectionTask  # noqa: E402
from lit_tasks.models.conv_bn_fold import FoldedConv2d, unfold_frozen_batch_norm  # noqa: E402


def bench(model: str, args, images, targets) -> None:
    torch.manual_seed(0)
    folded = DetectionTask(num_classes=args.num_classes, model=model, backbone="resnet50", frozen_stages=1,
                           frozen_bn=True, channels_last=args.channels_last)
    unfolded = copy.deepcopy(folded)
    unfold_frozen_batch_norm(unfolded.model.backbone)
    n = sum(type(m) is FoldedConv2d for m in folded.modules())
    assert n and not any(type(m) is FoldedConv2d for m in unfolded.modules())
    (f_train, f_infer), (u_train, u_infer) = task_step(folded, images, targets), task_step(unfolded, images, targets)
    print(f"\n{model} R-50, {n} folded convolutions, 2 x 3 x 512 x 512, {args.threads} threads, median of {args.steps}")
    print(f"{'':12} {'folded (s)':>11} {'unfolded (s)':>13} {'ratio':>6} {'cpu ratio':>10}")
    for name, f, u in (("train step", f_train, u_train), ("inference", f_infer, u_infer)):
        t = time_calls({"folded": f, "unfolded": u}, warmup=1, repeats=args.steps, alternate=True, sync=True)
        a, b = t["folded"], t["unfolded"]
        print(f"{name:12} {a.median:11.3f} {b.median:13.3f} {a.median / b.median:6.3f} "
              f"{a.median_cpu / b.median_cpu:10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--channels-last", type=int, default=1)
    parser.add_argument("--only", default="detr,fcos", help="comma-separated: detr, fcos")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, targets = make_batch(args.num_classes)
    print(f"load average before: {os.getloadavg()}")
    for model in args.only.split(","):
        bench(model, args, images, targets)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
