"""How FCOS / VFNet evaluation should run a batch of differently sized images, on this machine's CPU.

Evaluation computes each image as if alone (padded to its own multiple of 32, issue 20). Two ways do that
(``lit_tasks.ops.images.maps_as_if_alone``): ``grouped`` (one network call per padded size) and ``per image`` (one
call per image); ``group_same_sizes`` picks per image on a CPU, as measured here (2 cores, under other load:
grouped / per image 1.02-1.17 over five runs of FCOS and VFNet R50 at four 512x384 images). ``padded batch`` is the
previous way (one call on the batch padded to its largest image), which made an image's detections depend on its
batch-mates; it is timed for reference.

Two batches of 4 images: ``same`` (four 512x384 images, as a fixed-size resize gives) and ``mixed`` (COCO-like
aspect ratios resized to a 512 longer side: 512x384, 384x512, 512x341, 427x512, every padded size distinct, so
grouped is per image there). Prints the median time of the network up to the head's maps (the post-processing is
per image in every way) over ``--steps`` interleaved rounds.

    python benchmarks/detection_eval_batching.py [--model fcos] [--backbone resnet50] [--steps 3] [--threads 2]
                                                 [--device cuda]

On a GPU (``--device cuda``; every timed call is synchronised) it shows whether grouping pays there, as assumed.
"""

from __future__ import annotations

import argparse
import os

import torch
from timing import time_calls  # noqa: E402  (benchmarks/ is on the path when a script runs)

from lit_tasks import DetectionTask
from lit_tasks.ops.dense_postprocess import PADDED_LOGIT
from lit_tasks.ops.images import maps_as_if_alone, stack_padded

BATCHES = {"same": [(512, 384)] * 4, "mixed": [(512, 384), (384, 512), (512, 341), (427, 512)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fcos", choices=["fcos", "vfnet"])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = DetectionTask(num_classes=80, model=args.model, backbone=args.backbone, num_log_images=0)
    model = task.model.eval().to(args.device)
    g = torch.Generator().manual_seed(0)
    print(f"{args.model} {args.backbone} on {args.device} ({args.threads} threads), median of {args.steps}: network "
          f"forward, seconds")
    for name, sizes in BATCHES.items():
        batch, sizes = stack_padded([torch.rand(3, h, w, generator=g) for h, w in sizes], size_divisor=32)
        batch = batch.to(args.device)

        fills = [PADDED_LOGIT, 0.0, 0.0] * 5

        @torch.no_grad()
        def grouped() -> None:
            maps_as_if_alone(model.level_maps, batch, sizes, 32, fills, group=True)

        @torch.no_grad()
        def per_image() -> None:
            maps_as_if_alone(model.level_maps, batch, sizes, 32, fills, group=False)

        @torch.no_grad()
        def padded_batch() -> None:
            model.level_maps(batch, sizes)

        times = time_calls({"grouped": grouped, "per image": per_image}, warmup=1, repeats=args.steps,
                           alternate=False, sync=True)
        t_grouped, t_single = times["grouped"].median, times["per image"].median
        times = time_calls({"padded": padded_batch, "grouped": grouped}, warmup=1, repeats=args.steps,
                           alternate=False, sync=True)
        t_padded, t_grouped_again = times["padded"].median, times["grouped"].median
        print(f"{name:>6} {sizes}: grouped {t_grouped:.2f}  per image {t_single:.2f}  (grouped / per image "
              f"{t_grouped / t_single:.2f}); padded batch, the previous way: {t_padded:.2f} (grouped / padded "
              f"{t_grouped_again / t_padded:.2f})")


if __name__ == "__main__":
    main()
