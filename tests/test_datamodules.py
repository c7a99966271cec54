"""Package-wide contracts of ``datamodules``: lazy imports, a TFRecord library that knows no DataModule, and
hyperparameters that agree with what the CLI links into the task.

``python -m datamodules.tfrecord.index`` (no runpy warning) is tested in test_tfrecord_reader.py."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import datamodules

REPO = Path(__file__).resolve().parents[1]
# What lit_tasks.cli links from the DataModule into the task (LINKED_SIZES, and ignore_index): Lightning refuses
# to start when a DataModule saved one of these under the same name with another value ("Error while merging
# hparams").
LINKED = ("num_classes", "num_identities", "num_keypoints", "class_names", "ignore_index", "verification_sets",
          "keypoint_names", "flip_index", "skeleton", "oks_sigmas", "input_size", "feature_dim",
          "background_index", "ambiguous_index", "window", "num_future")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_tfrecord_format_imports_neither_lightning_nor_albumentations() -> None:
    # One fresh interpreter for every entry point: imports only ever add modules, so none of them loads either.
    result = run_python("import datamodules.tfrecord.reader; from datamodules.tfrecord import read_records, "
                        "parse_example; import datamodules, datamodules.tfrecord.index; import sys; loaded = "
                        "[m for m in ('lightning', 'albumentations') if m in sys.modules]; assert not loaded, loaded")
    assert result.returncode == 0, result.stderr


def test_datamodules_names_resolve_on_first_use() -> None:
    assert datamodules.TFRecordMaskDataModule.__module__ == "datamodules.segmentation.tfrecord"
    from datamodules import COCODetectionDataModule

    assert COCODetectionDataModule.__module__ == "datamodules.detection.coco"
    assert all(hasattr(datamodules, name) for name in datamodules.__all__)
    assert set(datamodules.__all__) <= set(dir(datamodules))
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchDataModule'"):
        datamodules.NoSuchDataModule  # noqa: B018


def test_the_tfrecord_package_imports_nothing_else_of_datamodules() -> None:
    package = REPO / "datamodules" / "tfrecord"
    outside = []
    for path in package.rglob("*.py"):
        depth = len(path.relative_to(package).parts) - 1  # levels of sub-packages below datamodules/tfrecord
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > depth + 1:
                outside.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.split(".")[0] in ("lightning", "albumentations", "lit_tasks") or (
                        name.startswith("datamodules") and not name.startswith("datamodules.tfrecord")):
                    outside.append(f"{path.name}: {name}")
    assert not outside


# -- hyperparameters against the values linked into the task ----------------------------------------------
@pytest.fixture()
def class_file(tmp_path: Path) -> str:
    path = tmp_path / "classes.yaml"
    path.write_text("- sky\n- road\n- car\n")
    return str(path)


def every_datamodule(class_file: str) -> dict[str, list[dict]]:
    """Constructor arguments for each exported DataModule, with derived values left for it to resolve."""
    return {
        "COCODetectionDataModule": [dict(root="coco")],
        "TFRecordDetectionDataModule": [dict(train_files="t", val_files="v", label_map="map.pbtxt")],
        "ShapesDetectionDataModule": [{}],
        "IdentityFolderDataModule": [dict(root="faces")],
        "TFRecordIdentityDataModule": [dict(train_files="t", label_map="map.pbtxt", pairs="pairs.txt")],
        "RecordIOFaceDataModule": [dict(rec="train.rec", val_bins=["lfw.bin"])],
        "SyntheticFacesDataModule": [{}],
        "VOCSegmentationDataModule": [{}, dict(class_names_file=class_file), dict(num_classes=21)],
        "FolderSegmentationDataModule": [dict(class_names_file=class_file), dict(num_classes=3),
                                         dict(num_classes=3, class_names_file=class_file, ignore_index=9)],
        "TFRecordMaskDataModule": [dict(train_files="t", val_files="v", class_names_file=class_file),
                                   dict(train_files="t", val_files="v", num_classes=4, ignore_index=100)],
        "ShapesSegmentationDataModule": [{}, dict(ignore_index=7)],
        "COCOKeypointDataModule": [dict(root="coco"), dict(root="coco", input_size=[64, 48])],
        "FiguresKeypointDataModule": [{}],
        "LSTRFeatureDataModule": [dict(root="thumos")],
        "OadTRFeatureDataModule": [dict(root="thumos")],
        "SyntheticStreamsDataModule": [{}],
        "TFRecordFeatureDataModule": [dict(train_files="t", test_files="s")],
    }


def test_saved_hyperparameters_equal_what_the_cli_links_into_the_task(class_file: str) -> None:
    cases = every_datamodule(class_file)
    assert sorted(cases) == sorted(n for n in datamodules.__all__ if n.endswith("DataModule") and n != "BaseDataModule")
    checked = 0
    for name, variants in cases.items():
        for kwargs in variants:
            dm = getattr(datamodules, name)(**kwargs)
            for key in set(LINKED) & set(dm.hparams):
                linked = getattr(dm, key)
                assert type(dm.hparams[key]) is type(linked) and dm.hparams[key] == linked, (name, kwargs, key)
                assert dm.hparams_initial[key] == linked, (name, kwargs, key)  # what Lightning compares
                checked += 1
    # num_classes and ignore_index of each mask DataModule variant, the shapes' ignore_index, the keypoint
    # DataModules' input_size
    assert checked == 21
