"""Segmentation data: VOC and folder layouts, palette PNGs, label checks, joint transforms, synthetic shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.segmentation.folders import FolderSegmentationDataModule, VOCSegmentationDataModule, read_class_names
from datamodules.segmentation.samples import (
    SegmentationDataset,
    check_mask,
    read_mask,
    segmentation_collate,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)
from datamodules.synthetic.shapes import SHAPE_CLASSES, render_shapes
from datamodules.synthetic.shapes_segmentation import ShapesSegmentationDataModule

IGNORE = 255


def voc_palette() -> list[int]:
    """A flat 768-entry palette whose colours differ from their indices (so RGB != ids)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=768).tolist()


def save_palette_png(ids: np.ndarray, path) -> None:
    h, w = ids.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(ids, dtype=np.uint8).tobytes())
    im.putpalette(voc_palette())
    im.save(path)


def make_voc(root, n=4, size=(20, 24), num_classes=21):
    rng = np.random.default_rng(1)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = []
    for i in range(n):
        stem = f"2007_{i:06d}"
        ids.append(stem)
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        mask = rng.integers(0, num_classes, size=size)
        mask[0, :] = IGNORE  # VOC marks object boundaries with 255
        save_palette_png(mask, root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(ids[3] + "\n")
    return ids


def test_palette_png_is_read_as_class_ids(tmp_path):
    ids = np.array([[0, 1, 2], [15, 20, IGNORE]])
    save_palette_png(ids, tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), ids)
    # Grey masks saved as RGB are accepted; real colour masks are refused with the file named.
    Image.fromarray(np.repeat(ids[..., None], 3, axis=2).astype(np.uint8)).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png"), ids)
    colour = np.zeros((2, 3, 3), dtype=np.uint8)
    colour[0, 0] = (128, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png"):
        read_mask(tmp_path / "colour.png")


def test_voc_layout_loads_ids_and_keeps_boundaries_ignored(tmp_path):
    ids = make_voc(tmp_path)
    dm = VOCSegmentationDataModule(root=str(tmp_path), crop_size=16, batch_size=2, num_workers=0)
    assert dm.num_classes == 21 and dm.class_names[15] == "person"
    dm.setup("fit")
    val = dm.datasets["val"]
    sample = val[0]
    expected = np.asarray(Image.open(tmp_path / "SegmentationClass" / f"{ids[3]}.png"))  # palette indices
    np.testing.assert_array_equal(sample["mask"].numpy(), expected)
    assert sample["mask"].dtype == torch.int64 and sample["image"].dtype == torch.float32
    assert sample["size"].tolist() == [20, 24] and sample["orig_size"].tolist() == [20, 24]
    assert float(sample["image"].max()) <= 1.0
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 16, 16)


def test_value_out_of_range_names_file_and_value(tmp_path):
    make_voc(tmp_path)
    bad = np.zeros((20, 24), dtype=np.uint8)
    bad[3, 4] = 23
    save_palette_png(bad, tmp_path / "SegmentationClass" / "2007_000003.png")
    dm = VOCSegmentationDataModule(root=str(tmp_path), num_workers=0)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"2007_000003\.png.*\[23\].*num_classes=21"):
        dm.datasets["val"][0]


def test_missing_mask_names_both_paths(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "SegmentationClass" / "2007_000001.png").unlink()
    dm = VOCSegmentationDataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/2007_000001\.jpg has no mask: expected .*SegmentationClass/2007_000001\.png"):
        dm.setup("fit")


def test_reduce_zero_label():
    mask = np.array([[0, 1, 2], [3, IGNORE, 0]])
    out = check_mask(mask.copy(), num_classes=3, ignore_index=IGNORE, reduce_zero_label=True, path="m.png")
    np.testing.assert_array_equal(out, [[IGNORE, 0, 1], [2, IGNORE, IGNORE]])
    with pytest.raises(ValueError, match=r"m\.png: values \[4\].*reduce_zero_label"):
        check_mask(np.array([[4]]), num_classes=3, ignore_index=IGNORE, reduce_zero_label=True, path="m.png")


def make_folder(root, stems, size=(12, 10), sub=""):
    rng = np.random.default_rng(2)
    (root / "images" / sub).mkdir(parents=True, exist_ok=True)
    (root / "masks" / sub).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / "images" / sub / f"{stem}.png")
        Image.fromarray(rng.integers(0, 3, size=size, dtype=np.uint8)).save(root / "masks" / sub / f"{stem}.png")


def test_folder_layout_split_lists_random_holdout_and_subfolders(tmp_path):
    stems = [f"img{i}" for i in range(10)]
    make_folder(tmp_path / "a", stems)
    (tmp_path / "a" / "classes.yaml").write_text("- sky\n- road\n- car\n")
    (tmp_path / "a" / "train.txt").write_text("img0\nimg1\n# comment\nimg2\n")
    (tmp_path / "a" / "val.txt").write_text("img9\n")
    dm = FolderSegmentationDataModule(root=str(tmp_path / "a"), class_names_file="classes.yaml",
                                      train_split="train.txt", val_split="val.txt", num_workers=0)  # fmt: skip
    assert dm.num_classes == 3 and dm.class_names == ["sky", "road", "car"]
    assert [p[0].stem for p in dm.split_pairs("train")] == ["img0", "img1", "img2"]
    assert [p[1].name for p in dm.split_pairs("test")] == ["img9.png"]  # test falls back to val
    # No lists: a seeded 20% hold-out, disjoint from train and covering everything.
    dm = FolderSegmentationDataModule(root=str(tmp_path / "a"), num_classes=3, val_fraction=0.2, num_workers=0)
    train = {p[0].stem for p in dm.split_pairs("train")}
    val = {p[0].stem for p in dm.split_pairs("val")}
    assert len(val) == 2 and not train & val and train | val == set(stems)
    # train/val sub-folders.
    make_folder(tmp_path / "b", ["x", "y"], sub="train")
    make_folder(tmp_path / "b", ["z"], sub="val")
    dm = FolderSegmentationDataModule(root=str(tmp_path / "b"), num_classes=3, num_workers=0)
    assert [p[0].stem for p in dm.split_pairs("train")] == ["x", "y"]
    assert [p[0].stem for p in dm.split_pairs("val")] == ["z"]
    with pytest.raises(FileNotFoundError, match="nope"):
        (tmp_path / "a" / "bad.txt").write_text("nope\n")
        FolderSegmentationDataModule(root=str(tmp_path / "a"), num_classes=3, train_split="bad.txt").split_pairs("train")


def test_class_names_from_json_and_mismatch(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"0": "bg", "1": "cat"}))
    assert read_class_names(tmp_path / "c.json") == ["bg", "cat"]
    (tmp_path / "d.yaml").write_text("classes: [a, b, c]\n")
    assert read_class_names(tmp_path / "d.yaml") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="num_classes=5 but .*c.json lists 2"):
        FolderSegmentationDataModule(root=str(tmp_path), num_classes=5, class_names_file=str(tmp_path / "c.json"))
    with pytest.raises(ValueError, match="give num_classes"):
        FolderSegmentationDataModule(root=str(tmp_path))


def test_train_transform_pads_masks_with_ignore_and_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    # Encode the pixel position in the image so we can check the mask went through the same geometry.
    mask = (np.arange(20)[:, None] // 5 * 6 + np.arange(30)[None, :] // 5).astype(np.uint8)  # ids 0..23
    image[..., 0] = mask * 10
    tf = segmentation_train_transforms(crop_size=48, ignore_index=IGNORE, scale_range=(1.0, 1.0), color_jitter=0.0)
    out = tf(image=image, mask=mask)
    img, m = out["image"], torch.as_tensor(out["mask"]).long()
    assert img.shape == (3, 48, 48) and m.shape == (48, 48)
    padded = m == IGNORE
    assert padded.sum() == 48 * 48 - 20 * 30  # everything outside the original image is ignore
    red = (img[0][~padded] * 255).round().long()
    torch.testing.assert_close(red, m[~padded] * 10)  # flips/crops moved the mask with the image
    assert (img[:, padded] == 0).all()


def test_eval_transform_is_deterministic_and_collate_pads_with_ignore():
    rng = np.random.default_rng(0)
    tf = segmentation_eval_transforms()
    image = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, size=(7, 9)).astype(np.uint8)
    a, b = tf(image=image, mask=mask), tf(image=image, mask=mask)
    assert torch.equal(a["image"], b["image"])
    np.testing.assert_array_equal(np.asarray(a["mask"]), mask)
    samples = [
        {"image": torch.rand(3, 7, 9), "mask": torch.zeros(7, 9, dtype=torch.long), "size": torch.tensor([7, 9]),
         "orig_size": torch.tensor([7, 9]), "path": "a.png"},
        {"image": torch.rand(3, 5, 11), "mask": torch.ones(5, 11, dtype=torch.long), "size": torch.tensor([5, 11]),
         "orig_size": torch.tensor([10, 22]), "path": "b.png"},
    ]  # fmt: skip
    batch = segmentation_collate(samples, ignore_index=IGNORE)
    assert batch["image"].shape == (2, 3, 7, 11) and batch["mask"].shape == (2, 7, 11)
    assert (batch["mask"][0, :, 9:] == IGNORE).all() and (batch["mask"][1, 5:] == IGNORE).all()
    assert (batch["image"][1, :, 5:] == 0).all()
    assert batch["size"].tolist() == [[7, 9], [5, 11]] and batch["orig_size"][1].tolist() == [10, 22]


def test_dataset_rejects_mask_of_other_size(tmp_path):
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(tmp_path / "a_mask.png")
    ds = SegmentationDataset([tmp_path / "a.png"], [tmp_path / "a_mask.png"], num_classes=2)
    with pytest.raises(ValueError, match="a_mask.png is 6x4 but image .*a.png is 5x4"):
        ds[0]


def test_shapes_segmentation_datamodule():
    dm = ShapesSegmentationDataModule(num_train=4, num_val=3, image_size=48, batch_size=2, num_workers=0)
    assert dm.num_classes == len(SHAPE_CLASSES) + 1 and dm.class_names[0] == "background"
    val = dm.val_dataloader().dataset
    sample = val[1]
    rendered = render_shapes(1, seed=1, image_size=48)  # val stream = split_seed(0, "val") = 1
    np.testing.assert_array_equal(sample["mask"].numpy(), rendered["semantic"])
    np.testing.assert_array_equal((sample["image"] * 255).round().byte().permute(1, 2, 0).numpy(), rendered["image"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 48, 48)
    valid = batch["mask"][batch["mask"] != IGNORE]
    assert valid.min() >= 0 and valid.max() < dm.num_classes
    pred = next(iter(dm.predict_dataloader()))
    assert "mask" not in pred and len(pred["path"]) == 2
