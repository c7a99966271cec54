"""Pose speed: what RLE's flow costs in training, and that inference is the plain regression network.

1. Training step (forward + loss + backward + Adam step) of ``PoseTask(loss="rle")`` vs the same network with
   ``loss="l1"`` (direct regression), ResNet-50 at 256x192, batch 32, 17 keypoints (the paper's COCO setting),
   measured alternately round by round (median). Target: the RLE step at most 1.10x the L1 step. The loss alone
   (RealNVP log-density of 32 x 17 residuals, forward + backward) is timed too, as a fraction of the RLE step.
2. Inference (the exported graph, ``PoseTask.export_module()``, flip test off and on): the RLE and L1 tasks
   build the same modules -- no flow parameter in the inference graph -- and run at the same speed.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/pose_speed.py [--backbone resnet50] [--batch 32] [--rounds 5]``.
Interleaving makes a busy machine slow both sides alike; report ``uptime``'s load with the figures.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from timing import time_calls  # noqa: E402  (benchmarks/ is on the path when a script runs)

from lit_tasks.pose import PoseTask


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each case, measured in alternating order."""
    return {name: t.median for name, t in time_calls(cases, warmup=warmup, repeats=rounds).items()}


def make_task(loss: str, backbone: str, size: tuple[int, int]) -> PoseTask:
    torch.manual_seed(0)
    return PoseTask(num_keypoints=17, backbone=backbone, loss=loss, input_size=list(size), num_log_images=0)


def train_step(task: PoseTask, images: torch.Tensor, keypoints: torch.Tensor) -> Callable[[], None]:
    """One step of the default recipe's optimizer (Adam) on a fixed batch."""
    optimizer = task.default_optimizer(task.param_groups())
    task.train()

    def step() -> None:
        loss = task.total_loss(task.compute_losses({"image": images, "keypoints": keypoints}), "train")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def loss_only(task: PoseTask, batch: int, k: int) -> Callable[[], None]:
    """The RLE loss alone (flow log-density and its backward) on random head outputs."""
    g = torch.Generator().manual_seed(1)
    coords = torch.randn(batch, k, 2, generator=g).mul_(0.1).requires_grad_()
    sigma = torch.rand(batch, k, 2, generator=g).mul_(0.5).add_(0.01).requires_grad_()
    target = torch.rand(batch, k, 2, generator=g) - 0.5
    weight = torch.ones(batch, k, dtype=torch.bool)

    def step() -> None:
        task.criterion(coords, sigma, target, weight).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = (args.height, args.width)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, *size, generator=g)
    keypoints = torch.cat([torch.rand(args.batch, 17, 2, generator=g) * torch.tensor([size[1], size[0]]),
                           torch.randint(0, 3, (args.batch, 17, 1), generator=g).float()], dim=-1)
    rle, l1 = make_task("rle", args.backbone, size), make_task("l1", args.backbone, size)
    l1.model.load_state_dict(rle.model.state_dict())
    print(f"{args.backbone} {size[0]}x{size[1]}, batch {args.batch}, 17 keypoints, torch threads "
          f"{torch.get_num_threads()}")

    cases = {"rle step": train_step(rle, images, keypoints), "l1 step": train_step(l1, images, keypoints),
             "rle loss alone": loss_only(rle, args.batch, 17)}
    med = interleaved(cases, args.rounds)
    print("\n[1] training step (forward + loss + backward + Adam)")
    for name, t in med.items():
        print(f"  {name:<16} {t:9.4f} s")
    print(f"  RLE / L1 step ratio {med['rle step'] / med['l1 step']:.3f} (target <= 1.10); the loss alone is "
          f"{100 * med['rle loss alone'] / med['rle step']:.2f} % of the RLE step")

    print("\n[2] inference (export_module), eval mode, no grad")
    rle.eval(), l1.eval()
    l1.model.load_state_dict(rle.model.state_dict())
    for flip in (False, True):
        rle.flip_test = l1.flip_test = flip
        graphs = {"rle": rle.export_module(), "l1": l1.export_module()}
        names = {k: sorted(n for n, _ in m.named_parameters()) for k, m in graphs.items()}
        assert names["rle"] == names["l1"] and not any("flow" in n for n in names["rle"]), "graphs differ"
        with torch.no_grad():
            assert torch.equal(graphs["rle"](images), graphs["l1"](images)), "outputs differ"
            med = interleaved({k: (lambda m=m: m(images)) for k, m in graphs.items()}, args.rounds)
        print(f"  flip_test={flip!s:<5} rle {med['rle']:.4f} s   l1 {med['l1']:.4f} s   ratio "
              f"{med['rle'] / med['l1']:.3f}   (same modules, {len(names['rle'])} parameter tensors, no flow)")


if __name__ == "__main__":
    main()
