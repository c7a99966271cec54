"""Evaluation under DDP gives the single-process numbers when the set does not divide by the number of processes.

Lightning's default DistributedSampler repeats samples to even out processes (5 images on 2 processes: image 0
is evaluated twice), and the metrics counted the repeats. BaseDataModule's evaluation loaders now give every
sample to exactly one process.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from datamodules import ShapesDetectionDataModule, ShapesSegmentationDataModule
from lit_tasks import DetectionTask, SemanticSegmentationTask


def _validate(task, dm, devices: int, tmp_path) -> dict[str, float]:
    strategy = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, **strategy)
    (metrics,) = trainer.validate(task, dm, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.timeout(400)
def test_detection_map_of_5_images_on_2_processes_equals_one_process(tmp_path):
    torch.manual_seed(0)
    task = DetectionTask(num_classes=5, backbone="resnet10t", fpn_channels=16, head_convs=1, score_threshold=0.0,
                         num_log_images=0)
    with torch.no_grad():  # boxes of a few strides, so that some predictions overlap the shapes
        task.model.head.bbox_pred.bias.fill_(2.0)
    dm = lambda: ShapesDetectionDataModule(num_train=2, num_val=5, image_size=64, batch_size=2, num_workers=0)  # noqa: E731
    single = _validate(task, dm(), 1, tmp_path)
    ddp = _validate(task, dm(), 2, tmp_path)
    assert single["val/mar_100"] > 0  # a comparison that can fail
    for key in ("val/map", "val/map_50", "val/mar_100"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


@pytest.mark.timeout(400)
def test_segmentation_scores_of_5_images_on_2_processes_equal_one_process(tmp_path):
    torch.manual_seed(0)
    task = SemanticSegmentationTask(num_classes=6, backbone="test_resnet", head_channels=8, num_log_images=0)
    dm = lambda: ShapesSegmentationDataModule(num_train=2, num_val=5, image_size=32, batch_size=2, num_workers=0)  # noqa: E731
    single = _validate(task, dm(), 1, tmp_path)
    ddp = _validate(task, dm(), 2, tmp_path)
    for key in ("val/PA", "val/mIoU", "val/FWIoU"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-12), key
