"""Segmentation speed, side by side with named references, measured in the same run.

1. Metric update throughput (megapixels/s), 21 classes, 8x512x512 label maps with ~10% ignored pixels:
   ours (``SegmentationMetrics``; one ``bincount`` with ignored pixels sent to a spare bin) vs torchmetrics
   ``MulticlassJaccardIndex(validate_args=False)`` (boolean-mask gather, then ``bincount``). Target: >= 2x.
2. Training step time (forward + backward + SGD step), 2x3x512x512, 21 classes: our DeepLabV3 ResNet-50 at
   output stride 8 (no auxiliary head) vs ``torchvision.models.segmentation.deeplabv3_resnet50(weights=None)``
   (also OS 8, no auxiliary head). Target ratio ours / torchvision <= 1.0. Both are timed with and without
   channels_last, so the flag's own effect is visible.

Measurements are interleaved round by round and summarised by the median, so a busy machine slows both sides
alike. Usage: ``python benchmarks/segmentation_speed.py [--size 512] [--rounds 5] [--skip-train]``.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from timing import time_calls  # noqa: E402  (benchmarks/ is on the path when a script runs)
from torchmetrics.classification import MulticlassJaccardIndex

from lit_tasks.metrics.segmentation import SegmentationMetrics
from lit_tasks.segmentation import SemanticSegmentationTask


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each case, measured in alternating order."""
    return {name: t.median for name, t in time_calls(cases, warmup=warmup, repeats=rounds).items()}


def metric_benchmark(rounds: int, num_classes: int = 21, shape=(8, 512, 512)) -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, num_classes, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.1] = 255
    preds = torch.randint(0, num_classes, shape, generator=g)
    ours = SegmentationMetrics(num_classes, ignore_index=255, validate_args=False)
    ours_checked = SegmentationMetrics(num_classes, ignore_index=255, validate_args=True)
    theirs = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=255, validate_args=False)
    cases = {
        "ours (validate_args=False)": lambda: ours.update(preds, target),
        "ours (validate_args=True)": lambda: ours_checked.update(preds, target),
        "torchmetrics MulticlassJaccardIndex": lambda: theirs.update(preds, target),
    }
    med = interleaved(cases, rounds * 4, warmup=2)
    assert torch.equal(ours.confmat, theirs.confmat.to(ours.confmat.dtype)), "confusion matrices differ"
    mpix = preds.numel() / 1e6
    ref = med["torchmetrics MulticlassJaccardIndex"]
    print(f"\n[1] metric update, {num_classes} classes, batch {tuple(shape)} int64 labels, torch threads {torch.get_num_threads()}")
    for name, t in med.items():
        print(f"  {name:<38} {1e3 * t:8.2f} ms  {mpix / t:8.1f} MP/s  speed-up x{ref / t:.2f}")


def train_step_fn(model: torch.nn.Module, forward: Callable, images: torch.Tensor, masks: torch.Tensor) -> Callable:
    """One SGD step (the DeepLab recipe's optimizer) of ``model`` on a fixed batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(forward(images), masks, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_benchmark(rounds: int, size: int, batch: int = 2, num_classes: int = 21) -> None:
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size)
    masks = torch.randint(0, num_classes, (batch, size, size))
    cases = {}
    for cl in (True, False):
        ours = SemanticSegmentationTask(num_classes=num_classes, model="deeplabv3", backbone="resnet50",
                                        output_stride=8, aux_weight=0.0, channels_last=cl)  # fmt: skip
        cases[f"ours DeepLabV3-R50 OS8{' channels_last' if cl else ''}"] = train_step_fn(ours, ours, images, masks)
    for cl in (True, False):
        tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                num_classes=num_classes, aux_loss=False)  # fmt: skip
        x = images
        if cl:
            tv = tv.to(memory_format=torch.channels_last)
            x = images.contiguous(memory_format=torch.channels_last)
        cases[f"torchvision deeplabv3_resnet50{' channels_last' if cl else ''}"] = train_step_fn(
            tv, lambda inp, m=tv: m(inp)["out"], x, masks
        )
    med = interleaved(cases, rounds)
    ref = med["torchvision deeplabv3_resnet50"]
    print(f"\n[2] training step, {batch}x3x{size}x{size}, {num_classes} classes, torch threads {torch.get_num_threads()}")
    for name, t in med.items():
        print(f"  {name:<46} {t:8.3f} s/step  ratio to torchvision (NCHW) {t / ref:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="training benchmark image side")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--skip-train", action="store_true", help="only the metric benchmark")
    args = parser.parse_args()
    metric_benchmark(args.rounds)
    if not args.skip_train:
        train_benchmark(args.rounds, args.size)


if __name__ == "__main__":
    main()
