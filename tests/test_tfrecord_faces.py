"""Face identities from TFRecord: make_tfrecords.py folder -> TFRecordIdentityDataModule == IdentityFolderDataModule."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_tfrecord_detection import make_tfrecords  # the converter tool, run in-process
from layouts import write_face_dataset

from datamodules import IdentityFolderDataModule, TFRecordIdentityDataModule
from datamodules.faces.samples import face_transform
from datamodules.tfrecord import (
    CorruptRecordError,
    TFRecordWriter,
    build_example,
    load_index,
    read_examples,
    write_label_map,
)

# Lightning warns about any IterableDataset with __len__; ours splits workers itself, so the length is exact.
pytestmark = pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def faces(tmp_path: Path) -> dict:
    return write_face_dataset(tmp_path)


def keyed(samples) -> list[tuple[int, tuple[int, ...], bytes]]:
    """Samples as sorted ``(label, shape, pixel bytes)``: equal lists mean the same samples, image for image."""
    return sorted((int(label), tuple(image.shape), image.numpy().tobytes()) for image, label in samples)


def test_same_identities_and_samples_as_the_folder_datamodule(faces: dict) -> None:
    folder = IdentityFolderDataModule(str(faces["root"]), pairs=faces["pairs"], image_size=16, batch_size=2,
                                      num_workers=0)
    tfr = TFRecordIdentityDataModule(faces["train_files"], faces["label_map"], faces["pairs"], image_size=16,
                                     augment=False, batch_size=2, num_workers=0)
    assert tfr.num_identities == folder.num_identities == 3
    assert tfr.class_names == folder.class_names == ["alice", "bob", "carol"]
    tfr.setup("fit")
    folder.setup("fit")
    # Without flips both decode the same bytes the same way: every image and label must match exactly.
    reference = folder.train_set
    reference.transform = face_transform(16, "none")
    expected = keyed(reference)
    assert len(expected) == 7 and [label for label, _, _ in expected] == [0, 0, 0, 1, 1, 2, 2]
    assert keyed(tfr.train_set) == expected
    images, labels = next(iter(tfr.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert len(tfr.train_dataloader()) == 3  # 7 records, batches of 2, the last one dropped
    # Verification pairs and predict images come from the same files through the same code.
    assert len(tfr.val_set) == len(folder.val_set) == 4 and tfr.dataset("test") is tfr.val_set
    for got, want in zip(tfr.val_set, folder.val_set):
        assert torch.equal(got["image_a"], want["image_a"]) and torch.equal(got["image_b"], want["image_b"])
        assert (bool(got["same"]), got["identity_a"], got["identity_b"]) == (bool(want["same"]), want["identity_a"],
                                                                           want["identity_b"])
    assert [s["name"] for s in tfr.predict_set] == [s["name"] for s in folder.predict_set] == [
        "alice/alice_0001.jpg", "alice/alice_0002.png", "alice/alice_0003.png", "bob/bob_0001.png",
        "bob/bob_0002.jpg", "carol/carol_0001.png"]


def write_identity_shard(path: Path, records: list[tuple[int, str]], image: bytes) -> str:
    with TFRecordWriter(str(path)) as writer:
        for label, text in records:
            writer.write(build_example({"image/encoded": image, "image/class/label": label, "image/class/text": text}))
    return str(path)


def test_label_map_ids_become_contiguous_labels_and_bad_records_name_shard_and_record(tmp_path: Path) -> None:
    Image.fromarray(np.full((6, 5, 3), 7, dtype=np.uint8)).save(tmp_path / "face.png")
    image = (tmp_path / "face.png").read_bytes()
    label_map = str(tmp_path / "ids.pbtxt")
    write_label_map(label_map, [20, 10], ["bob", "alice"])  # ids as another tool might number them

    def read(records: list[tuple[int, str]], name: str) -> list:
        shard = write_identity_shard(tmp_path / name, records, image)
        dm = TFRecordIdentityDataModule(shard, label_map, pairs="unused.txt", image_size=4, num_workers=0)
        return list(dm.train_set)

    samples = read([(20, "bob"), (10, "alice"), (10, "")], "good.tfrecord")
    assert sorted(int(label) for _, label in samples) == [0, 0, 1]  # sorted ids 10, 20 -> labels 0, 1
    assert all(torch.allclose(im, torch.full((3, 4, 4), 7 / 255)) for im, _ in samples)
    with pytest.raises(ValueError, match=r"image/class/label 30 is not in the label map .*ids\.pbtxt \(2 ids from 10 "
                                         r"to 20\)(.|\n)*unknown\.tfrecord: record 1 at byte offset"):
        read([(10, "alice"), (30, "dave")], "unknown.tfrecord")
    with pytest.raises(ValueError, match=r"image/class/text 'bob' differs from the name 'alice' that the label map "
                                         r".* gives id 10(.|\n)*mixed\.tfrecord: record 1 at byte offset"):
        read([(20, "bob"), (10, "bob")], "mixed.tfrecord")
    with pytest.raises(OSError, match=r"cannot read image image/encoded(.|\n)*garbled\.tfrecord: record 0 "):
        shard = tmp_path / "garbled.tfrecord"
        with TFRecordWriter(str(shard)) as writer:
            writer.write(build_example({"image/encoded": b"no image", "image/class/label": 10}))
        list(TFRecordIdentityDataModule(str(shard), label_map, "unused.txt", num_workers=0).train_set)


def damage_record(shard: Path, record: int) -> int:
    """Flip a bit inside ``record``'s payload (located by the shard's index); returns the record's byte offset."""
    offset, length = (int(v) for v in load_index(str(shard))[record])
    data = bytearray(shard.read_bytes())
    data[offset + length - 20] ^= 0x01  # the last 4 bytes are the payload CRC: 20 back is payload
    shard.write_bytes(bytes(data))
    return offset


def run_config(config: str, *args: str):
    """``lit-tasks fit --config configs/<config> ARGS`` with ``fast_dev_run`` on the CPU; returns the CLI."""
    from lit_tasks.cli import run_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lit-tasks"])  # LightningCLI warns when pytest's own argv is present too
        return run_cli(["fit", f"--config={ROOT / 'configs' / config}", *args, "--trainer.accelerator=cpu",
                        "--trainer.fast_dev_run=true"])


def test_damaged_shard_names_shard_record_and_offset(faces: dict, tmp_path: Path) -> None:
    make_tfrecords("folder", "--root", str(faces["root"]), "--out", str(tmp_path / "plain"))
    shard = tmp_path / "plain-00000-of-00001.tfrecord"
    offset = damage_record(shard, 3)
    dm = TFRecordIdentityDataModule(str(shard), f"{tmp_path / 'plain'}.label_map.pbtxt", faces["pairs"], num_workers=0)
    with pytest.raises(CorruptRecordError, match=re.escape(f"{shard}: record 3 at byte offset {offset}: payload CRC")):
        list(dm.train_set)


def test_arcface_tfrecord_config_fast_dev_run(faces: dict, tmp_path: Path) -> None:
    cli = run_config("face/arcface_tfrecord.yaml", f"--data.init_args.train_files={faces['train_files']}",
                     f"--data.init_args.label_map={faces['label_map']}", f"--data.init_args.pairs={faces['pairs']}",
                     "--data.init_args.image_size=32", "--data.init_args.batch_size=2",
                     "--data.init_args.num_workers=0",
                     "--model.init_args.backbone=test_resnet", "--model.init_args.image_size=32",
                     "--model.init_args.embedding_size=16", "--model.init_args.scale=16.0",
                     f"--trainer.default_root_dir={tmp_path}")
    assert cli.model.hparams.num_identities == 3  # linked from the label map by the CLI
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert 0.0 <= float(cli.trainer.callback_metrics["val/verification_accuracy"]) <= 1.0


def test_folder_conversion_shuffles_records_with_its_seed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "ids"
    for person in ("ann", "ben", "cid", "dan"):
        (root / person).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(root / person / f"{k}.png")
    folder_order = [f"{p}/{k}.png" for p in ("ann", "ben", "cid", "dan") for k in range(5)]  # labels 0..3, 5 each

    def shards(seed: str, out: str) -> list[list[str]]:
        paths = make_tfrecords("folder", "--root", str(root), "--out", str(tmp_path / out), "--num-shards", "2",
                               "--seed", seed)
        return [[r["image/filename"][0].decode() for r in read_examples(p)] for p in paths]

    got = shards("0", "a")
    # The records in a random order drawn from the seed, then dealt round-robin over the shards.
    order = [folder_order[i] for i in np.random.default_rng(0).permutation(len(folder_order))]
    assert got == [order[0::2], order[1::2]]
    identities = [name.split("/")[0] for name in got[0]]
    assert identities != sorted(identities)  # not written identity by identity
    assert shards("0", "b") == got and shards("1", "c") != got
    assert sorted(got[0] + got[1]) == sorted(folder_order)
