"""VFNet's star-shaped deformable convolution: ``lit_tasks.ops.star_conv.star_conv3x3`` against
``torchvision.ops.deform_conv2d`` with the star offsets, and an ordinary 3x3 convolution for scale.

VFNet R-50 FPN at 512x512: batch 2, 256 channels, levels P3-P7 of 64, 32, 16, 8 and 4 cells, box distances up to a
few cells (so some taps fall outside the map). Each case is timed alternately with the others in one run
(benchmarks/timing.py); prints median wall times (with the star's gather of the 25 neighbours alone, the rest
being its 1x1 convolution over 9C channels), the ratios star / deform_conv2d and star / conv3x3, forward
(no grad) and forward + backward (gradients of input, weight and box distances, as in VFNet's training step), and
the load average, so the run's conditions go with its numbers.

    python benchmarks/star_conv_speed.py [--repeats 5] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from timing import time_calls  # noqa: E402  (benchmarks/ is on the path when a script runs)
from torchvision.ops import deform_conv2d

from lit_tasks.models.detection.vfnet import star_dcn_offsets
from lit_tasks.ops.star_conv import star_conv3x3, star_gather


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="64,32,16,8,4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, sync = torch.device(args.device), args.device != "cpu"
    print(f"device {device}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    g = torch.Generator().manual_seed(0)
    for size in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(2, 256, size, size, generator=g).to(device).requires_grad_()
        ltrb = (torch.rand(2, 4, size, size, generator=g) * 4).to(device).requires_grad_()
        w = (torch.randn(256, 256, 3, 3, generator=g) * 0.01).to(device).requires_grad_()
        forward = {
            "deform_conv2d": lambda: deform_conv2d(x, star_dcn_offsets(ltrb), w, padding=(1, 1)),
            "star": lambda: star_conv3x3(x, ltrb, w),
            "gather": lambda: star_gather(x, ltrb),
            "conv3x3": lambda: F.conv2d(x, w, padding=1),
        }
        with torch.no_grad():
            fwd = time_calls(forward, warmup=1, repeats=args.repeats, sync=sync)
        both = time_calls({k: (lambda f=f: f().sum().backward()) for k, f in forward.items()},
                          warmup=1, repeats=args.repeats, sync=sync)
        for name, t in (("forward", fwd), ("fwd+bwd", both)):
            d, s, g_, c = (t[k].median for k in ("deform_conv2d", "star", "gather", "conv3x3"))
            print(f"{size:3d}x{size:<3d} {name:8s} deform_conv2d {d * 1e3:8.1f} ms  star {s * 1e3:8.1f} ms "
                  f"(gather {g_ * 1e3:6.1f})  conv3x3 {c * 1e3:8.1f} ms  star/deform {s / d:5.2f}  "
                  f"star/conv3x3 {s / c:5.2f}", flush=True)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
