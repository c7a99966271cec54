"""Pose pictures (skeletons, sigma as disc size) in TensorBoard and the COCO keypoint results writer."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.synthetic.figures import FIGURE_OKS_SIGMAS, write_figures_coco
from lit_tasks import PoseTask
from lit_tasks.callbacks.pose_images import draw_pose, sigma_radii
from lit_tasks.callbacks.pose_writer import coco_keypoint_results
from lit_tasks.ops.oks import oks_nms

FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11]


def test_sigma_radii_are_crop_pixels_clamped():
    sigma = torch.tensor([[0.1, 0.2], [0.0, 0.0], [1.0, 1.0]])
    assert sigma_radii(sigma, (32, 24)) == [4, 1, 12]  # (0.1 * 24 + 0.2 * 32) / 2 = 4.4


def test_draw_pose_marks_visible_joints_with_their_radius():
    image = torch.zeros(3, 20, 20)
    points = torch.tensor([[5.0, 5.0], [15.0, 15.0], [5.0, 15.0]])
    visible = torch.tensor([True, False, True])
    big = draw_pose(image, points, [[0, 1], [0, 2]], visible, radii=[3, 3, 1])
    assert big.dtype == torch.uint8 and big.shape == (3, 20, 20)
    assert big[:, 5, 5].sum() > 0 and big[:, 5, 8].sum() > 0  # radius 3 reaches 3 px right of the joint
    assert big[:, 15, 15].sum() == 0  # hidden joint ...
    assert big[:, 10, 10].sum() == 0  # ... and its limb are not drawn
    assert big[:, 10, 5].sum() > 0  # the limb between the two visible joints is
    small = draw_pose(image, points, None, visible, radii=[1, 1, 1])
    assert small[:, 5, 5].sum() > 0 and small[:, 5, 8].sum() == 0


def test_validation_pictures_reach_tensorboard(tmp_path: Path):
    from datamodules import FiguresKeypointDataModule

    root = tmp_path / "figs"
    write_figures_coco(root, {"train2017": (2, 0), "val2017": (3, 1)}, image_size=48)
    dm = FiguresKeypointDataModule(root=str(root), num_train=2, num_val=3, image_size=48, input_size=[32, 24],
                                   batch_size=2, num_workers=0)
    task = PoseTask(num_keypoints=13, backbone="test_resnet", input_size=[32, 24], flip_index=FLIP,
                    oks_sigmas=list(FIGURE_OKS_SIGMAS), skeleton=dm.skeleton, num_log_images=2)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    (tag,) = [t for t in events.Tags()["images"] if t.startswith("val/poses")]
    picture = events.Images(tag)[-1]
    assert picture.height == 32 + 4 and picture.width == 2 * (2 * 24 + 2) + 2  # 2 crops, each truth | prediction


def test_results_writer_records_and_oks_nms_of_detector_poses():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 13, 2, generator=g) * 100
    kpts = torch.cat([base.repeat(4, 1, 1) + 0.1 * torch.randn(4, 13, 2, generator=g), torch.rand(4, 13, 1)], dim=-1)
    batches = [
        {"keypoints": kpts[:2], "scores": torch.tensor([1.0, 2.0]), "image_id": torch.tensor([7, 7]),
         "category_id": torch.tensor([1, 1]), "nms_areas": torch.tensor([900.0, 900.0])},  # detector boxes
        {"keypoints": kpts[2:], "scores": torch.tensor([1.5, 0.5]), "image_id": torch.tensor([8, 8]),
         "category_id": torch.tensor([1, 1]), "nms_areas": torch.tensor([0.0, 0.0])},  # GT boxes: no NMS
    ]
    records = coco_keypoint_results(batches, 0.9, FIGURE_OKS_SIGMAS)
    assert [(r["image_id"], r["score"]) for r in records] == [(7, 2.0), (8, 1.5), (8, 0.5)]
    assert records[0]["keypoints"] == pytest.approx(kpts[1].reshape(-1).tolist(), abs=1e-3)
    assert len(coco_keypoint_results(batches, None)) == 4 and coco_keypoint_results([], 0.9) == []
    kept = oks_nms(kpts[:2], torch.tensor([1.0, 2.0]), torch.tensor([900.0, 900.0]), 0.9, FIGURE_OKS_SIGMAS)
    assert kept.tolist() == [1]
