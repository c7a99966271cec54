"""COCO keypoint DataModule (top-down): what it crops, what it skips, the ground truth it carries, its errors,
the detector-box protocol, and the synthetic figures read through the same code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import COCOKeypointDataModule, FiguresKeypointDataModule
from datamodules.keypoints.geometry import transform_points
from datamodules.synthetic.figures import FIGURE_KEYPOINT_NAMES, FIGURE_OKS_SIGMAS, write_figures_coco

K = 13


@pytest.fixture()
def figures_root(tmp_path: Path) -> Path:
    root = tmp_path / "figs"
    write_figures_coco(root, {"train2017": (6, 0), "val2017": (5, 1)}, image_size=64)
    return root


def edit_json(root: Path, split: str, edit) -> Path:
    path = root / "annotations" / f"person_keypoints_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def datamodule(root: Path, **kwargs) -> COCOKeypointDataModule:
    args = dict(root=str(root), input_size=[32, 24], batch_size=4, num_workers=0, oks_sigmas=list(FIGURE_OKS_SIGMAS))
    return COCOKeypointDataModule(**{**args, **kwargs})


def add_crowd_and_empty(data: dict) -> None:
    """A crowd region and a person without keypoints on image 1; an image whose only person has no keypoints."""
    zeros = [0] * (3 * K)
    data["images"].append({"id": 99, "file_name": data["images"][0]["file_name"], "height": 64, "width": 64})
    data["annotations"] += [
        {"id": 1001, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 30], "area": 500.0, "iscrowd": 1,
         "keypoints": zeros, "num_keypoints": 0},
        {"id": 1002, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 20], "area": 150.0, "iscrowd": 0,
         "keypoints": zeros, "num_keypoints": 0},
        {"id": 1003, "image_id": 99, "category_id": 1, "bbox": [5, 5, 10, 20], "area": 150.0, "iscrowd": 0,
         "keypoints": zeros, "num_keypoints": 0},
    ]


def test_category_from_the_json(figures_root: Path) -> None:
    dm = datamodule(figures_root)
    assert dm.num_keypoints == K and dm.keypoint_names == list(FIGURE_KEYPOINT_NAMES)
    assert dm.flip_index == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11]
    assert [0, 1] in dm.skeleton and all(0 <= i < K for e in dm.skeleton for i in e)  # 1-based json -> 0-based
    assert dm.oks_sigmas == list(FIGURE_OKS_SIGMAS) and dm.input_size == [32, 24]
    assert datamodule(figures_root, oks_sigmas=None).oks_sigmas is None  # the task fills in COCO's


def test_training_skips_crowd_and_unlabelled_and_evaluation_carries_every_annotation_once(figures_root: Path) -> None:
    edit_json(figures_root, "train2017", add_crowd_and_empty)
    edit_json(figures_root, "val2017", add_crowd_and_empty)
    dm = datamodule(figures_root)
    data = json.loads((figures_root / "annotations" / "person_keypoints_val2017.json").read_text())
    labelled = {a["id"] for a in data["annotations"] if not a["iscrowd"] and any(a["keypoints"][2::3])}
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(val) == len(labelled) and {int(val[i]["id"]) for i in range(len(val))} == labelled
    assert len(train) == sum(1 for a in json.loads((figures_root / "annotations" / "person_keypoints_train2017.json")
                                                   .read_text())["annotations"]
                             if not a["iscrowd"] and any(a["keypoints"][2::3]))
    carried = torch.cat([val[i]["gt"]["id"] for i in range(len(val))]).tolist()
    assert sorted(carried) == sorted(a["id"] for a in data["annotations"])  # each exactly once, 1001-1003 too
    # an image's annotations ride with its first crop
    first = val[0]
    assert set(first["gt"]["image_id"].tolist()) == {int(first["image_id"])}
    assert all(len(train[i]["gt"]["id"]) == 0 for i in range(len(train)))


def test_sample_geometry_and_batch(figures_root: Path) -> None:
    dm = datamodule(figures_root)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    b = batch["image"].shape[0]
    assert batch["image"].shape == (b, 3, 32, 24) and batch["image"].dtype == torch.float32
    assert 0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1
    assert batch["keypoints"].shape == (b, K, 3) and batch["matrix_inv"].dtype == torch.float64
    assert not batch["from_detector"].any() and torch.equal(batch["box_score"], torch.ones(b))
    vis = batch["keypoints"][..., 2] > 0
    assert torch.equal(vis, batch["keypoints_image"][..., 2] > 0)
    back = torch.from_numpy(np.stack([transform_points(k[:, :2].numpy(), m.numpy())
                                      for k, m in zip(batch["keypoints"], batch["matrix_inv"])]))
    torch.testing.assert_close(back[vis], batch["keypoints_image"][..., :2][vis].double(), atol=1e-3, rtol=0)
    # the box is the clipped json box, xyxy
    src = dm.source("val")
    ann = {int(a): i for i, a in enumerate(src.ann_ids)}[int(batch["id"][0])]
    x, y, w, h = src.boxes_xywh[ann]
    x0, y0 = max(x, 0), max(y, 0)
    np.testing.assert_allclose(batch["box"][0].numpy(), [x0, y0, min(x + w, 63), min(y + h, 63)])
    assert batch["gt"]["keypoints"].shape[1:] == (K, 3) and batch["gt"]["boxes"].shape[1] == 4


def test_training_crops_are_augmented_and_reproducible(figures_root: Path) -> None:
    dm = datamodule(figures_root)
    train = dm.dataset("train")
    torch.manual_seed(5)
    a = [train[i]["keypoints"] for i in range(len(train))]
    train._rng = None
    torch.manual_seed(5)
    b = [train[i]["keypoints"] for i in range(len(train))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    plain = datamodule(figures_root, augment=False).dataset("train")
    assert any(not torch.equal(x, plain[i]["keypoints"]) for i, x in enumerate(a))


def test_detector_boxes(figures_root: Path, tmp_path: Path) -> None:
    """Detections replace the GT boxes (other categories and low scores dropped); an image without detections
    still has its annotations carried."""
    dets = [{"image_id": 1, "category_id": 1, "bbox": [2, 3, 30, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [3, 3, 30, 41], "score": 0.8},
            {"image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.05},
            {"image_id": 3, "category_id": 7, "bbox": [10, 10, 20, 20], "score": 0.9}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    dm = datamodule(figures_root, val_detections=str(tmp_path / "dets.json"), detection_score_threshold=0.1)
    val = dm.dataset("val")
    assert len(val) == 2 and all(bool(val[i]["from_detector"]) and int(val[i]["id"]) == -1 for i in range(2))
    assert [float(val[i]["box_score"]) for i in range(2)] == pytest.approx([0.9, 0.8])
    assert float(val[0]["area"]) == pytest.approx(30 * 40) and not val[0]["keypoints"].any()
    carried = torch.cat([val[i]["gt"]["id"] for i in range(2)])
    assert sorted(carried.tolist()) == sorted(int(a) for a in dm.source("val").ann_ids)
    assert dm.dataset("test") is not None and len(dm.dataset("test")) == 2  # test defaults to val, detections too


@pytest.mark.parametrize("field, value, message", [
    ("keypoints", list(range(3 * K - 3)), "keypoints has 36 values, expected 39"),
    ("visibility", 3, "keypoint 0 has visibility 3, expected 0"),
    ("bbox", [10, 10, 0, 20], "zero or negative size"),
    ("bbox", [70, 70, 5, 5], "no extent inside the 64x64"),
])
def test_bad_annotations_name_file_annotation_and_problem(figures_root: Path, field: str, value, message: str) -> None:
    def edit(data: dict) -> None:
        ann = next(a for a in data["annotations"] if any(a["keypoints"][2::3]))
        ann["id"] = 4242
        if field == "visibility":
            ann["keypoints"][2] = value
        else:
            ann[field] = value

    path = edit_json(figures_root, "val2017", edit)
    with pytest.raises(ValueError) as info:
        datamodule(figures_root).dataset("val")
    text = str(info.value)
    assert "annotation 4242" in text and str(path) in text and message in text, text


def test_bad_detections_and_categories(figures_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 12345, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}]))
    with pytest.raises(ValueError, match=r"detection #0 in .*bad.json: image_id 12345 is not in"):
        datamodule(figures_root, val_detections=str(bad)).dataset("val")
    bad.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 5], "score": 1.0}]))
    with pytest.raises(ValueError, match=r"detection #0 .* zero or negative size"):
        datamodule(figures_root, val_detections=str(bad)).dataset("val")
    with pytest.raises(ValueError, match="keypoint_names .* differ from the names"):
        datamodule(figures_root, keypoint_names=[f"k{i}" for i in range(K)]).dataset("val")

    def two_keypoint_categories(data: dict) -> None:
        data["categories"].append({**data["categories"][0], "id": 2, "name": "other"})

    edit_json(figures_root, "val2017", two_keypoint_categories)
    with pytest.raises(ValueError, match="2 categories have a 'keypoints' list"):
        datamodule(figures_root).num_keypoints
    assert datamodule(figures_root, category_id=1).num_keypoints == K


def test_names_skeleton_and_flip_pairs_from_the_config_when_the_json_lacks_them(figures_root: Path) -> None:
    def strip(data: dict) -> None:
        data["categories"] = [{"id": 1, "name": "person"}]

    for split in ("train2017", "val2017"):
        edit_json(figures_root, split, strip)
    with pytest.raises(ValueError, match="give them with --data.keypoint_names"):
        datamodule(figures_root, category_id=1).num_keypoints
    names = [f"p{i}" for i in range(K)]
    dm = datamodule(figures_root, category_id=1, keypoint_names=names, skeleton=[[0, 1]], flip_pairs=[[1, 2], [3, 4]])
    assert dm.num_keypoints == K and dm.skeleton == [[0, 1]]
    assert dm.flip_index[:5] == [0, 2, 1, 4, 3] and dm.flip_index[5:] == list(range(5, K))
    assert len(dm.dataset("val")) > 0


def test_figures_datamodule_writes_once_and_reads_through_the_coco_reader(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    dm = FiguresKeypointDataModule(root=str(root), num_train=3, num_val=2, image_size=48, input_size=[32, 24],
                                   batch_size=2, num_workers=0)
    assert dm.num_keypoints == K and not root.exists()  # linked sizes need no files
    dm.prepare_data()
    ann = root / "annotations" / "person_keypoints_val2017.json"
    stamp = ann.stat().st_mtime_ns
    again = FiguresKeypointDataModule(root=str(root), num_train=3, num_val=2, image_size=48, input_size=[32, 24],
                                      batch_size=2, num_workers=0)
    assert len(again.dataset("val")) == len(dm.dataset("val")) > 0
    assert ann.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert type(again.source("val")).__name__ == "COCOKeypointSource"
    with pytest.raises(FileExistsError):  # other parameters never overwrite what is there
        FiguresKeypointDataModule(root=str(root), num_train=4, num_val=2, image_size=48).prepare_data()
