"""FCOS under DDP when a process has no positive location (images without objects, crowd-only images).

Every process must make the same collective calls: the old loss all-reduced the positive count, then returned
early on a rank without positives and skipped the second all-reduce (the centerness sum); gloo then aborts and
NCCL hangs or pairs the wrong buffers (REFERENCE.md §3.3: mmdet computes every normaliser before its
no-positive branch).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddp_helpers import run_processes
from lit_tasks.models.detection.fcos import build_fcos


def _batches() -> tuple[torch.Tensor, list[dict], torch.Tensor, list[dict]]:
    gen = torch.Generator().manual_seed(0)
    images_a = torch.rand(2, 3, 64, 64, generator=gen)
    images_b = torch.rand(2, 3, 64, 64, generator=gen)
    with_objects = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])},
                    {"boxes": torch.tensor([[20.0, 4.0, 60.0, 30.0], [2.0, 30.0, 30.0, 62.0]]), "labels": torch.tensor([0, 2])}]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
             {"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0]]), "labels": torch.tensor([1]),
              "iscrowd": torch.tensor([1])}]  # crowd only: no positive either
    return images_a, with_objects, images_b, empty


def _trio():
    torch.manual_seed(0)
    model, criterion, postprocess = build_fcos(3, backbone="resnet10t", fpn_channels=16, head_convs=1)
    # BatchNorm in eval mode: batch statistics would differ between 2 images per process and 4 in one process.
    return model.eval(), criterion.train(), postprocess


def _criterion_worker(rank: int, world: int, out: str) -> None:
    model, criterion, _ = _trio()
    images_a, with_objects, images_b, empty = _batches()
    images, targets = (images_a, with_objects) if rank == 0 else (images_b, empty)
    losses = criterion(model(images, [(64, 64)] * 2), targets)
    sum(losses.values()).backward()  # the graph must reach every head parameter on the rank without positives
    grads = [p.grad is not None for p in model.head.parameters()]
    Path(out, f"rank{rank}.json").write_text(json.dumps({k: float(v) for k, v in losses.items()} | {"grads": all(grads)}))


@pytest.mark.timeout(180)
def test_criterion_with_a_rank_without_positives_matches_one_process(tmp_path):
    run_processes(_criterion_worker, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["grads"] for r in ranks)
    assert ranks[1]["loss_box"] == 0.0 and ranks[1]["loss_centerness"] == 0.0 and ranks[1]["loss_cls"] > 0
    # DDP averages gradients over processes, so the mean of the per-process losses is what is optimised; with
    # normalisers reduced over processes it equals one process's loss on both batches together.
    model, criterion, _ = _trio()
    images_a, with_objects, images_b, empty = _batches()
    single = criterion(model(torch.cat([images_a, images_b]), [(64, 64)] * 4), with_objects + empty)
    for key, value in single.items():
        mean = sum(r[key] for r in ranks) / 2
        # float32 sums over 4 images x ~100 locations x 3 classes, reduced in another order: a few ulp x terms
        assert mean == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
