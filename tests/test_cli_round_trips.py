"""Every config on data in its published on-disk layout: `fit`, then `validate`, `test` and `predict --ckpt_path`.

The synthetic configs are covered by the task tests; this file runs the folder / COCO / VOC layouts, whose
DataModules link values (class names, identity names) into the task: a fit that worked was followed by an
evaluation that failed before running (a face checkpoint holding the identity folder's `class_names`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_shapes_coco
from lit_tasks.cli import run_cli as cli_main
from test_segmentation_task import write_folder_dataset, write_voc

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_identity_folders(root: Path, identities: int = 6, per_identity: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(identities):
        folder = root / f"id{i:02d}"
        folder.mkdir(parents=True)
        for j in range(per_identity):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{j}.png")
    return root


def case(name: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """(config, overrides) of a tiny run of ``name`` on data written under ``tmp_path``."""
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--data.init_args.num_workers=0"]
    if name == "face/arcface_folder.yaml":
        root = write_identity_folders(tmp_path / "faces")
        return CONFIGS / name, [*quiet, f"--data.init_args.root={root}", "--data.init_args.image_size=32",
                                "--model.init_args.image_size=32", "--model.init_args.backbone=test_resnet",
                                "--model.init_args.embedding_size=16", "--data.init_args.batch_size=4",
                                "--data.init_args.val_fraction=0.5", "--data.init_args.num_val_pairs=4",
                                "--model.init_args.num_log_images=0"]
    if name == "detection/fcos_coco.yaml":
        root = write_shapes_coco(tmp_path / "coco")
        return CONFIGS / name, [*quiet, f"--data.init_args.root={root}", "--data.init_args.image_size=64",
                                "--data.init_args.batch_size=2", "--model.init_args.backbone=resnet10t",
                                "--model.init_args.pretrained=false",  # the recipe's ImageNet weights: no hub here
                                "--model.init_args.fpn_channels=16", "--model.init_args.head_convs=1",
                                "--model.init_args.num_log_images=0"]
    seg = [*quiet, "--data.init_args.crop_size=32", "--data.init_args.batch_size=2",
           "--model.init_args.backbone=test_resnet", "--model.init_args.head_channels=8",
           "--model.init_args.num_log_images=0"]
    if name == "segmentation/deeplabv3plus_folder.yaml":
        write_folder_dataset(tmp_path / "seg")
        (tmp_path / "seg" / "classes.yaml").write_text("[sky, road, car]\n")  # the config's class_names_file
        return CONFIGS / name, [*seg, f"--data.init_args.root={tmp_path / 'seg'}", "--data.init_args.val_fraction=0.5"]
    if name == "segmentation/deeplabv3plus_voc.yaml":
        write_voc(tmp_path / "voc")
        return CONFIGS / name, [*seg, f"--data.init_args.root={tmp_path / 'voc'}"]
    raise KeyError(name)


@pytest.mark.parametrize("name", ["face/arcface_folder.yaml", "detection/fcos_coco.yaml",
                                  "segmentation/deeplabv3plus_folder.yaml", "segmentation/deeplabv3plus_voc.yaml"])
def test_fit_then_evaluate_from_the_checkpoint(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-tasks"])  # LightningCLI warns when pytest's own argv is present too
    config, overrides = case(name, tmp_path)
    common = [f"--config={config}", *overrides]
    cli_main(["fit", *common, "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
              f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    for subcommand in ("validate", "test", "predict"):
        cli = cli_main([subcommand, *common, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / subcommand}"])
        assert cli.trainer.state.finished, subcommand
