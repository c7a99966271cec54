"""The detector trio contract: any (model, criterion, postprocess) triple runs through DetectionTask.

A contributor adding a detector writes ``build_<name>`` returning three modules; this fake one (a fixed grid of
boxes scored by a 1x1 conv) checks that fit, validate (COCO mAP against known boxes) and predict need nothing
else from the task.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from datamodules import ShapesDetectionDataModule
from lit_tasks import DetectionTask


class FakeDetector(nn.Module):
    """One box per cell of an 8-px grid (the cell itself), class logits from a 1x1 conv on a strided conv."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 8, stride=8)
        self.cls = nn.Conv2d(8, num_classes, 1)

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        logits = self.cls(F.relu(self.backbone(images)))  # (B, C, H/8, W/8)
        h, w = logits.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h) * 8.0, torch.arange(w) * 8.0, indexing="ij")
        boxes = torch.stack([xs, ys, xs + 8, ys + 8], -1).reshape(-1, 4)
        return {"logits": logits.flatten(2).transpose(1, 2), "boxes": boxes, "sizes": image_sizes}


class FakeCriterion(nn.Module):
    def forward(self, out: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        target = torch.zeros_like(out["logits"])
        for i, t in enumerate(targets):  # a cell is positive for a class when its centre lies in a box
            centres = (out["boxes"][:, :2] + out["boxes"][:, 2:]) / 2
            for box, label in zip(t["boxes"], t["labels"]):
                inside = (centres >= box[:2]).all(1) & (centres <= box[2:]).all(1)
                target[i, inside, label] = 1.0
        return {"loss_cls": F.binary_cross_entropy_with_logits(out["logits"], target), "cells": target.sum()}


class FakePostprocess(nn.Module):
    @torch.no_grad()
    def forward(self, out: dict, image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        scores, labels = out["logits"].sigmoid().max(-1)
        return [{"boxes": out["boxes"], "scores": s, "labels": c} for s, c in zip(scores, labels)]


class FakeDetectionTask(DetectionTask):
    def configure_models(self) -> None:
        self.model = FakeDetector(self.hparams.num_classes)
        self.criterion, self.postprocess = FakeCriterion(), FakePostprocess()


def test_a_fake_trio_fits_validates_and_predicts(tmp_path):
    dm = ShapesDetectionDataModule(num_train=6, num_val=4, image_size=32, batch_size=2, num_workers=0, max_objects=2)
    task = FakeDetectionTask(num_classes=5, num_log_images=0, warmup_steps=0, channels_last=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, dm)
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and "train/cells" in metrics  # non-loss values logged too
    assert 0.0 <= float(metrics["val/map"]) <= 1.0 and math.isfinite(float(metrics["val/loss"]))
    predictions = trainer.predict(task, dm)
    first = predictions[0][0]
    assert first["boxes"].shape == (16, 4) and first["scores"].shape == (16,) and "image_id" in first
    # The loss is the criterion's loss_* entries summed: "cells" is logged, not optimised.
    out = task.model(torch.rand(1, 3, 32, 32), [(32, 32)])
    target = {"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0]]), "labels": torch.tensor([1])}
    losses = task.compute_losses((None, [target]), out)
    assert float(task.total_loss(losses, "train")) == float(losses["loss_cls"]) and float(losses["cells"]) == 4.0
