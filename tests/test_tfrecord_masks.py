"""Segmentation from TFRecord: make_tfrecords.py masks -> TFRecordMaskDataModule == FolderSegmentationDataModule."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_tfrecord_detection import make_tfrecords  # the converter tool, run in-process
from test_tfrecord_faces import damage_record, run_config
from layouts import CLASSES, IGNORE, write_mask_dataset
from layouts import MASK_FILES as FILES

from datamodules import FolderSegmentationDataModule, TFRecordMaskDataModule
from datamodules.tfrecord import CorruptRecordError, TFRecordWriter, build_example, load_index

# Lightning warns about any IterableDataset with __len__; ours splits workers itself, so the length is exact.
pytestmark = pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")

@pytest.fixture()
def seg(tmp_path: Path) -> dict:
    return write_mask_dataset(tmp_path)


def by_name(dataset) -> dict[str, dict]:
    return {Path(sample["path"]).name: sample for sample in dataset}


def test_same_samples_as_the_folder_datamodule(seg: dict) -> None:
    # No scaling, flipping or jitter, and crops as large as the padded images: training is deterministic too.
    common = dict(class_names_file=seg["classes"], crop_size=16, scale_range=(1.0, 1.0), hflip=0.0, color_jitter=0.0,
                  batch_size=2, num_workers=0)
    folder = FolderSegmentationDataModule(root=str(seg["root"]), **common)
    tfr = TFRecordMaskDataModule(seg["train_files"], seg["val_files"], **common)
    assert (tfr.num_classes, tfr.class_names, tfr.ignore_index) == (3, CLASSES, IGNORE)
    for split in ("train", "val", "test"):
        expected, got = by_name(folder.dataset(split)), by_name(tfr.dataset(split))
        files = FILES["train" if split == "train" else "val"]  # testing reads the validation shards
        assert sorted(got) == sorted(expected) == sorted(f"{stem}.{fmt}" for stem, _, fmt, _ in files)
        for name, want in expected.items():
            sample = got[name]
            assert sorted(sample) == sorted(want) == ["image", "mask", "orig_size", "path", "size"]
            for key in ("image", "mask", "size", "orig_size"):
                assert sample[key].dtype == want[key].dtype and torch.equal(sample[key], want[key]), (split, name, key)
            assert (sample["mask"] == IGNORE).any() and sample["mask"][sample["mask"] != IGNORE].max() < 3
    # Palette masks are read as their indices: compare with the file's index plane directly.
    mask_file = np.asarray(Image.open(seg["root"] / "masks" / "val" / "e.png"))
    assert Image.open(seg["root"] / "masks" / "val" / "e.png").mode == "P"
    assert np.array_equal(by_name(tfr.dataset("val"))["e.png"]["mask"].numpy(), mask_file)
    batch = next(iter(tfr.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 16, 16)
    assert batch["mask"].dtype == torch.int64 and len(tfr.train_dataloader()) == 2
    predicted = by_name(tfr.dataset("predict"))  # the validation shards, masks not read
    assert sorted(predicted) == ["e.png", "f.jpg", "g.png"] and all("mask" not in s for s in predicted.values())


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def record(image_hw: tuple[int, int] = (6, 5), mask: np.ndarray | None = None, mask_format: str = "png") -> bytes:
    mask = np.zeros(image_hw, np.uint8) if mask is None else mask
    return build_example({
        "image/encoded": encode(np.full((*image_hw, 3), 9)), "image/filename": "x.png",
        "image/height": image_hw[0], "image/width": image_hw[1],
        "image/segmentation/class/encoded": encode(mask), "image/segmentation/class/format": mask_format,
    })


BAD_RECORDS = {
    "size": (record(mask=np.zeros((6, 4))),
             r"image/segmentation/class/encoded is 4x6 but image/encoded is 5x6 \(width x height\)"),
    "colour": (record(mask=np.stack([np.zeros((6, 5)), np.ones((6, 5)), np.zeros((6, 5))], axis=-1)),
               r"mask image/segmentation/class/encoded: a RGB image with distinct colour channels"),
    "range": (record(mask=np.pad(np.full((1, 1), 7), ((0, 5), (0, 4)))),
              r"mask image/segmentation/class/encoded: values \[7\] are outside \[0, num_classes=3\)"),
    "lossy": (record(mask_format="jpeg"),
              r"image/segmentation/class/format is 'jpeg': masks must be stored losslessly"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_invalid_record_names_shard_record_and_problem(kind: str, tmp_path: Path) -> None:
    bad, message = BAD_RECORDS[kind]
    shard = str(tmp_path / f"{kind}.tfrecord")
    with TFRecordWriter(shard) as writer:
        writer.write(record())
        writer.write(bad)
    dm = TFRecordMaskDataModule(shard, shard, num_classes=3, num_workers=0)
    offset = int(load_index(shard)[1][0])
    where = re.escape(f"{shard}: record 1 at byte offset {offset}")  # added by TFRecordDataset as a note
    with pytest.raises(ValueError, match=message + r"(.|\n)*" + where):
        list(dm.dataset("val"))


def test_damaged_shard_names_shard_record_and_offset(seg: dict) -> None:
    shard = Path(seg["val_files"].replace("*", "00000-of-00001"))
    offset = damage_record(shard, 2)
    dm = TFRecordMaskDataModule(seg["train_files"], str(shard), num_classes=3, num_workers=0)
    with pytest.raises(CorruptRecordError, match=re.escape(f"{shard}: record 2 at byte offset {offset}: payload CRC")):
        list(dm.dataset("val"))


def test_deeplabv3plus_tfrecord_config_fast_dev_run(seg: dict, tmp_path: Path) -> None:
    cli = run_config("segmentation/deeplabv3plus_tfrecord.yaml", f"--data.init_args.train_files={seg['train_files']}",
                     f"--data.init_args.val_files={seg['val_files']}",
                     f"--data.init_args.class_names_file={seg['classes']}", "--data.init_args.crop_size=32",
                     "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
                     "--model.init_args.backbone=test_resnet", "--model.init_args.head_channels=16",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                     f"--trainer.default_root_dir={tmp_path}")
    assert cli.model.hparams.num_classes == 3 and list(cli.model.hparams.class_names) == CLASSES
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
