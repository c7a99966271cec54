"""RecordIOFaceDataModule and the .bin verification sets through the face DataModules (golden insightface files).

Expected values come from the golden ``values.json`` (written with MXNet's own reader and insightface's code);
pixels are compared by sha256 of the ``(112, 112, 3)`` uint8 array the sample tensor holds (``x * 255``, exact
for a tensor that is ``uint8 / 255`` in float32).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_face_bin import _RunsAShellCommand
from test_recordio import GOLDEN, VALUES, golden_copy, needs_golden, patch, sha

from datamodules.faces.align import ARCFACE_TEMPLATE, norm_crop, transform_points
from datamodules.face_bin import RefusedPickleError
from datamodules.faces.folders import IdentityFolderDataModule
from datamodules.faces.samples import face_transform
from datamodules.images import decode_image
from datamodules.recordio import RecordIOError
from datamodules.faces.recordio import RecordIOFaceDataModule
from datamodules.faces.tfrecord import TFRecordIdentityDataModule

pytestmark = needs_golden


def pixels(image: torch.Tensor) -> np.ndarray:
    """The uint8 HWC array a ``(3, H, W)`` float tensor in [0, 1] was made from."""
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def golden_dm(**kwargs) -> RecordIOFaceDataModule:
    args = dict(rec=str(GOLDEN / "train.rec"), val_bins=["lfw.bin"], augment=False, batch_size=4, num_workers=0)
    return RecordIOFaceDataModule(**{**args, **kwargs})


def write_bin(path: Path, images: list[bytes], issame: list[bool]) -> Path:
    with open(path, "wb") as f:
        pickle.dump((images, issame), f, protocol=4)
    return path


def jpeg_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=95)
    return out.getvalue()


# -- golden files through the DataModule ---------------------------------------------------------------------
def test_every_golden_record_through_the_datamodule() -> None:
    train = VALUES["train"]
    dm = golden_dm()
    assert dm.num_identities == train["num_classes"] == 6  # from the header record: 6 identity records
    assert dm.verification_sets == ["lfw"]
    dm.setup("fit")
    assert len(dm.train_set) == 24 and dm.records().image_keys.tolist() == train["image_keys"]
    for i, key in enumerate(train["image_keys"]):
        expected = train["records"][str(key)]
        image, label = dm.train_set[i]
        assert image.shape == (3, 112, 112) and image.dtype == torch.float32 and label.dtype == torch.int64, key
        assert int(label) == expected["label"], key  # key 9 stores [2.0, 0.0]: its first value
        assert sha(pixels(image)) == expected["rgb_sha256"], key  # key 14 is stored in 3 chunks
    images, labels = next(iter(dm.train_dataloader()))  # shuffled, last batch dropped
    assert images.shape == (4, 3, 112, 112) and labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(6))


@pytest.mark.parametrize("name", ["lfw.bin", "lfw_py3.bin"])
def test_golden_bin_pairs_and_flags_through_the_datamodule(name: str) -> None:
    lfw = VALUES["lfw"]
    dm = golden_dm(val_bins=[name])
    dm.setup("validate")
    (loader,) = dm.val_dataloader()
    seen = 0
    for batch in loader:
        assert batch["image_a"].shape[1:] == (3, 112, 112) and batch["same"].dtype == torch.bool
        for a, b, same, index in zip(batch["image_a"], batch["image_b"], batch["same"], batch["index"]):
            i = int(index)
            assert bool(same) == lfw["issame"][i]
            assert sha(pixels(a)) == lfw["images"][2 * i]["rgb_sha256"]
            assert sha(pixels(b)) == lfw["images"][2 * i + 1]["rgb_sha256"]
            seen += 1
    assert seen == lfw["num_pairs"] == 12
    assert [len(x) for x in dm.test_dataloader()] == [3]  # test: the same sets


def test_two_bins_give_two_named_loaders_and_predict_embeds_every_image() -> None:
    dm = golden_dm(val_bins=["lfw.bin", str(GOLDEN / "lfw_py3.bin")])  # relative to the .rec's folder, or absolute
    assert dm.verification_sets == ["lfw", "lfw_py3"]
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [12, 12]
    dm.setup("predict")
    assert len(dm.predict_set) == 48
    item = dm.predict_set[25]
    assert item["name"] == "lfw_py3/00001" and sha(pixels(item["image"])) == VALUES["lfw"]["images"][1]["rgb_sha256"]


def test_num_identities_from_the_property_file_or_the_labels(tmp_path: Path) -> None:
    plain = VALUES["plain"]
    rec = golden_copy(tmp_path, "plain")  # no header record
    dm = RecordIOFaceDataModule(rec=str(rec), val_bins=[str(GOLDEN / "lfw.bin")], augment=False, num_workers=0)
    assert dm.num_identities == 6  # largest label + 1
    dm.setup("fit")
    assert [int(dm.train_set[i][1]) for i in range(24)] == plain["labels_in_key_order"]
    (tmp_path / "property").write_text("9,112,112")
    assert RecordIOFaceDataModule(rec=str(rec), val_bins=[str(GOLDEN / "lfw.bin")]).num_identities == 9
    (tmp_path / "property").write_text("3,112,112")  # fewer classes than the labels use
    dm = RecordIOFaceDataModule(rec=str(rec), val_bins=[str(GOLDEN / "lfw.bin")], num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"plain.rec: key 2 at byte offset 15068: label 4 is not below "
                                         r"num_identities=3"):
        dm.train_set[2]


def test_an_im2rec_pack_with_array_labels_from_key_0_trains(tmp_path: Path) -> None:
    """Key 0 of an im2rec pack with array labels is an image (``flag 2``, ``[class, aligned]``), not a header
    record: the DataModule sees all 5 images and counts 3 identities from the labels."""
    from test_recordio import im2rec_array_label_pack

    images = im2rec_array_label_pack(tmp_path / "train.rec", [2, 1, 0, 2, 1])
    dm = RecordIOFaceDataModule(rec=str(tmp_path / "train.rec"), val_bins=[str(GOLDEN / "lfw.bin")], augment=False,
                                image_size=16, num_workers=0)
    assert dm.num_identities == 3
    dm.setup("fit")
    assert len(dm.train_set) == 5 and [int(dm.train_set[i][1]) for i in range(5)] == [2, 1, 0, 2, 1]
    assert np.array_equal(pixels(dm.train_set[0][0]), decode_image(images[0]))


def test_two_workers_read_the_same_samples_as_the_main_process() -> None:
    dm = golden_dm()
    dm.setup("fit")
    reference = [dm.train_set[i] for i in range(len(dm.train_set))]
    loader = torch.utils.data.DataLoader(dm.train_set, batch_size=5, num_workers=2,
                                         multiprocessing_context="fork")
    images = torch.cat([batch[0] for batch in loader])
    labels = torch.cat([batch[1] for batch in loader])
    assert torch.equal(images, torch.stack([r[0] for r in reference]))
    assert labels.tolist() == [int(r[1]) for r in reference]


# -- bad input gets named errors -----------------------------------------------------------------------------
def test_corrupt_records_give_named_errors_through_the_datamodule(tmp_path: Path) -> None:
    train = VALUES["train"]
    rec = golden_copy(tmp_path, "train")
    offset5 = train["records"]["5"]["offset"]
    patch(rec, offset5, b"\x00\x00\x00\x00")  # flipped magic of key 5
    dm = RecordIOFaceDataModule(rec=str(rec), val_bins=[str(GOLDEN / "lfw.bin")], augment=False, num_workers=0)
    dm.setup("fit")
    with pytest.raises(RecordIOError, match=rf"train.rec: key 5 at byte offset {offset5}: bad magic 0x00000000"):
        dm.train_set[4]
    assert int(dm.train_set[5][1]) == 1  # its neighbours still read
    # Truncated tail: the file ends inside key 24's JPEG, so the index lists records past the end (header included).
    offset24 = train["records"]["24"]["offset"]
    with open(rec, "r+b") as f:
        f.truncate(offset24 + 100)
    with pytest.raises(RecordIOError, match=r"train.idx: key 25 at byte offset \d+: line 25: offset lies past the end"):
        RecordIOFaceDataModule(rec=str(rec), val_bins=[str(GOLDEN / "lfw.bin")]).num_identities
    # The plain layout's last record is the last in the file: cut inside it, that record is named as truncated.
    plain = golden_copy(tmp_path, "plain")
    (tmp_path / "property").write_text("6,112,112")  # no label scan: the damage shows when the record is read
    offset23 = VALUES["plain"]["records"]["23"]["offset"]
    with open(plain, "r+b") as f:
        f.truncate(offset23 + 100)
    dm = RecordIOFaceDataModule(rec=str(plain), val_bins=[str(GOLDEN / "lfw.bin")], augment=False, num_workers=0)
    dm.setup("fit")
    with pytest.raises(RecordIOError, match=rf"plain.rec: key 23 at byte offset {offset23}: truncated"):
        dm.train_set[23]


def test_index_offset_past_the_end_is_named_at_setup(tmp_path: Path) -> None:
    rec = golden_copy(tmp_path, "plain")
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    lines[3] = "3\t999996"
    idx.write_text("\n".join(lines) + "\n")
    dm = RecordIOFaceDataModule(rec=str(rec), val_bins=[str(GOLDEN / "lfw.bin")], num_workers=0)
    with pytest.raises(RecordIOError, match=r"plain.idx: key 3 at byte offset 999996: line 4: offset lies past"):
        dm.setup("fit")


def test_a_bin_holding_code_is_refused_by_the_datamodule(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([_RunsAShellCommand(marker), b"x"], [True]), f, protocol=2)
    dm = golden_dm(val_bins=[str(tmp_path / "evil.bin")])
    assert dm.verification_sets == ["evil"]
    with pytest.raises(RefusedPickleError, match=r"evil.bin: refusing to load (posix|os|nt)\.system"):
        dm.setup("validate")
    assert not marker.exists()


def test_verification_set_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"verification set 'cfp_fp.bin': .*insightface/cfp_fp.bin does not "
                                                 r"exist \(relative paths are relative to .*insightface\)"):
        golden_dm(val_bins=["lfw.bin", "cfp_fp.bin"]).verification_sets  # noqa: B018
    (tmp_path / "other").mkdir()
    shutil.copyfile(GOLDEN / "lfw.bin", tmp_path / "other" / "lfw.bin")
    with pytest.raises(ValueError, match=r"the set names \(file stems\) \['lfw'\] repeat"):
        golden_dm(val_bins=["lfw.bin", str(tmp_path / "other" / "lfw.bin")]).verification_sets  # noqa: B018
    with pytest.raises(ValueError, match="give verification pairs .* or .bin sets .*, not both"):
        golden_dm(pairs="pairs.txt")
    with pytest.raises(ValueError, match="no verification data; give `pairs`"):
        golden_dm(val_bins=None).setup("validate")
    with pytest.raises(ValueError, match=r"one/train.rec: 1 identity; face recognition needs at least 2"):
        RecordIOFaceDataModule(rec=str(_one_class_pack(tmp_path)), val_bins=[str(GOLDEN / "lfw.bin")]).num_identities


def _one_class_pack(tmp_path: Path) -> Path:
    from datamodules.recordio import IRHeader, pack_record, write_recordio

    rec = tmp_path / "one" / "train.rec"
    rec.parent.mkdir()
    image = jpeg_bytes(np.zeros((8, 8, 3), np.uint8))
    write_recordio(rec, [(k, pack_record(IRHeader(0, 0.0, k, 0), image)) for k in range(3)])
    return rec


def test_bins_of_another_size_are_resized_as_load_bin_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    faces = [rng.integers(0, 256, (100, 100, 3), dtype=np.uint8) for _ in range(4)]
    encoded = [jpeg_bytes(f) for f in faces]
    path = write_bin(tmp_path / "small.bin", encoded, [True, False])
    dm = golden_dm(val_bins=[str(path)], image_size=112)
    pair = dm.val_dataloader()[0].dataset[1]
    assert pair["image_a"].shape == (3, 112, 112)
    expected = face_transform(112, "none")(image=decode_image(encoded[2]))["image"]  # bilinear, as cv2.resize
    assert torch.equal(pair["image_a"], expected) and pair["same"] is False


# -- .bin sets on the other face DataModules -------------------------------------------------------------------
def _face_tree(root: Path, identities: int = 3, per_identity: int = 2, size: int = 40) -> Path:
    rng = np.random.default_rng(1)
    for i in range(identities):
        for j in range(per_identity):
            folder = root / f"person{i}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{j}.png")
    return root


def test_folder_and_tfrecord_datamodules_take_bins(tmp_path: Path) -> None:
    root = _face_tree(tmp_path / "faces")
    dm = IdentityFolderDataModule(str(root), val_bins=[str(GOLDEN / "lfw.bin")], image_size=32, batch_size=4,
                                  num_workers=0)
    assert dm.num_identities == 3  # with .bin sets no identity is held out
    assert dm.verification_sets == ["lfw"]
    batch = next(iter(dm.val_dataloader()[0]))
    assert batch["image_a"].shape == (4, 3, 32, 32) and batch["index"].tolist() == [0, 1, 2, 3]
    tf = TFRecordIdentityDataModule(train_files="unused-*.tfrecord", label_map="unused.pbtxt",
                                    val_bins=[str(GOLDEN / "lfw.bin")], image_size=32, num_workers=0)
    assert tf.verification_sets == ["lfw"] and len(tf.val_dataloader()[0].dataset) == 12


# -- alignment of raw photos from a landmarks CSV --------------------------------------------------------------
def test_folder_datamodule_aligns_raw_photos_from_a_landmarks_csv(tmp_path: Path) -> None:
    """A golden aligned face pasted into a bigger photo by a known similarity (rotated 20 degrees, scaled 1.6,
    shifted) comes back onto the template: the aligned crop equals the original face up to two bilinear
    resamplings (mean absolute difference of a few grey levels)."""
    import cv2

    face = decode_image(bytes(_golden_jpeg(1)))
    angle, scale, shift = np.deg2rad(20.0), 1.6, np.array([60.0, 35.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.hstack([rotation, shift[:, None]])
    root = tmp_path / "photos"
    for i in range(2):
        (root / f"id{i}").mkdir(parents=True)
        photo = cv2.warpAffine(face, matrix, (320, 280), flags=cv2.INTER_LINEAR)
        Image.fromarray(photo).save(root / f"id{i}" / "raw.png")
    landmarks = transform_points(ARCFACE_TEMPLATE, matrix)
    rows = [f"photos/id{i}/raw.png," + ",".join(repr(float(v)) for v in landmarks.ravel()) for i in range(2)]
    csv = tmp_path / "landmarks.csv"
    csv.write_text("path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n" + "\n".join(rows) + "\n")
    dm = IdentityFolderDataModule(str(root), val_bins=[str(GOLDEN / "lfw.bin")], landmarks=str(csv), image_size=112,
                                  num_workers=0)
    dm.setup("fit")
    aligned = pixels(dm.train_set[0][0]).astype(np.float64)  # the training transform may flip it: compare both
    error = min(np.abs(aligned - face).mean(), np.abs(aligned[:, ::-1] - face).mean())
    resized = cv2.resize(np.asarray(Image.open(root / "id0" / "raw.png")), (112, 112)).astype(np.float64)
    unaligned = np.abs(resized - face).mean()
    assert error < 6.0 < unaligned
    assert np.array_equal(dm.image_loader(root / "id1" / "raw.png"),
                          norm_crop(decode_image(root / "id1" / "raw.png"), landmarks))
    # An image without a row is an error naming it and the CSV.
    Image.fromarray(face).save(root / "id1" / "other.png")
    dm = IdentityFolderDataModule(str(root), val_bins=[str(GOLDEN / "lfw.bin")], landmarks=str(csv), num_workers=0)
    dm.setup("fit")
    with pytest.raises(KeyError, match=r"id1/other.png: no landmarks for this image in .*landmarks.csv"):
        [dm.train_set[i] for i in range(len(dm.train_set))]
    with pytest.raises(ValueError, match="image_size 100: the arcface template is defined for multiples"):
        IdentityFolderDataModule(str(root), landmarks=str(csv), image_size=100)


def test_alignment_applies_to_pairs_and_predict(tmp_path: Path) -> None:
    root = _face_tree(tmp_path / "faces", size=60)
    files = sorted(root.rglob("*.png"))
    points = ARCFACE_TEMPLATE.astype(np.float64) * 0.5 + 2.0  # faces at half the template scale in the 60 px photos
    row = ",".join(repr(float(v)) for v in points.ravel())
    (tmp_path / "lm.csv").write_text("".join(f"{os.path.relpath(p, tmp_path)},{row}\n" for p in files))
    (root / "pairs.txt").write_text("person0 0 person1 1\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("person0/0.png,person0/1.png,1\nperson0/0.png,person1/1.png,0\n")
    dm = IdentityFolderDataModule(str(root), pairs=str(pairs), pairs_root=str(root), landmarks=str(tmp_path / "lm.csv"),
                                  num_workers=0)
    dm.setup("validate")
    expected = norm_crop(decode_image(root / "person0" / "0.png"), points)
    assert np.array_equal(pixels(dm.val_set[0]["image_a"]), expected)
    dm.setup("predict")
    assert np.array_equal(pixels(dm.predict_set[0]["image"]), expected) and dm.predict_set[0]["name"] == "person0/0.png"


def _golden_jpeg(key: int) -> bytes:
    from datamodules.recordio import IndexedRecordIO

    return IndexedRecordIO(GOLDEN / "train.rec").unpack_at(key - 1)[1]


# -- the CLI on the golden pack: configs/face/arcface_ms1m.yaml ------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
MS1M = ROOT / "configs" / "face" / "arcface_ms1m.yaml"


def golden_cli_args(*extra: str) -> list[str]:
    return ["--config", str(MS1M), f"--data.rec={GOLDEN / 'train.rec'}", "--data.val_bins=[lfw.bin, lfw_py3.bin]",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--data.num_workers=0",
            *extra]


def test_arcface_ms1m_config_fast_dev_run_with_iresnet18_on_the_golden_pack() -> None:
    from lit_tasks.cli import run_cli
    from lit_tasks.models.face.iresnet import IResNet

    cli = run_cli(["fit", *golden_cli_args("--model.backbone=iresnet18", "--data.batch_size=4",
                                           "--trainer.fast_dev_run=true")])
    assert isinstance(cli.model.model, IResNet) and cli.model.model.layer1[0].conv1.weight.shape == (64, 64, 3, 3)
    assert cli.model.hparams.num_identities == 6 and cli.model.verification_sets == ["lfw", "lfw_py3"]  # linked
    metrics = cli.trainer.callback_metrics
    per_set = [float(metrics[f"val/{name}/accuracy"]) for name in ("lfw", "lfw_py3")]
    assert float(metrics["val/verification_accuracy"]) == pytest.approx(sum(per_set) / 2, abs=1e-6)
    assert {"val/lfw/tar_at_far_1e-3", "val/lfw_py3/auc", "val/lfw/accuracy_std"} <= set(metrics)
    assert "train/loss" in metrics and torch.isfinite(metrics["train/loss"])


def test_iresnet_checkpoint_predicts_exports_and_projects(tmp_path: Path) -> None:
    """fit 1 step (IResNet-18 at 56 px to keep it quick) -> predict --ckpt_path -> tools/export.py with its numeric
    check; the projector shows the first set and a ROC figure is logged per set."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_tasks.cli import run_cli
    from lit_tasks.face_recognition import FaceRecognitionTask
    from test_export import export_tool

    small = ("--model.backbone=iresnet18", "--model.image_size=56", "--data.image_size=56", "--data.batch_size=2",
             "--model.embedding_size=64")
    run_cli(["fit", *golden_cli_args(*small, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                                     "--trainer.limit_val_batches=1",
                                     "--trainer.num_sanity_val_steps=0", "--trainer.val_check_interval=1.0",
                                     "--model.num_log_images=3")])
    run = next(Path("lightning_logs/arcface_ms1m").glob("version_*"))
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["state_dict"]["criterion.weight"].shape == (6, 64)
    events = EventAccumulator(str(run)).Reload()
    assert {"val/lfw/roc", "val/lfw_py3/roc"} <= set(events.Tags()["images"])
    metadata = next(run.glob("*/val_embeddings/metadata.tsv")).read_text().splitlines()
    assert metadata == ["0", "1"]  # the first set's 2 pairs (no identity names in a .bin: the pair index)
    run_cli(["predict", *golden_cli_args(*small, f"--ckpt_path={last}", "--trainer.limit_predict_batches=2")])
    out = Path("lightning_logs/arcface_ms1m/predictions")
    embeddings, names = np.load(out / "embeddings.npy"), (out / "names.txt").read_text().splitlines()
    assert embeddings.shape == (4, 64) and names == ["lfw/00000", "lfw/00001", "lfw/00002", "lfw/00003"]
    task = FaceRecognitionTask.load_from_checkpoint(last, map_location="cpu")
    dm = RecordIOFaceDataModule(rec=str(GOLDEN / "train.rec"), val_bins=["lfw.bin"], image_size=56, num_workers=0)
    dm.setup("predict")
    np.testing.assert_allclose(embeddings[2], task.embed(dm.predict_set[2]["image"][None])[0].numpy(), atol=1e-5)
    report = export_tool.main(["--task", "lit_tasks.FaceRecognitionTask", "--ckpt", str(last), "--out",
                               str(tmp_path / "exported")])
    assert report["torchscript"]["max_abs_error"] <= 1e-4 and report["onnx"]["max_abs_error"] <= 1e-4


# -- tools/make_tfrecords.py rec -------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")
@pytest.mark.parametrize("layout", ["train", "plain"])
def test_rec_to_tfrecord_shards_give_the_same_samples_shuffled(tmp_path: Path, layout: str) -> None:
    from test_tfrecord_detection import make_tfrecords

    from datamodules.tfrecord import read_examples, read_label_map
    from datamodules.faces.tfrecord import IDENTITY_FEATURES

    out = tmp_path / "shards" / "ms1m"
    paths = make_tfrecords("rec", "--rec", str(GOLDEN / f"{layout}.rec"), "--out", str(out), "--num-shards", "3",
                           "--seed", "5")
    assert len(paths) == 3
    assert read_label_map(f"{out}.label_map.pbtxt") == (list(range(6)), [str(k) for k in range(6)])
    order = [example["image/source_id"].decode() for path in paths
             for example in read_examples(path, features=IDENTITY_FEATURES)]
    keys = VALUES[layout]["image_keys"]
    in_shard_order = [f"{layout}.rec:{keys[k]}" for k in np.random.default_rng(5).permutation(24)]
    assert sorted(order) == sorted(in_shard_order)  # every image once
    assert order[:8] == in_shard_order[0::3]  # the seeded order, dealt round-robin: shard 0 holds records 0, 3, 6, ...
    assert order[:8] != sorted(order[:8], key=lambda s: int(s.split(":")[1]))  # not the pack's identity order
    tfr = TFRecordIdentityDataModule(f"{out}-*.tfrecord", f"{out}.label_map.pbtxt", val_bins=[str(GOLDEN / "lfw.bin")],
                                     augment=False, num_workers=0)
    rec = RecordIOFaceDataModule(rec=str(GOLDEN / f"{layout}.rec"), val_bins=["lfw.bin"], augment=False, num_workers=0)
    assert tfr.num_identities == rec.num_identities == 6
    tfr.setup("fit")
    rec.setup("fit")
    keyed = lambda samples: sorted((int(label), image.numpy().tobytes()) for image, label in samples)  # noqa: E731
    assert keyed(tfr.train_set) == keyed(rec.train_set)  # the same JPEG bytes, decoded by the same code


@pytest.mark.slow
def test_two_ddp_processes_train_and_validate_from_the_pack(tmp_path: Path) -> None:
    """ddp_spawn (2 CPU processes, gloo) pickles the DataModule into each process, which opens its own descriptor:
    a step of training with Partial FC and validation over both .bin sets give the single-process metrics."""
    import lightning.pytorch as pl

    from lit_tasks.face_recognition import FaceRecognitionTask

    dm = golden_dm(val_bins=["lfw.bin", "lfw_py3.bin"], image_size=32, batch_size=4, augment=True)
    torch.manual_seed(0)
    task = FaceRecognitionTask(num_identities=dm.num_identities, backbone="test_resnet", image_size=32,
                               embedding_size=16, scale=16.0, partial_fc=True, verification_sets=dm.verification_sets)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(task, dm)
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False).validate(task, dm)[0]
    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path).validate(task, dm)[0]
    for key in ("val/lfw/accuracy", "val/lfw_py3/tar_at_far_1e-2", "val/verification_accuracy"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-7), key
