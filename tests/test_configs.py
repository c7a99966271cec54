"""Every config in configs/: `lit-tasks fit` with the config's own logger, on tiny data in the layout it documents.

Only data paths and sizes are overridden (roots, files, batch size, workers, image / crop / window sizes, a tiny
backbone; ImageNet weights off, as no test downloads). Never a linked size (``num_classes``, ...) and never the
logger: Lightning compares the task's and the DataModule's hyperparameters only when a logger is configured (even
under ``fast_dev_run``), and a DataModule that records a different value than the CLI links cannot start a run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
from conftest import write_shapes_coco
from layouts import write_coco_tfrecords, write_face_dataset, write_mask_dataset, write_recordio_faces
from layouts import write_thumos_features, write_voc

from datamodules.synthetic.figures import FIGURE_OKS_SIGMAS, write_figures_coco
from lit_tasks.cli import LINKED_SIZES, run_cli

# Lightning warns about any IterableDataset with __len__; ours splits workers itself, so the length is exact.
pytestmark = pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def init_args(part: str, **values: object) -> list[str]:
    """``--<part>.init_args.<name>=<value>`` for each value."""
    return [f"--{part}.init_args.{name}={value}" for name, value in values.items()]


# Tiny models (the task tests' sizes) and loaders.
LOADER = init_args("data", batch_size=2, num_workers=0)
FCOS = init_args("model", backbone="resnet10t", fpn_channels=16, head_convs=1)
DETR = init_args("model", backbone="resnet10t", d_model=32, nheads=2, num_encoder_layers=1, num_decoder_layers=1,
                 dim_feedforward=32, num_queries=6)
FACE = init_args("model", backbone="test_resnet", embedding_size=16) + init_args("data", image_size=32)
SEGMENTATION = init_args("model", backbone="test_resnet", head_channels=8)
CROP = init_args("data", crop_size=32)
OADTR = init_args("model", embed_dim=16, enc_layers=1, enc_heads=2, enc_mlp_dim=16, dec_layers=1, dec_heads=2,
                  dec_ffn_dim=16) + init_args("data", window=8, num_future=2, batch_size=8, num_workers=0)
POSE = init_args("model", backbone="test_resnet") + init_args("data", input_size="[32, 24]")
NO_DOWNLOAD = init_args("model", pretrained="false")


def coco(tmp_path: Path) -> list[str]:
    """COCO layout: annotations/instances_{train,val}2017.json, train2017/, val2017/."""
    return init_args("data", root=write_shapes_coco(tmp_path / "coco"), image_size=64)


def thumos(tmp_path: Path) -> list[str]:
    """THUMOS'14 features in both the LSTR / TeSTra folders and OadTR's pickles."""
    return [*init_args("data", root=write_thumos_features(tmp_path / "thumos")), *OADTR]


def seg_folder(tmp_path: Path) -> list[str]:
    """images/{train,val}, masks/{train,val} and classes.yaml under the root."""
    return init_args("data", root=write_mask_dataset(tmp_path)["root"])


def seg_tfrecord(tmp_path: Path) -> list[str]:
    """Image + mask shards (make_tfrecords.py masks) and the class names file."""
    seg = write_mask_dataset(tmp_path)
    return init_args("data", train_files=seg["train_files"], val_files=seg["val_files"],
                     class_names_file=seg["classes"])


def voc(tmp_path: Path) -> list[str]:
    """VOC2012 layout: JPEGImages, SegmentationClass, ImageSets/Segmentation."""
    write_voc(tmp_path / "voc")
    return init_args("data", root=tmp_path / "voc")


def face_folder(tmp_path: Path) -> list[str]:
    """One folder per identity and LFW-style pairs.txt."""
    faces = write_face_dataset(tmp_path)
    return init_args("data", root=faces["root"], pairs=faces["pairs"])


def face_tfrecord(tmp_path: Path) -> list[str]:
    """Identity shards (make_tfrecords.py folder), their label map and pairs.txt."""
    faces = write_face_dataset(tmp_path)
    return init_args("data", train_files=faces["train_files"], label_map=faces["label_map"], pairs=faces["pairs"])


def face_recordio(tmp_path: Path) -> list[str]:
    """An insightface train.rec / train.idx with the config's three .bin sets beside it."""
    rec = write_recordio_faces(tmp_path / "ms1m", bins=("lfw.bin", "cfp_fp.bin", "agedb_30.bin"))
    return [*init_args("data", rec=rec), "--model.init_args.backbone=iresnet18"]


def detection_tfrecord(tmp_path: Path) -> list[str]:
    """TF Object Detection API shards of a COCO layout and their label map."""
    shards = write_coco_tfrecords(write_shapes_coco(tmp_path / "coco"), tmp_path / "tfr")
    return init_args("data", train_files=shards["train_files"], val_files=shards["val_files"],
                     label_map=shards["label_map"], image_size=64)


def figures(tmp_path: Path) -> list[str]:
    """COCO person-keypoints layout (13-keypoint stick figures)."""
    root = tmp_path / "figures"
    write_figures_coco(root, {"train2017": (4, 0), "val2017": (2, 1)}, image_size=64)
    # 13 keypoints, not COCO's 17: a keypoint dataset of its own gives its OKS sigmas (the config's comment)
    return init_args("data", root=root, oks_sigmas=list(FIGURE_OKS_SIGMAS))


SHAPES = init_args("data", num_train=4, num_val=2, image_size=64)
SYNTHETIC_FACES = init_args("data", num_train_identities=4, samples_per_identity=2, num_val_identities=4,
                            val_samples_per_identity=2, num_val_pairs=8)
STREAMS = init_args("data", num_train=4, num_val=2, num_test=2, min_frames=20, max_frames=30)

# config -> overrides on data written under tmp_path
CASES: dict[str, Callable[[Path], list[str]]] = {
    "action/oadtr_synthetic.yaml": lambda tmp: [*OADTR, *STREAMS],
    "action/oadtr_thumos.yaml": thumos,
    "action/oadtr_thumos_pickles.yaml": thumos,
    "detection/detr_coco.yaml": lambda tmp: [*coco(tmp), *LOADER, *DETR, *NO_DOWNLOAD],
    "detection/detr_shapes.yaml": lambda tmp: [*SHAPES, *LOADER, *DETR],
    "detection/fcos_coco.yaml": lambda tmp: [*coco(tmp), *LOADER, *FCOS, *NO_DOWNLOAD],
    "detection/fcos_shapes.yaml": lambda tmp: [*SHAPES, *LOADER, *FCOS],
    "detection/fcos_tfrecord.yaml": lambda tmp: [*detection_tfrecord(tmp), *LOADER, *FCOS],
    "detection/vfnet_coco.yaml": lambda tmp: [*coco(tmp), *LOADER, *FCOS, *NO_DOWNLOAD],
    "detection/vfnet_shapes.yaml": lambda tmp: [*SHAPES, *LOADER, *FCOS],
    "face/arcface_folder.yaml": lambda tmp: [*face_folder(tmp), *LOADER, *FACE],
    "face/arcface_ms1m.yaml": lambda tmp: [*face_recordio(tmp), *LOADER, *FACE],
    "face/arcface_synthetic.yaml": lambda tmp: [*SYNTHETIC_FACES, *LOADER, *FACE],
    "face/arcface_tfrecord.yaml": lambda tmp: [*face_tfrecord(tmp), *LOADER, *FACE],
    "pose/rle_coco.yaml": lambda tmp: [*figures(tmp), *LOADER, *POSE],
    "pose/rle_shapes.yaml": lambda tmp: [*init_args("data", root=tmp / "figures", num_train=4, num_val=2,
                                                    image_size=64), *LOADER, *POSE],
    "segmentation/deeplabv3plus_folder.yaml": lambda tmp: [*seg_folder(tmp), *LOADER, *SEGMENTATION, *CROP],
    "segmentation/deeplabv3plus_shapes.yaml": lambda tmp: [*init_args("data", num_train=4, num_val=2, image_size=32),
                                                           *LOADER, *SEGMENTATION],
    "segmentation/deeplabv3plus_tfrecord.yaml": lambda tmp: [*seg_tfrecord(tmp), *LOADER, *SEGMENTATION, *CROP],
    "segmentation/deeplabv3plus_voc.yaml": lambda tmp: [*voc(tmp), *LOADER, *SEGMENTATION, *CROP],
}


def test_every_config_has_a_case():
    """A new config must be added here (and so run through the CLI below)."""
    assert sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_fits_with_its_own_logger(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lit-tasks"])  # LightningCLI warns when pytest's own argv is present too
    cli = run_cli(["fit", f"--config={CONFIGS / name}", *CASES[name](tmp_path), "--trainer.fast_dev_run=true",
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert cli.config["fit"]["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger"), name
    assert cli.trainer.loggers and cli.trainer.state.finished, name
    # What the DataModule records is what the CLI linked into the task (Lightning compares only shared keys).
    data, task = cli.datamodule, cli.model
    for key in LINKED_SIZES:
        if key in data.hparams and hasattr(data, key):
            assert data.hparams[key] == getattr(data, key), f"{name}: data.hparams[{key!r}]"
        if key in task.hparams and hasattr(data, key):
            assert task.hparams[key] == getattr(data, key), f"{name}: model.hparams[{key!r}]"
