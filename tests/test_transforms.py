"""Albumentations presets: tensor format, box geometry under resize and flip, clipping and filtering."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from datamodules.detection.samples import DetectionDataset
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


# -- resize modes (issue 16 item 11) and the DETR preset ------------------------------------------------------------

def _mmcv_size(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    """mmcv.rescale_size((w, h), (long, short)) written out: one factor, int(x * f + 0.5) per side."""
    f = min(long / max(h, w), short / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def test_shorter_side_800_capped_at_1333_as_mmdet():
    # 640x480 -> 1067x800 (not 800x600): factor 800/480; 640 * 5/3 = 1066.67 rounds to 1067 as mmcv's int(x + 0.5).
    from datamodules.transforms import rescale_size

    assert rescale_size(480, 640, 800, 1333) == (800, 1067) == _mmcv_size(480, 640, 800, 1333)
    assert rescale_size(640, 480, 800, 1333) == (1067, 800)
    assert rescale_size(400, 2000, 800, 1333) == (267, 1333)  # long side capped: factor 1333/2000
    assert rescale_size(1000, 1000, 800, 1333) == (800, 800)  # downscale
    rng = np.random.default_rng(3)
    for h, w in rng.integers(20, 3000, size=(200, 2)):
        assert rescale_size(int(h), int(w), 800, 1333) == _mmcv_size(int(h), int(w), 800, 1333)
    tf = detection_val_transforms(800, resize="shorter", max_size=1333)
    image = _image(480, 640)
    out = _run(tf, image, [[64, 48, 320, 240], [0, 0, 640, 480]], [1, 2], [0, 1])
    assert out["image"].shape == (3, 800, 1067)
    sx, sy = 1067 / 640, 800 / 480  # boxes scale per axis with the image, as mmdet's Resize
    np.testing.assert_allclose(out["bboxes"], [[64 * sx, 48 * sy, 320 * sx, 240 * sy], [0, 0, 1067, 800]], atol=1e-3)
    assert list(out["labels"]) == [1, 2] and list(out["iscrowd"]) == [0, 1]
    expected = cv2.resize(image, (1067, 800), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    torch.testing.assert_close(out["image"], torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_multi_scale_training_draws_the_shorter_side_from_the_list():
    scales = [480, 608, 800]
    tf = detection_train_transforms(800, preset="none", resize="shorter", max_size=1333, scales=scales)
    tf.set_random_seed(0)
    seen = []
    for _ in range(30):
        out = _run(tf, _image(48, 64), [[8, 8, 40, 40]], [0], [0])
        h, w = out["image"].shape[-2:]
        seen.append(h)
        assert (h, w) == _mmcv_size(48, 64, h, 1333)
        np.testing.assert_allclose(out["bboxes"], [[8 * w / 64, 8 * h / 48, 40 * w / 64, 40 * h / 48]], atol=1e-3)
    assert set(seen) == set(scales)  # every scale drawn, nothing else
    # The longest-side mode draws the longest side from the list.
    tf = detection_train_transforms(64, preset="none", scales=[32, 48])
    tf.set_random_seed(0)
    sizes = {tuple(_run(tf, _image(30, 60), [], [], [])["image"].shape[-2:]) for _ in range(20)}
    assert sizes == {(16, 32), (24, 48)}


def test_longest_mode_is_the_old_preset():
    import albumentations as A

    from datamodules.transforms import bbox_params, to_tensor

    old = A.Compose([A.LongestMaxSize(max_size=50), *to_tensor()], bbox_params=bbox_params())
    image = _image(33, 77)
    a = _run(detection_val_transforms(50), image, [[3, 4, 30, 20]], [1], [0])
    b = _run(old, image, [[3, 4, 30, 20]], [1], [0])
    assert torch.equal(a["image"], b["image"]) and np.array_equal(a["bboxes"], b["bboxes"])
    assert a["image"].shape == (3, 21, 50)


def test_random_size_crop_cuts_pixels_and_boxes_alike():
    import albumentations as A

    from datamodules.transforms import RandomSizeCrop, bbox_params, to_tensor

    tf = A.Compose([RandomSizeCrop(20, 30), *to_tensor()], bbox_params=bbox_params(), seed=1)
    h, w = 40, 50
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.arange(w)[None, :]  # column index
    image[..., 1] = np.arange(h)[:, None]  # row index
    sides = set()
    for _ in range(30):
        out = tf(image=image, bboxes=np.array([[5, 5, 45, 35]], np.float32), labels=np.array([0]),
                 iscrowd=np.array([0]))
        crop = (out["image"] * 255).round().to(torch.int64)
        ch, cw = crop.shape[-2:]
        assert 20 <= ch <= 30 and 20 <= cw <= 30
        sides.add((ch, cw))
        x0, y0 = int(crop[0, 0, 0]), int(crop[1, 0, 0])
        assert torch.equal(crop[0, 0], torch.arange(x0, x0 + cw))
        assert torch.equal(crop[1, :, 0], torch.arange(y0, y0 + ch))
        expected = np.clip(np.array([5 - x0, 5 - y0, 45 - x0, 35 - y0], np.float32), 0, [cw, ch, cw, ch])
        if (expected[2] - expected[0]) * (expected[3] - expected[1]) >= 1:
            np.testing.assert_allclose(out["bboxes"], [expected], atol=1e-3)
        else:
            assert len(out["bboxes"]) == 0
    assert len(sides) > 5


def test_detr_preset_sizes():
    from datamodules.transforms import detr_scales

    assert detr_scales(800) == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    tf = detection_train_transforms(800, preset="detr", resize="shorter", max_size=1333)
    tf.set_random_seed(0)
    shorts, cropped = set(), 0
    image = _image(480, 640)
    for _ in range(40):
        out = _run(tf, image, [[100, 100, 400, 300]], [0], [0])
        h, w = out["image"].shape[-2:]
        shorts.add(min(h, w))
        assert max(h, w) <= 1333 and min(h, w) in detr_scales(800)
        if abs(w / h - 640 / 480) > 0.02:  # the crop branch changes the aspect ratio
            cropped += 1
        b = np.asarray(out["bboxes"]).reshape(-1, 4)
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert len(shorts) > 5 and 5 < cropped < 35  # both branches of the 50/50 choice ran
    small = detection_train_transforms(64, preset="detr", resize="shorter", max_size=107)
    out = _run(small, _image(48, 64), [[8, 8, 40, 40]], [0], [0])
    assert min(out["image"].shape[-2:]) in detr_scales(64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(resize="longest", max_size=1333), "max_size"),
    (dict(resize="shorter", max_size=500), "max_size"),
    (dict(resize="middle"), "resize"),
    (dict(augment="mosaic"), "augment"),
    (dict(augment="detr"), "resize='shorter'"),
    (dict(resize="shorter", train_scales=[]), "train_scales"),
])
def test_bad_resize_options_fail_naming_the_option(kwargs, match):
    from datamodules import COCODetectionDataModule, TFRecordDetectionDataModule

    with pytest.raises(ValueError, match=match):
        COCODetectionDataModule(root="nowhere", **kwargs)  # nothing is read at construction
    with pytest.raises(ValueError, match=match):
        TFRecordDetectionDataModule("a.tfrecord", "b.tfrecord", "map.pbtxt", **kwargs)
