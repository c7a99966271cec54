"""Shared fixtures: tiny generated datasets on disk, and CPU settings for a 2-core machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Tests never download: a config whose recipe has ImageNet weights is run with --model.init_args.pretrained=false;
# one that forgets it fails here at once (timm's weights come from the Hugging Face hub) instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch loads OpenMP: busy-waiting threads make tests crawl when other processes share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, torch.get_num_threads()))


def write_shapes_coco(root: Path, num_train: int = 4, num_val: int = 4, image_size: int = 64) -> Path:
    """A COCO layout (annotations/instances_{train,val}2017.json + image folders) of synthetic shapes.

    Category ids are the shape class index * 10 + 1 (non-contiguous, as in real COCO); the first
    training image has no objects.
    """
    from datamodules.synthetic import SHAPE_CLASSES, render_shapes

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train2017", num_train, 100), ("val2017", num_val, 101)):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(count):
            s = render_shapes(i, seed=seed, image_size=image_size, max_objects=0 if (split, i) == ("train2017", 0) else 4)
            name = f"{i:04d}.png"
            Image.fromarray(s["image"]).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "height": image_size, "width": image_size})
            for box, label in zip(s["boxes"].tolist(), s["labels"].tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                # a segmentation area, smaller than the box (as COCO's): evaluation must use it, not w * h
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) * 10 + 1,
                             "bbox": [box[0], box[1], w, h], "area": round(0.7 * w * h, 2), "iscrowd": 0})
        cats = [{"id": k * 10 + 1, "name": n} for k, n in enumerate(SHAPE_CLASSES)]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


@pytest.fixture()
def shapes_coco_root(tmp_path: Path) -> Path:
    """Path of a tiny COCO-format dataset of synthetic shapes (see ``write_shapes_coco``)."""
    return write_shapes_coco(tmp_path / "coco")


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_every_test() -> None:
    """Every test starts from the same seeds (torch, NumPy's global generator, random), so a test's random inputs
    are the same on every machine and in every order the tests run in."""
    import random

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own directory, so nothing it writes (logs, config.yaml) lands in the checkout."""
    monkeypatch.chdir(tmp_path)
