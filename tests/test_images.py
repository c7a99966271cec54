"""The one image decoder: EXIF orientation applied as Pillow's exif_transpose does, errors naming the file or
record; every DataModule family (folder / COCO readers and TFRecord decoders) reads a photo taken sideways
upright, and masks are never rotated (a mask with an orientation tag of its own is refused)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from test_tfrecord_detection import make_tfrecords  # the converter tool, run in-process

from datamodules import (
    COCODetectionDataModule,
    FolderSegmentationDataModule,
    IdentityFolderDataModule,
    TFRecordDetectionDataModule,
    TFRecordIdentityDataModule,
    TFRecordMaskDataModule,
)
from datamodules.faces.samples import face_transform
from datamodules.images import IMAGE_EXTENSIONS, decode_image, image_header
from datamodules.tfrecord import TFRecordWriter, build_example, read_examples

# Lightning warns about any IterableDataset with __len__; ours splits workers itself, so the length is exact.
pytestmark = pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")

STORED = (8, 12)  # (h, w) as the camera stored the picture; orientation 6 shows it 12 high, 8 wide
ROTATE_90_CW = 6
# EXIF orientation -> the upright image from the stored pixels, in numpy (independent of Pillow's table).
UPRIGHT = {
    1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
    5: lambda a: np.rot90(np.fliplr(a), 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(np.fliplr(a), -1),
    8: lambda a: np.rot90(a, 1),
}  # fmt: skip


def encode(pixels: np.ndarray, fmt: str, orientation: int | None = None) -> bytes:
    """``pixels`` encoded as ``fmt``, with an EXIF orientation tag (0x0112) when given."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(pixels).save(buffer, format=fmt, exif=exif.tobytes(), **extra)
    return buffer.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """The pixels as stored, no orientation applied (what every reader returned before)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def photo(path: Path, seed: int = 0) -> np.ndarray:
    """Write a JPEG taken sideways (orientation 6) to ``path``; returns the upright pixels a viewer shows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*STORED, 3), dtype=np.uint8)
    data = encode(pixels, "JPEG", ROTATE_90_CW)
    path.write_bytes(data)
    upright = np.rot90(stored_pixels(data), -1)
    assert upright.shape == (STORED[1], STORED[0], 3)
    return np.ascontiguousarray(upright)


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255


# -- the decoder ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
def test_every_orientation_is_applied_as_exif_transpose_does(fmt: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (*STORED, 3), dtype=np.uint8)
    for orientation in (None, 0, *UPRIGHT, 9):
        data = encode(pixels, fmt, orientation)
        got = decode_image(data)
        with Image.open(io.BytesIO(data)) as image:
            reference = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        assert got.dtype == np.uint8 and np.array_equal(got, reference), (fmt, orientation)
        if fmt != "TIFF":  # Pillow's TIFF reader applies the tag itself: there are no raw pixels to compare with
            expected = UPRIGHT.get(orientation, UPRIGHT[1])(stored_pixels(data))  # 0, 9, absent: as stored
            assert np.array_equal(got, expected), (fmt, orientation)
        assert image_header(data) == (*got.shape[:2], fmt.lower()), (fmt, orientation)


def test_greyscale_and_palette_images_become_rgb_and_sources_are_interchangeable(tmp_path: Path) -> None:
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(grey).save(tmp_path / "g.png")
    got = decode_image(tmp_path / "g.png")
    assert got.shape == (4, 6, 3) and all(np.array_equal(got[..., c], grey) for c in range(3))
    data = (tmp_path / "g.png").read_bytes()
    with open(tmp_path / "g.png", "rb") as f:
        assert np.array_equal(decode_image(f), got) and np.array_equal(decode_image(data), got)
    assert np.array_equal(decode_image(str(tmp_path / "g.png")), got)
    assert {".jpg", ".jpeg", ".png", ".pgm", ".tif", ".webp"} <= IMAGE_EXTENSIONS


def test_errors_name_the_file_or_record(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"cannot read image .*bad\.jpg: cannot identify image file"):
        decode_image(tmp_path / "bad.jpg")
    with pytest.raises(OSError, match=r"cannot read image .*missing\.png: \[Errno 2\]"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(OSError, match=r"cannot read image image/encoded: cannot identify"):
        decode_image(b"\x00\x01", "image/encoded")
    truncated = encode(np.zeros((64, 64, 3), np.uint8), "PNG")[:-40]
    with pytest.raises(OSError, match=r"cannot read image record 3: "):
        decode_image(truncated, "record 3")
    with pytest.raises(OSError, match=r"cannot read image header\.png"):
        image_header(b"junk", "header.png")


# -- every DataModule family reads a sideways photo upright -----------------------------------------------
def test_coco_and_its_tfrecords_read_the_photo_upright_with_the_json_sizes_upright(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    upright = photo(root / "val2017" / "p.jpg")
    box = [1.0, 6.0, 5.0, 4.0]  # x, y, w, h on the upright image (8 wide, 12 high): below its middle
    data = {"images": [{"id": 4, "file_name": "p.jpg", "height": 12, "width": 8}],
            "annotations": [{"id": 1, "image_id": 4, "category_id": 2, "bbox": box, "iscrowd": 0}],
            "categories": [{"id": 2, "name": "thing"}]}
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    (root / "train2017").symlink_to(root / "val2017")
    coco = COCODetectionDataModule(str(root), image_size=12, augment=False, num_workers=0)
    image, target = coco.val_set[0]
    assert torch.equal(image, as_tensor(upright)) and target["orig_size"].tolist() == [12, 8]
    assert target["boxes"].tolist() == [[1.0, 6.0, 6.0, 10.0]]

    out = tmp_path / "tfr" / "val"
    make_tfrecords("coco", "--images", str(root / "val2017"), "--annotations",
                   str(root / "annotations" / "instances_val2017.json"), "--out", str(out))
    (record,) = read_examples(f"{out}-00000-of-00001.tfrecord")
    assert (int(record["image/height"][0]), int(record["image/width"][0])) == (12, 8)  # upright, as the json
    np.testing.assert_allclose([record[f"image/object/bbox/{k}"][0] for k in ("xmin", "ymin", "xmax", "ymax")],
                               [1 / 8, 6 / 12, 6 / 8, 10 / 12], rtol=1e-6)
    tfr = TFRecordDetectionDataModule(f"{out}-*.tfrecord", f"{out}-*.tfrecord", f"{out}.label_map.pbtxt",
                                      image_size=12, augment=False, num_workers=0)
    (image_t, target_t), = list(tfr.val_set)
    assert torch.equal(image_t, image)
    torch.testing.assert_close(target_t["boxes"], target["boxes"], atol=1e-5, rtol=0)

    # The json's sizes are of the displayed image: the stored 8x12 (h x w) contradicts them.
    data["images"][0].update(height=8, width=12)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    coco = COCODetectionDataModule(str(root), image_size=12, augment=False, num_workers=0)
    with pytest.raises(ValueError, match=r"COCO image 4 in .*instances_val2017\.json: .*p\.jpg is 12x8 \(h x w, "
                                         r"upright by its EXIF orientation\) but the json says 8x12"):
        coco.val_set[0]
    with pytest.raises(ValueError, match=r"p\.jpg is 12x8 \(h x w, upright"):
        make_tfrecords("coco", "--images", str(root / "val2017"), "--annotations",
                       str(root / "annotations" / "instances_val2017.json"), "--out", str(tmp_path / "bad"))


def test_identity_folders_and_their_tfrecords_read_photos_upright(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    upright = {name: photo(root / name / f"{name}_0001.jpg", seed=k) for k, name in enumerate(("alice", "bob"))}
    (root / "pairs.txt").write_text("alice 1 bob 1\n")
    folder = IdentityFolderDataModule(str(root), pairs=str(root / "pairs.txt"), image_size=10, num_workers=0)
    transform = face_transform(10, "none")
    folder.train_set.transform = transform  # no random flip
    expected = [transform(image=upright[name])["image"] for name in ("alice", "bob")]
    sideways = transform(image=np.ascontiguousarray(np.rot90(upright["alice"], 1)))["image"]
    assert not torch.equal(expected[0], sideways)  # the check below can tell the two apart
    assert all(torch.equal(folder.train_set[k][0], expected[k]) for k in range(2))
    assert torch.equal(folder.val_set[0]["image_a"], expected[0])

    out = tmp_path / "tfr" / "faces"
    make_tfrecords("folder", "--root", str(root), "--out", str(out))
    tfr = TFRecordIdentityDataModule(f"{out}-*.tfrecord", f"{out}.label_map.pbtxt", str(root / "pairs.txt"),
                                     image_size=10, augment=False, num_workers=0)
    got = sorted(((int(label), image) for image, label in tfr.train_set), key=lambda item: item[0])
    assert [label for label, _ in got] == [0, 1] and all(torch.equal(got[k][1], expected[k]) for k in range(2))


def write_segmentation(root: Path, mask: np.ndarray, mask_exif: int | None = None) -> np.ndarray:
    """``images/{train,val}/p.jpg`` (a sideways photo) and ``masks/{train,val}/p.png``; returns the upright image."""
    for split in ("train", "val"):
        upright = photo(root / "images" / split / "p.jpg")
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split / "p.png").write_bytes(encode(mask.astype(np.uint8), "PNG", mask_exif))
    return upright


def test_masks_refer_to_the_upright_image_in_folders_and_tfrecords(tmp_path: Path) -> None:
    ids = np.zeros((12, 8), np.int64)  # drawn on the upright image: the top third is class 2, a column class 1
    ids[:4] = 2
    ids[:, 6] = 1
    upright = write_segmentation(tmp_path / "seg", ids)
    folder = FolderSegmentationDataModule(str(tmp_path / "seg"), num_classes=3, num_workers=0)
    sample = folder.dataset("val")[0]
    assert torch.equal(sample["image"], as_tensor(upright)) and torch.equal(sample["mask"], torch.from_numpy(ids))
    out = tmp_path / "tfr" / "val"
    make_tfrecords("masks", "--images", str(tmp_path / "seg" / "images" / "val"), "--masks",
                   str(tmp_path / "seg" / "masks" / "val"), "--out", str(out))
    tfr = TFRecordMaskDataModule(f"{out}-*.tfrecord", f"{out}-*.tfrecord", num_classes=3, num_workers=0)
    (record,) = list(tfr.dataset("val"))
    assert torch.equal(record["image"], sample["image"]) and torch.equal(record["mask"], sample["mask"])

    # A mask in the stored (sideways) frame does not cover the upright image: an error naming both files.
    write_segmentation(tmp_path / "sideways", np.rot90(ids, 1))
    folder = FolderSegmentationDataModule(str(tmp_path / "sideways"), num_classes=3, num_workers=0)
    with pytest.raises(ValueError, match=r"mask .*p\.png is 12x8 but image .*p\.jpg is 8x12 \(width x height\); "
                                         r"images are read upright \(EXIF orientation applied\), masks as stored"):
        folder.dataset("val")[0]
    with pytest.raises(ValueError, match=r"mask .*p\.png is 8x12 \(h x w\) but image .*p\.jpg is 12x8"):
        make_tfrecords("masks", "--images", str(tmp_path / "sideways" / "images" / "val"), "--masks",
                       str(tmp_path / "sideways" / "masks" / "val"), "--out", str(tmp_path / "bad"))


def test_a_mask_with_its_own_orientation_tag_is_refused_never_rotated(tmp_path: Path) -> None:
    ids = np.zeros((12, 8), np.int64)
    write_segmentation(tmp_path / "seg", ids, mask_exif=ROTATE_90_CW)
    message = r"mask .*p\.png: carries EXIF orientation 6; masks are read as stored"
    folder = FolderSegmentationDataModule(str(tmp_path / "seg"), num_classes=3, num_workers=0)
    with pytest.raises(ValueError, match=message):
        folder.dataset("val")[0]
    with pytest.raises(ValueError, match=message):
        make_tfrecords("masks", "--images", str(tmp_path / "seg" / "images" / "val"), "--masks",
                       str(tmp_path / "seg" / "masks" / "val"), "--out", str(tmp_path / "bad"))
    # Shards written elsewhere (not by make_tfrecords) are checked when decoded.
    shard = str(tmp_path / "other.tfrecord")
    with TFRecordWriter(shard) as writer:
        writer.write(build_example({
            "image/encoded": (tmp_path / "seg" / "images" / "val" / "p.jpg").read_bytes(),
            "image/segmentation/class/encoded": (tmp_path / "seg" / "masks" / "val" / "p.png").read_bytes(),
        }))
    tfr = TFRecordMaskDataModule(shard, shard, num_classes=3, num_workers=0)
    with pytest.raises(ValueError, match=r"mask image/segmentation/class/encoded: carries EXIF orientation 6"):
        list(tfr.dataset("val"))
