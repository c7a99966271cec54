"""Albumentations presets: tensor format, box geometry under resize and flip, clipping and filtering."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.detection import DetectionDataset
from datamodules.transforms import detection_train_transforms, detection_val_transforms


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _run(tf, image, boxes, labels, crowd):
    return tf(
        image=image,
        bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        iscrowd=np.asarray(crowd, dtype=np.int64),
    )


def test_val_preset_returns_unnormalised_float_chw_and_scaled_boxes():
    image = _image(40, 80)
    out = _run(detection_val_transforms(80), image, [[8, 4, 24, 36]], [3], [1])
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 40, 80)
    # Same size: the preset is exactly /255, no mean/std.
    torch.testing.assert_close(out["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    out = _run(detection_val_transforms(40), image, [[8, 4, 24, 36]], [3], [1])
    assert out["image"].shape == (3, 20, 40)
    np.testing.assert_allclose(out["bboxes"], [[4, 2, 12, 18]], atol=1e-4)
    assert list(out["labels"]) == [3] and list(out["iscrowd"]) == [1]


def test_boxes_are_clipped_and_boxes_outside_are_dropped_with_their_labels():
    boxes = [[-5, -5, 10, 10], [60, 0, 70, 5], [40, 45, 55, 60]]
    out = _run(detection_val_transforms(50), _image(50, 50), boxes, [0, 1, 2], [0, 0, 1])
    np.testing.assert_allclose(out["bboxes"], [[0, 0, 10, 10], [40, 45, 50, 50]], atol=1e-4)
    assert list(out["labels"]) == [0, 2] and list(out["iscrowd"]) == [0, 1]


def test_train_preset_flip_mirrors_boxes_and_pixels():
    image = _image(30, 60)
    tf = detection_train_transforms(60, hflip=1.0, scale_jitter=(1.0, 1.0), color_jitter=0.0)
    out = _run(tf, image, [[5, 2, 20, 12]], [4], [0])
    np.testing.assert_allclose(out["bboxes"], [[60 - 20, 2, 60 - 5, 12]], atol=1e-4)
    torch.testing.assert_close(out["image"], torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1).float() / 255)


def test_train_preset_keeps_images_in_range_and_boxes_inside():
    tf = detection_train_transforms(64)
    image = _image(48, 64)
    for _ in range(20):
        out = _run(tf, image, [[0, 0, 64, 48], [10, 10, 20, 20]], [0, 1], [0, 0])
        img = out["image"]
        assert img.shape == (3, 48, 64) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        b = np.asarray(out["bboxes"]).reshape(-1, 4)
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= 64).all() and (b[:, 3] <= 48).all()
        assert ((b[:, 2:] - b[:, :2]) > 0).all()


class _Source:
    def __init__(self, boxes):
        self.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

    def __len__(self) -> int:
        return 1

    def load(self, index):
        n = len(self.boxes)
        return _image(20, 30), self.boxes, np.arange(n), np.zeros(n, dtype=np.int64), 42, None


def test_detection_dataset_builds_the_target_dict_with_and_without_boxes():
    image, t = DetectionDataset(_Source([[1, 2, 3, 4]]), detection_val_transforms(60))[0]
    assert image.shape == (3, 40, 60)
    assert set(t) == {"boxes", "labels", "iscrowd", "image_id", "size", "orig_size", "original"}
    torch.testing.assert_close(t["boxes"], torch.tensor([[2.0, 4.0, 6.0, 8.0]]))
    # the evaluation ground truth stays in source pixels, with the box area when the source gives none
    torch.testing.assert_close(t["original"]["boxes"], torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert t["original"]["area"].tolist() == [4.0]
    assert t["image_id"].dtype == torch.int64 and int(t["image_id"]) == 42 and t["image_id"].ndim == 0
    assert t["size"].tolist() == [40, 60] and t["orig_size"].tolist() == [20, 30]
    image, t = DetectionDataset(_Source([]), detection_val_transforms(60))[0]
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32 and t["labels"].shape == (0,)
    image, t = DetectionDataset(_Source([[1, 2, 3, 4]]), None)[0]
    torch.testing.assert_close(image, torch.from_numpy(_image(20, 30)).permute(2, 0, 1).float() / 255)
    assert t["size"].tolist() == [20, 30]
