"""TFRecord detection end to end: make_tfrecords.py coco -> TFRecordDetectionDataModule == COCODetectionDataModule."""

from __future__ import annotations

import io
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from layouts import make_tfrecords, write_coco_tfrecords  # other test files import make_tfrecords from here

from datamodules import COCODetectionDataModule, TFRecordDetectionDataModule
from datamodules.tfrecord import read_examples, read_label_map, write_label_map
from lit_tasks import DetectionTask

# Lightning warns about any IterableDataset with __len__; ours splits workers itself, so the length is exact.
pytestmark = pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")


@pytest.fixture()
def converted(shapes_coco_root: Path, tmp_path: Path) -> dict:
    return write_coco_tfrecords(shapes_coco_root, tmp_path / "tfr")


def samples_by_image(dataset) -> dict[int, tuple]:
    out = {}
    for image, target in dataset:
        out[int(target["image_id"])] = (image, target)
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_same_samples_as_the_coco_datamodule(converted: dict, split: str) -> None:
    coco = COCODetectionDataModule(str(converted["root"]), image_size=64, augment=False, num_workers=0)
    tfr = TFRecordDetectionDataModule(converted["train_files"], converted["val_files"], converted["label_map"],
                                      image_size=64, augment=False, num_workers=0)
    assert (tfr.num_classes, tfr.class_names, tfr.category_ids) == (coco.num_classes, coco.class_names,
                                                                     coco.category_ids)
    coco.setup("fit")
    tfr.setup("fit")
    expected = samples_by_image(coco.datasets[split])
    got = samples_by_image(tfr.datasets[split])
    assert sorted(got) == sorted(expected) and len(got) == 4
    objects = 0
    for image_id, (image, target) in expected.items():
        image_t, target_t = got[image_id]
        assert torch.equal(image_t, image)  # PNG is lossless and the transforms are the same
        # Boxes travel normalised as float32, so they match to float32 rounding, not bit for bit.
        torch.testing.assert_close(target_t["boxes"], target["boxes"], atol=1e-3, rtol=0)
        for key in ("labels", "iscrowd", "size", "orig_size", "image_id"):
            assert torch.equal(target_t[key], target[key]), key
        # The evaluation ground truth travels too: original boxes and the json's (non-box) areas.
        torch.testing.assert_close(target_t["original"]["boxes"], target["original"]["boxes"], atol=1e-3, rtol=0)
        for key in ("labels", "iscrowd", "area"):
            assert torch.equal(target_t["original"][key], target["original"][key]), key
        objects += len(target["labels"])
    assert objects > 0


def test_evaluation_splits_records_over_ranks_without_repeats(converted: dict) -> None:
    """Training pads ranks to equal length (repeats); evaluation must not: metrics would count repeats twice."""
    tfr = TFRecordDetectionDataModule(converted["train_files"], converted["val_files"], converted["label_map"],
                                      image_size=64, augment=False, num_workers=0)
    val, train = tfr.build_dataset("val"), tfr.build_dataset("train")
    assert (val.uneven, train.uneven) == ("none", "pad")
    ids = []
    for rank in range(3):  # 4 validation images over 3 ranks
        val._explicit_dist = (rank, 3)
        ids += [int(target["image_id"]) for _, target in val]
    assert sorted(ids) == [1, 2, 3, 4]


def test_fast_dev_run_fit_from_shards(converted: dict, tmp_path: Path) -> None:
    dm = TFRecordDetectionDataModule(converted["train_files"], converted["val_files"], converted["label_map"],
                                     image_size=64, batch_size=2, num_workers=0)
    task = DetectionTask(num_classes=dm.num_classes, backbone="resnet18", fpn_channels=32, head_convs=1,
                         warmup_steps=0)
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    assert trainer.state.finished
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k}
    assert losses and all(math.isfinite(v) for v in losses.values())


def test_folder_and_masks_converters(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for person in ("bob", "alice"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "faces" / person / f"{k}.png")
    paths = make_tfrecords("folder", "--root", str(tmp_path / "faces"), "--out", str(tmp_path / "ids"), "--num-shards", "2")
    records = [r for p in paths for r in read_examples(p)]
    assert sorted((int(r["image/class/label"][0]), r["image/class/text"][0]) for r in records) == \
        [(0, b"alice"), (0, b"alice"), (1, b"bob"), (1, b"bob")]
    assert read_label_map(str(tmp_path / "ids.label_map.pbtxt")) == ([0, 1], ["alice", "bob"])
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    masks = {}
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{k}.jpg")
        masks[str(k)] = rng.integers(0, 4, (9, 7), dtype=np.uint8)
        Image.fromarray(masks[str(k)]).save(tmp_path / "msk" / f"{k}.png")
    paths = make_tfrecords("masks", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                           "--out", str(tmp_path / "seg"), "--compression", "zlib")
    assert paths[0].endswith(".tfrecord.zlib")
    for record in read_examples(paths[0]):
        mask = np.asarray(Image.open(io.BytesIO(record["image/segmentation/class/encoded"][0])))
        assert np.array_equal(mask, masks[record["image/source_id"][0].decode()])
    # A grey mask saved as RGB is re-encoded to its ids; a colour mask has no ids and fails naming the file.
    Image.fromarray(np.repeat(masks["1"][..., None], 3, axis=2)).save(tmp_path / "msk" / "1.png")
    paths = make_tfrecords("masks", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                           "--out", str(tmp_path / "seg_rgb"))
    stored = {r["image/source_id"][0].decode(): r["image/segmentation/class/encoded"][0] for r in read_examples(paths[0])}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored["1"]))), masks["1"])
    colour = np.stack([masks["1"], masks["1"] * 0, masks["1"] * 0], axis=2)
    Image.fromarray(colour).save(tmp_path / "msk" / "1.png")
    with pytest.raises(ValueError, match=r"mask .*1\.png: a RGB image with distinct colour channels"):
        make_tfrecords("masks", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                       "--out", str(tmp_path / "bad"))
    Image.fromarray(masks["1"]).save(tmp_path / "msk" / "1.png")
    Image.fromarray(masks["0"][:5]).save(tmp_path / "msk" / "0.png")
    with pytest.raises(ValueError, match=r"mask .*0\.png is 5x7 \(h x w\) but image .*0\.jpg is 9x7"):
        make_tfrecords("masks", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                       "--out", str(tmp_path / "bad"))


def test_label_map_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "label_map.pbtxt")
    write_label_map(path, [21, 3], ["o'brien", "traffic light"])
    assert read_label_map(path) == ([3, 21], ["traffic light", "o'brien"])
    Path(path).write_text("item {\n  name: 'x'\n}\n")
    with pytest.raises(ValueError, match="item 0 has no id"):
        read_label_map(path)


def test_fcos_tfrecord_config_fast_dev_run(converted: dict, tmp_path: Path) -> None:
    from lit_tasks.cli import run_cli as cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "detection" / "fcos_tfrecord.yaml"
    cli = cli_main(["fit", f"--config={config}", f"--data.init_args.train_files={converted['train_files']}",
                    f"--data.init_args.val_files={converted['val_files']}",
                    f"--data.init_args.label_map={converted['label_map']}", "--data.init_args.image_size=64",
                    "--data.init_args.num_workers=0", "--model.init_args.backbone=resnet18",
                    "--model.init_args.fpn_channels=32", "--model.init_args.head_convs=1",
                    "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.hparams.num_classes == 5
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
