"""Synthetic stick figures: determinism, COCO validity (pycocotools loads it), keypoints on the figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.keypoints.geometry import flip_pairs_from_names, validate_box_xywh, validate_keypoints
from datamodules.synthetic.figures import (
    FIGURE_KEYPOINT_NAMES,
    FIGURE_OKS_SIGMAS,
    FIGURE_SKELETON,
    NUM_FIGURE_KEYPOINTS,
    render_figures,
    write_figures_coco,
)


def test_render_is_deterministic_and_seeded() -> None:
    a, b = render_figures(3, seed=7, image_size=96), render_figures(3, seed=7, image_size=96)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = render_figures(3, seed=8, image_size=96)
    assert a["image"].shape == (96, 96, 3) and a["image"].dtype == np.uint8
    assert not np.array_equal(a["image"], c["image"])


def test_keypoints_lie_on_their_figure() -> None:
    """v=2: the keypoint's pixel belongs to the figure's visible mask (and is inside its box); v=1: inside the
    image but covered; v=0: stored as (0, 0). Over 40 images all three visibilities and both facings occur."""
    counts = np.zeros(3, dtype=int)
    facings = set()
    for index in range(40):
        s = render_figures(index, seed=1, image_size=112)
        n = len(s["keypoints"])
        assert s["keypoints"].shape == (n, NUM_FIGURE_KEYPOINTS, 3) and s["masks"].shape == (n, 112, 112)
        facings.update(s["front"].tolist())
        for kp, box, area, mask in zip(s["keypoints"], s["boxes_xywh"], s["areas"], s["masks"]):
            assert area == mask.sum() > 0
            x0, y0, w, h = box
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x0 + w, y0 + h) == (xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5)
            v = kp[:, 2]
            counts += np.bincount(v.astype(int), minlength=3)
            pix = np.round(kp[:, :2]).astype(int)
            for k in np.flatnonzero(v == 2):
                assert mask[pix[k, 1], pix[k, 0]], (index, k)
                assert x0 <= kp[k, 0] <= x0 + w and y0 <= kp[k, 1] <= y0 + h
            for k in np.flatnonzero(v == 1):
                assert 0 <= pix[k, 0] < 112 and 0 <= pix[k, 1] < 112 and not mask[pix[k, 1], pix[k, 0]]
            assert (kp[v == 0, :2] == 0).all()
    assert (counts > 0).all(), counts
    assert counts[2] > counts[1] + counts[0]  # mostly visible
    assert facings == {True, False}


def test_left_right_structure() -> None:
    """A front-facing upright figure has its left shoulder / hip on the image right of its right ones."""
    pairs = flip_pairs_from_names(FIGURE_KEYPOINT_NAMES)
    assert len(FIGURE_OKS_SIGMAS) == NUM_FIGURE_KEYPOINTS
    assert all(FIGURE_OKS_SIGMAS[a] == FIGURE_OKS_SIGMAS[b] for a, b in pairs)  # mirror-symmetric
    assert len(pairs) == 6 and all(FIGURE_KEYPOINT_NAMES[a].startswith("left_") for a, _ in pairs)
    agree = total = 0
    for index in range(60):
        s = render_figures(index, seed=2, image_size=128)
        for kp, front in zip(s["keypoints"], s["front"]):
            for left, right in ((1, 2), (7, 8)):  # shoulders, hips: torso corners, never crossed
                if kp[left, 2] > 0 and kp[right, 2] > 0:
                    total += 1
                    agree += (kp[left, 0] > kp[right, 0]) == bool(front)
    assert total > 50 and agree == total  # rotations stay within +-35 deg, so the order never flips


def test_write_coco_layout_loads_in_pycocotools_and_is_reproducible(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    splits = {"train2017": (6, 0), "val2017": (4, 1)}
    paths = write_figures_coco(tmp_path / "a", splits, image_size=96)
    again = write_figures_coco(tmp_path / "b", splits, image_size=96)
    for split in splits:
        assert paths[split] == tmp_path / "a" / "annotations" / f"person_keypoints_{split}.json"
        assert paths[split].read_bytes() == again[split].read_bytes()
        for png in sorted((tmp_path / "a" / split).glob("*.png")):
            assert png.read_bytes() == (tmp_path / "b" / split / png.name).read_bytes()
    coco = COCO(str(paths["val2017"]))
    assert len(coco.getImgIds()) == 4 and coco.getCatIds() == [1]
    cat = coco.loadCats(1)[0]
    assert cat["keypoints"] == list(FIGURE_KEYPOINT_NAMES)
    assert cat["skeleton"] == [[a + 1, b + 1] for a, b in FIGURE_SKELETON]  # 1-based, as COCO
    assert all(1 <= i <= NUM_FIGURE_KEYPOINTS for pair in cat["skeleton"] for i in pair)
    data = json.loads(paths["train2017"].read_text())
    assert len(data["annotations"]) >= 6
    for ann in data["annotations"]:
        where = f"annotation {ann['id']}"
        kp = validate_keypoints(ann["keypoints"], NUM_FIGURE_KEYPOINTS, where)
        validate_box_xywh(ann["bbox"], where)
        assert ann["num_keypoints"] == int((kp[:, 2] > 0).sum()) and ann["iscrowd"] == 0
        assert (tmp_path / "a" / "train2017" / coco.loadImgs(1)[0]["file_name"]).exists()
    # The train and val streams share no image.
    a = (tmp_path / "a" / "train2017" / "000000.png").read_bytes()
    assert a != (tmp_path / "a" / "val2017" / "000000.png").read_bytes()


def test_write_reuses_and_never_overwrites(tmp_path: Path) -> None:
    splits = {"val2017": (2, 3)}
    path = write_figures_coco(tmp_path, splits, image_size=64)["val2017"]
    stamp = path.stat().st_mtime_ns
    assert write_figures_coco(tmp_path, splits, image_size=64)["val2017"] == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(FileExistsError, match="exists with other contents"):
        write_figures_coco(tmp_path, {"val2017": (2, 4)}, image_size=64)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="not empty"):
        write_figures_coco(tmp_path, {"mine": (1, 0)}, image_size=64)
    assert (tmp_path / "mine" / "photo.jpg").read_bytes() == b"user data"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="image_size"):
        render_figures(0, image_size=16)
    with pytest.raises(ValueError, match="index and seed"):
        render_figures(-1)
