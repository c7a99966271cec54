"""Synthetic shapes: determinism, and every annotation agreeing with the pixels it describes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules import ShapesDetectionDataModule
from datamodules.synthetic import KEYPOINT_FLIP_PAIRS, KEYPOINT_NAMES, SHAPE_CLASSES, render_shapes
from datamodules.synthetic.shapes import MIN_VISIBLE_PIXELS
from datamodules.synthetic.shapes_detection import split_seed

INDICES = range(40)


@pytest.fixture(scope="module")
def samples() -> list[dict[str, np.ndarray]]:
    return [render_shapes(i, seed=3) for i in INDICES]


def test_same_seed_and_index_give_identical_output():
    a, b = render_shapes(5, seed=2), render_shapes(5, seed=2)
    assert a.keys() == b.keys() == {"image", "boxes", "labels", "masks", "semantic", "keypoints"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_different_index_or_seed_gives_a_different_image():
    base = render_shapes(0, seed=0)["image"]
    assert not np.array_equal(base, render_shapes(1, seed=0)["image"])
    assert not np.array_equal(base, render_shapes(0, seed=1)["image"])
    images = np.stack([render_shapes(i)["image"] for i in range(10)])
    assert len({im.tobytes() for im in images}) == 10


def test_shapes_and_dtypes(samples):
    for s in samples:
        n = len(s["labels"])
        assert s["image"].shape == (256, 256, 3) and s["image"].dtype == np.uint8
        assert s["boxes"].shape == (n, 4) and s["boxes"].dtype == np.float32
        assert s["labels"].dtype == np.int64 and ((s["labels"] >= 0) & (s["labels"] < len(SHAPE_CLASSES))).all()
        assert s["masks"].shape == (n, 256, 256) and s["masks"].dtype == bool
        assert s["semantic"].shape == (256, 256) and s["semantic"].dtype == np.uint8
        assert s["keypoints"].shape == (n, len(KEYPOINT_NAMES), 3) and s["keypoints"].dtype == np.float32
    other = render_shapes(0, image_size=96, max_objects=2)
    assert other["image"].shape == (96, 96, 3) and len(other["labels"]) <= 2


def test_boxes_are_the_bounding_boxes_of_the_visible_masks(samples):
    for s in samples:
        for box, mask in zip(s["boxes"], s["masks"]):
            rows, cols = np.nonzero(mask)
            assert len(rows) >= MIN_VISIBLE_PIXELS
            np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


def test_semantic_mask_agrees_with_instance_masks_and_labels(samples):
    for s in samples:
        masks = s["masks"]
        assert (masks.sum(axis=0) <= 1).all(), "visible masks must not overlap"
        expected = np.zeros((256, 256), dtype=np.uint8)
        for label, mask in zip(s["labels"], masks):
            expected[mask] = label + 1
        np.testing.assert_array_equal(s["semantic"], expected)


def test_keypoint_visibility_agrees_with_masks(samples):
    counts = np.zeros(3, dtype=int)
    for s in samples:
        masks = s["masks"]
        for n, kps in enumerate(s["keypoints"]):
            for x, y, v in kps:
                counts[int(v)] += 1
                if not (0 <= x < 256 and 0 <= y < 256):
                    assert v == 0
                    continue
                px, py = int(np.floor(x)), int(np.floor(y))
                if masks[n, py, px]:
                    assert v == 2
                else:
                    assert v == 1
                    # Hidden means painted over by a later (higher) object.
                    covering = np.flatnonzero(masks[:, py, px])
                    assert len(covering) == 1 and covering[0] > n
    assert counts.min() > 0, f"expected all three visibilities in 40 images, got {counts}"


def test_keypoints_follow_the_shape_axes(samples):
    """Axis points are centre +- perpendicular offsets; top -> right turns clockwise on screen (y down)."""
    for s in samples:
        for kps in s["keypoints"]:
            c, top, right, bottom, left = kps[:, :2].astype(np.float64)
            u, r = top - c, right - c
            assert abs(np.dot(u, r)) < 1e-3 * (np.linalg.norm(u) * np.linalg.norm(r) + 1e-9)
            assert u[0] * r[1] - u[1] * r[0] > 0
            # bottom/left lie on the same axes, on the opposite side of the centre.
            d = bottom - c
            assert abs(u[0] * d[1] - u[1] * d[0]) < 1e-3 * (np.linalg.norm(u) * np.linalg.norm(d) + 1e-9)
            assert np.dot(u, bottom - c) < 0 and np.dot(r, left - c) < 0


def test_flip_pairs_turn_a_mirrored_shape_back_into_a_valid_one(samples):
    """After x -> W - x, swapping the flip pairs restores the clockwise top -> right order."""
    names = dict(enumerate(KEYPOINT_NAMES))
    assert {(names[a], names[b]) for a, b in KEYPOINT_FLIP_PAIRS} == {("right", "left")}
    for s in samples:
        for kps in s["keypoints"]:
            flipped = kps[:, :2].astype(np.float64).copy()
            flipped[:, 0] = 256 - flipped[:, 0]
            for a, b in KEYPOINT_FLIP_PAIRS:
                flipped[[a, b]] = flipped[[b, a]]
            u, r = flipped[1] - flipped[0], flipped[2] - flipped[0]
            assert u[0] * r[1] - u[1] * r[0] > 0


def test_unoccluded_circles_have_centred_keypoints_at_six_tenths_of_the_radius():
    checked = 0
    for i in range(80):
        s = render_shapes(i, seed=11)
        for n, (label, box, kps) in enumerate(zip(s["labels"], s["boxes"], s["keypoints"])):
            x0, y0, x1, y1 = box
            whole = (kps[:, 2] == 2).all() and x0 > 0 and y0 > 0 and x1 < 256 and y1 < 256
            if SHAPE_CLASSES[label] != "circle" or not whole or abs((x1 - x0) - (y1 - y0)) > 0:
                continue  # partly hidden circles have a box smaller than the circle
            radius = (x1 - x0) / 2
            np.testing.assert_allclose(kps[0, :2], [(x0 + x1) / 2, (y0 + y1) / 2], atol=0.75)
            np.testing.assert_allclose(np.linalg.norm(kps[1:, :2] - kps[0, :2], axis=1), 0.6 * radius, atol=0.75)
            checked += 1
    assert checked >= 3


def test_dataset_covers_every_class_and_coco_size_range():
    labels, areas = [], []
    for i in range(150):
        s = render_shapes(i, seed=0)
        labels.extend(s["labels"].tolist())
        areas.extend(s["masks"].sum(axis=(1, 2)).tolist())
    assert set(labels) == set(range(len(SHAPE_CLASSES)))
    areas = np.asarray(areas)
    small, large = (areas < 32**2).mean(), (areas >= 96**2).mean()
    assert small > 0.15 and large > 0.02 and 1 - small - large > 0.3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="index"):
        render_shapes(-1)
    with pytest.raises(ValueError, match="max_objects"):
        render_shapes(0, max_objects=-2)
    assert len(render_shapes(0, max_objects=0)["labels"]) == 0


def test_datamodule_batches_match_the_generator_and_splits_differ():
    dm = ShapesDetectionDataModule(num_train=4, num_val=3, batch_size=3, num_workers=0, seed=5)
    assert dm.num_classes == len(SHAPE_CLASSES) and dm.class_names == list(SHAPE_CLASSES)
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (3, 3, 256, 256) and images.dtype == torch.float32
    for i, t in enumerate(targets):
        ref = render_shapes(i, seed=split_seed(5, "val"))
        torch.testing.assert_close(images[i], torch.from_numpy(ref["image"]).permute(2, 0, 1).float() / 255)
        torch.testing.assert_close(t["boxes"], torch.from_numpy(ref["boxes"]))
        torch.testing.assert_close(t["labels"], torch.from_numpy(ref["labels"]))
        assert t["iscrowd"].tolist() == [0] * len(ref["labels"])
        assert int(t["image_id"]) == i and t["size"].tolist() == t["orig_size"].tolist() == [256, 256]
    train_images = [render_shapes(i, seed=split_seed(5, "train"))["image"] for i in range(4)]
    val_images = [render_shapes(i, seed=split_seed(5, "val"))["image"] for i in range(3)]
    assert not {a.tobytes() for a in train_images} & {b.tobytes() for b in val_images}
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape[0] == 3 and all(t["boxes"].shape[1] == 4 for t in targets)
    assert len(dm.test_dataloader().dataset) == len(dm.predict_dataloader().dataset) == 3


def test_datamodule_handles_images_with_no_objects_and_odd_sizes():
    dm = ShapesDetectionDataModule(num_train=2, num_val=2, image_size=80, max_objects=0, batch_size=2, num_workers=0)
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 96, 96)  # padded to a multiple of 32
    assert (images[:, :, 80:, :] == 0).all() and (images[:, :, :, 80:] == 0).all()
    for t in targets:
        assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["size"].tolist() == [80, 80]
