"""COCO-format detection data: parsing, label mapping, batches after the transform, and bad-input errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import COCODetectionDataModule, COCODetectionSource

CATEGORIES = [{"id": 12, "name": "eel"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
IMAGES = [
    {"id": 101, "file_name": "a.png", "height": 60, "width": 100},
    {"id": 205, "file_name": "sub/b.png", "height": 80, "width": 50},
    {"id": 7, "file_name": "c.png", "height": 40, "width": 40},  # no annotations: a negative image
]
ANNOTATIONS = [
    {"id": 1, "image_id": 101, "category_id": 7, "bbox": [10, 5, 30, 20], "iscrowd": 0},
    {"id": 2, "image_id": 101, "category_id": 12, "bbox": [50.5, 20.25, 40, 30], "iscrowd": 1},
    {"id": 3, "image_id": 205, "category_id": 3, "bbox": [5, 10, 20, 40], "iscrowd": 0},
    {"id": 4, "image_id": 205, "category_id": 7, "bbox": [0, 0, 0, 15], "iscrowd": 0},  # zero width: dropped
    {"id": 5, "image_id": 205, "category_id": 12, "bbox": [30, 60, 15, 18]},  # no iscrowd key: 0
]
# Contiguous labels follow sorted category ids: 3 -> 0 (cat), 7 -> 1 (dog), 12 -> 2 (eel).
EXPECTED = {  # image id -> (xyxy boxes in file pixels, labels, iscrowd)
    101: ([[10, 5, 40, 25], [50.5, 20.25, 90.5, 50.25]], [1, 2], [0, 1]),
    205: ([[5, 10, 25, 50], [30, 60, 45, 78]], [0, 2], [0, 0]),
    7: ([], [], []),
}
IMAGE_SIZE = 70


def _write_image(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Smooth content with a different level per channel, so an RGB/BGR mix-up would show.
    small = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
    pixels = np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    pixels[..., 0] //= 2
    Image.fromarray(pixels).save(path)
    return pixels


def _write_json(path: Path, images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    for i, img in enumerate(IMAGES):
        _write_image(tmp_path / "imgs" / img["file_name"], img["height"], img["width"], seed=i)
    _write_json(tmp_path / "ann" / "train.json")
    _write_json(tmp_path / "ann" / "val.json")
    return tmp_path


def _datamodule(root: Path, **kwargs) -> COCODetectionDataModule:
    args = dict(
        root=str(root),
        train_annotations="ann/train.json",
        val_annotations="ann/val.json",
        train_images="imgs",
        val_images="imgs",
        image_size=IMAGE_SIZE,
        batch_size=3,
        num_workers=0,
    )
    args.update(kwargs)
    return COCODetectionDataModule(**args)


def _resized_hw(h: int, w: int) -> tuple[int, int]:
    scale = IMAGE_SIZE / max(h, w)
    return int(round(h * scale)), int(round(w * scale))


def test_label_mapping_follows_sorted_category_ids(coco_root):
    dm = _datamodule(coco_root)
    assert dm.num_classes == 3
    assert dm.category_ids == [3, 7, 12]
    assert dm.class_names == ["cat", "dog", "eel"]
    assert dm.label_to_category_id == {0: 3, 1: 7, 2: 12}


def test_val_batch_matches_the_json_scaled_by_the_resize(coco_root):
    dm = _datamodule(coco_root)
    dm.setup("validate")
    images, targets = next(iter(dm.val_dataloader()))
    sizes = [_resized_hw(img["height"], img["width"]) for img in IMAGES]
    assert sizes == [(42, 70), (70, 44), (70, 70)]  # worked by hand: longest side -> 70
    assert images.shape == (3, 3, 96, 96)  # padded up to a multiple of 32
    assert images.dtype == torch.float32 and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    for i, (img, target) in enumerate(zip(IMAGES, targets)):
        h, w = sizes[i]
        assert int(target["image_id"]) == img["id"]
        assert target["size"].tolist() == [h, w]
        assert target["orig_size"].tolist() == [img["height"], img["width"]]
        boxes, labels, crowd = EXPECTED[img["id"]]
        expected_boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        expected_boxes *= torch.tensor([w / img["width"], h / img["height"]] * 2)
        torch.testing.assert_close(target["boxes"], expected_boxes, rtol=0, atol=1e-4)
        assert target["boxes"].dtype == torch.float32
        assert target["labels"].tolist() == labels and target["labels"].dtype == torch.int64
        assert target["iscrowd"].tolist() == crowd and target["iscrowd"].dtype == torch.int64
        # Pixels: the file resized (bilinear), RGB order, scaled to [0, 1]; zeros in the padding.
        pixels = np.asarray(Image.open(coco_root / "imgs" / img["file_name"]).convert("RGB"))
        resized = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
        expected_pixels = torch.from_numpy(resized).permute(2, 0, 1)
        torch.testing.assert_close(images[i, :, :h, :w], expected_pixels, rtol=0, atol=1.5 / 255)
        assert (images[i, :, h:, :] == 0).all() and (images[i, :, :, w:] == 0).all()


def test_shorter_side_mode_with_a_cap_on_the_longer_side(coco_root):
    # mmcv's rescale_size: factor min(48 / short, 70 / long), sides int(x * factor + 0.5), worked by hand:
    # 60x100 -> factor 0.7 (capped) -> 42x70; 80x50 -> 0.875 (capped) -> 70x44; 40x40 -> 1.2 -> 48x48.
    dm = _datamodule(coco_root, image_size=48, resize="shorter", max_size=70)
    dm.setup("validate")
    _, targets = next(iter(dm.val_dataloader()))
    sizes = [(42, 70), (70, 44), (48, 48)]
    for img, target, (h, w) in zip(IMAGES, targets, sizes):
        assert target["size"].tolist() == [h, w]
        boxes = torch.tensor(EXPECTED[img["id"]][0], dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(target["boxes"], boxes * torch.tensor([w / img["width"], h / img["height"]] * 2),
                                   rtol=0, atol=1e-4)
    # Training with multi-scale sizes: the shorter side is one of the list (or capped by max_size).
    dm = _datamodule(coco_root, image_size=48, resize="shorter", max_size=70, train_scales=[32, 40], augment="flip")
    dm.setup("fit")
    for _ in range(3):
        _, targets = next(iter(dm.train_dataloader()))
        for target in targets:
            h, w = target["size"].tolist()
            assert min(h, w) in (32, 40) or max(h, w) == 70


def test_empty_image_is_kept_with_empty_targets(coco_root):
    dm = _datamodule(coco_root)
    dm.setup("fit")
    for loader in (dm.val_dataloader(), dm.train_dataloader()):
        for _, targets in loader:
            for t in targets:
                if int(t["image_id"]) == 7:
                    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["iscrowd"].shape == (0,)


def test_train_batches_keep_label_and_crowd_flags_together(coco_root):
    dm = _datamodule(coco_root, batch_size=1)
    dm.setup("fit")
    seen = 0
    for _ in range(3):
        for images, targets in dm.train_dataloader():
            t = targets[0]
            _, labels, crowd = EXPECTED[int(t["image_id"])]
            pairs = set(zip(t["labels"].tolist(), t["iscrowd"].tolist()))
            assert pairs <= set(zip(labels, crowd))
            h, w = t["size"].tolist()
            assert images.shape[-2] % 32 == 0 and images.shape[-1] % 32 == 0 and images.shape[-2] >= h
            if len(t["boxes"]):
                assert (t["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (t["boxes"][:, :2] >= 0).all()
            seen += 1
    assert seen == 9  # 3 images per epoch (drop_last with batch 1 drops nothing)


def test_source_agrees_with_pycocotools_on_random_annotations(tmp_path):
    from pycocotools.coco import COCO

    rng = np.random.default_rng(0)
    images = [{"id": 1000 + i, "file_name": f"{i}.png", "height": 50, "width": 60} for i in range(6)]
    cats = [{"id": int(c), "name": f"c{c}"} for c in (90, 4, 17, 33)]
    anns = []
    for k in range(60):
        x, y = rng.uniform(0, 50, size=2).round(2)
        w, h = rng.choice([0.0, 0.5, 3.0, 17.25, 40.0], size=2)
        anns.append(
            {
                "id": k + 1,
                "image_id": int(rng.choice([im["id"] for im in images[:5]])),  # the last image stays empty
                "category_id": int(rng.choice([c["id"] for c in cats])),
                "bbox": [float(x), float(y), float(w), float(h)],
                "iscrowd": int(rng.random() < 0.2),
                "area": float(w * h),
            }
        )
    path = _write_json(tmp_path / "rand.json", images, anns, cats)
    src = COCODetectionSource(str(path), str(tmp_path), check_files=False)
    ref = COCO(str(path))
    cat_ids = sorted(ref.getCatIds())
    assert src.category_ids == cat_ids
    for i, iid in enumerate(src.image_ids):
        ref_anns = [a for a in ref.loadAnns(ref.getAnnIds(imgIds=[iid])) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        xywh = np.array([a["bbox"] for a in ref_anns], dtype=np.float64).reshape(-1, 4)
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        np.testing.assert_array_equal(src.boxes[i], expected)
        assert src.labels[i].tolist() == [cat_ids.index(a["category_id"]) for a in ref_anns]
        assert src.iscrowd[i].tolist() == [a["iscrowd"] for a in ref_anns]
    assert len(src.boxes[5]) == 0


def test_test_split_defaults_to_val_and_can_be_its_own_file(coco_root):
    dm = _datamodule(coco_root)
    dm.setup("test")
    assert [int(t["image_id"]) for _, ts in dm.test_dataloader() for t in ts] == [101, 205, 7]
    _write_json(coco_root / "ann" / "test.json", images=IMAGES[:1], annotations=ANNOTATIONS[:2])
    dm = _datamodule(coco_root, test_annotations="ann/test.json")
    dm.setup("test")
    assert [int(t["image_id"]) for _, ts in dm.test_dataloader() for t in ts] == [101]
    assert [int(t["image_id"]) for _, ts in dm.predict_dataloader() for t in ts] == [101, 205, 7]


def test_absolute_paths_ignore_root(coco_root):
    dm = _datamodule(
        "/nonexistent-root",
        val_annotations=str(coco_root / "ann" / "val.json"),
        val_images=str(coco_root / "imgs"),
    )
    assert dm.num_classes == 3


# ---- bad input: each error names the file, the record and the problem ----------------------------


def _bad_val(coco_root: Path, **json_parts) -> COCODetectionDataModule:
    _write_json(coco_root / "ann" / "bad_val.json", **json_parts)
    dm = _datamodule(coco_root, val_annotations="ann/bad_val.json")
    return dm


def _expect(dm: COCODetectionDataModule, error: type[Exception], *fragments: str) -> None:
    with pytest.raises(error) as info:
        dm.setup("validate")
    message = str(info.value)
    for fragment in ("bad_val.json", *fragments):
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_image_file_is_reported_with_json_image_id_and_path(coco_root):
    images = IMAGES + [{"id": 9, "file_name": "gone.png", "height": 5, "width": 5}]
    missing = os.path.join("imgs", "gone.png")
    _expect(_bad_val(coco_root, images=images), FileNotFoundError, "image 9", missing, "not found")


def test_negative_width_is_reported(coco_root):
    anns = ANNOTATIONS + [{"id": 17, "image_id": 101, "category_id": 3, "bbox": [10, 5, -3, 8]}]
    problem = "bbox [10, 5, -3, 8] has negative width"
    _expect(_bad_val(coco_root, annotations=anns), ValueError, "annotation 17", problem)


def test_negative_height_is_reported(coco_root):
    anns = ANNOTATIONS + [{"id": 21, "image_id": 101, "category_id": 3, "bbox": [10, 5, 3, -0.5]}]
    _expect(_bad_val(coco_root, annotations=anns), ValueError, "annotation 21", "negative height")


def test_unknown_category_is_reported(coco_root):
    anns = ANNOTATIONS + [{"id": 18, "image_id": 101, "category_id": 99, "bbox": [1, 1, 3, 3]}]
    _expect(_bad_val(coco_root, annotations=anns), ValueError, "annotation 18", "category_id 99 is not in 'categories'")


def test_unknown_image_is_reported(coco_root):
    anns = ANNOTATIONS + [{"id": 19, "image_id": 555, "category_id": 3, "bbox": [1, 1, 3, 3]}]
    _expect(_bad_val(coco_root, annotations=anns), ValueError, "annotation 19", "image_id 555 is not in 'images'")


@pytest.mark.parametrize("bbox", [[1, 2, 3], "1,2,3,4", [1, 2, None, 4], [1, 2, float("nan"), 4]])
def test_malformed_bbox_is_reported(coco_root, bbox):
    anns = ANNOTATIONS + [{"id": 20, "image_id": 101, "category_id": 3, "bbox": bbox}]
    dm = _bad_val(coco_root, annotations=anns)
    _expect(dm, ValueError, "annotation 20", "bbox")


def test_missing_key_and_invalid_json_are_reported(coco_root):
    anns = ANNOTATIONS + [{"id": 22, "image_id": 101, "bbox": [1, 1, 3, 3]}]
    _expect(_bad_val(coco_root, annotations=anns), ValueError, "annotation 22", "category_id")
    (coco_root / "ann" / "bad_val.json").write_text('{"images": [')
    _expect(_datamodule(coco_root, val_annotations="ann/bad_val.json"), ValueError, "not valid JSON")
    (coco_root / "ann" / "bad_val.json").write_text('{"annotations": []}')
    _expect(_datamodule(coco_root, val_annotations="ann/bad_val.json"), ValueError, "'images'")


def test_image_size_disagreeing_with_the_json_is_reported_when_loaded(coco_root):
    images = [dict(IMAGES[0], height=61)] + IMAGES[1:]
    dm = _bad_val(coco_root, images=images)
    dm.setup("validate")
    with pytest.raises(ValueError) as info:
        dm.val_dataloader().dataset[0]
    message = str(info.value)
    assert "image 101" in message and "bad_val.json" in message and "60x100" in message and "61x100" in message


def test_train_and_val_with_different_categories_is_reported(coco_root):
    _write_json(coco_root / "ann" / "train.json", categories=CATEGORIES + [{"id": 40, "name": "fox"}])
    dm = _datamodule(coco_root)
    with pytest.raises(ValueError, match=re.escape("(40, 'fox')")) as info:
        dm.setup("fit")
    assert "train.json" in str(info.value) and "val.json" in str(info.value)


def test_evaluation_ground_truth_is_the_json_in_original_pixels_with_its_areas(coco_root):
    """Targets carry the dataset's own annotations for COCO evaluation: boxes before any resize or clipping, the
    json's ``area`` (a segmentation area, unlike w * h) or the box area where the json has none, crowd flags."""
    annotations = [dict(a) for a in ANNOTATIONS]
    annotations[0]["area"] = 123.5  # the segmentation's area: less than the 30 x 20 box
    annotations[2]["area"] = 0  # "unknown" in some exports: the box area is used
    annotations.append({"id": 6, "image_id": 101, "category_id": 3, "bbox": [97.0, 58.0, 2.0, 1.5], "area": 2.0})
    _write_json(coco_root / "ann" / "val.json", annotations=annotations)
    dm = _datamodule(coco_root, image_size=20)  # 100 x 60 -> 20 x 12: the 2 x 1.5 px object falls under 1 px^2
    by_id = {int(t["image_id"]): t for _, t in dm.build_dataset("val")}
    first = by_id[101]
    assert len(first["boxes"]) == 2  # the training target lost the tiny object...
    original = first["original"]  # ...evaluation keeps it, in original pixels
    torch.testing.assert_close(original["boxes"], torch.tensor([[10, 5, 40, 25], [50.5, 20.25, 90.5, 50.25],
                                                                [97.0, 58.0, 99.0, 59.5]]))
    assert original["labels"].tolist() == [1, 2, 0] and original["iscrowd"].tolist() == [0, 1, 0]
    assert original["area"].tolist() == [123.5, 1200.0, 2.0]  # json area; box area where the json has none
    assert by_id[205]["original"]["area"].tolist() == [800.0, 270.0]
    assert by_id[7]["original"]["boxes"].shape == (0, 4)


@pytest.mark.parametrize("area", [-1.0, "12", float("nan")])
def test_bad_area_is_reported(coco_root, area):
    annotations = [dict(a) for a in ANNOTATIONS]
    annotations[2]["area"] = area
    _write_json(coco_root / "ann" / "val.json", annotations=annotations)
    with pytest.raises(ValueError, match="annotation 3 in .*val.json: area must be a non-negative number"):
        _datamodule(coco_root).num_classes
