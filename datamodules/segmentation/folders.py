"""Semantic segmentation data on disk: image + class-id mask pairs in the VOC layout or any two folders.

Splits are listed by split files of stems (VOC's ``ImageSets/Segmentation/<split>.txt``), by ``train`` /
``val`` / ``test`` sub-folders, or drawn at random; a mask is paired with its image by file stem. Class
names come from a YAML / JSON file (or VOC's 21). What a mask may hold, the transforms and the sample dicts:
:mod:`datamodules.segmentation.samples`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import albumentations as A
import numpy as np
import yaml

from datamodules.base import BaseDataModule
from datamodules.images import list_images
from datamodules.segmentation.samples import (
    SegmentationDataset,
    check_ignore_index,
    segmentation_collate,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


# -- layouts on disk -------------------------------------------------------------------------------
def read_class_names(path: str | Path) -> list[str]:
    """Class names from a YAML or JSON file: a list, ``{classes|names: [...]}`` or ``{id: name}`` with ids 0..C-1."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f) if path.suffix.lower() == ".json" else yaml.safe_load(f)
    if isinstance(data, dict) and len(data) == 1 and next(iter(data)) in ("classes", "names", "class_names"):
        data = next(iter(data.values()))
    if isinstance(data, dict):
        try:
            ids = sorted(int(k) for k in data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"class names file {path}: mapping keys must be class ids, got {list(data)[:5]}") from err
        if ids != list(range(len(ids))):
            raise ValueError(f"class names file {path}: ids must be 0..{len(ids) - 1} without gaps, got {ids[:10]}")
        data = [data[k] if k in data else data[str(k)] for k in ids]
    if not isinstance(data, list) or not data:
        raise ValueError(f"class names file {path}: expected a non-empty list of names or an {{id: name}} mapping")
    return [str(name) for name in data]


def read_split(path: str | Path) -> list[str]:
    """Stems listed one per line in a split file (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} does not exist")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def pair_by_stem(images: Sequence[Path], mask_dir: Path, mask_suffix: str = ".png") -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs where the mask is ``mask_dir / (image stem + mask_suffix)``.

    Raises:
        FileNotFoundError: naming the image and the mask path that was expected.
        ValueError: when two images share a stem.
    """
    pairs, seen = [], {}
    for image in images:
        if image.stem in seen:
            raise ValueError(f"images {seen[image.stem]} and {image} share the stem {image.stem!r}, so one mask would serve both")
        seen[image.stem] = image
        mask = mask_dir / f"{image.stem}{mask_suffix}"
        if not mask.is_file():
            raise FileNotFoundError(f"image {image} has no mask: expected {mask}")
        pairs.append((image, mask))
    return pairs


# -- DataModules -----------------------------------------------------------------------------------
class MaskDataModule(BaseDataModule):
    """Shared machinery of the on-disk segmentation DataModules (subclasses list the files of each split).

    Args:
        num_classes: number of classes (counting background when it is a class); None takes the length of
            ``class_names_file``. Subclasses save the resolved count as their hyperparameter: the CLI links
            ``num_classes`` into the task, and Lightning refuses to start when the two differ.
        class_names_file: YAML/JSON with the class names (list, ``{classes: [...]}`` or ``{id: name}``).
        ignore_index: unlabelled id in the masks.
        reduce_zero_label: masks use 0 for "unlabelled" and 1..C for the classes.
        crop_size: side of the square training crops.
        scale_range: random rescale range of the training images before cropping.
        hflip: probability of a horizontal flip when training.
        color_jitter: brightness/contrast/saturation jitter strength when training (0 disables).
        predict_dir: folder of images for ``predict`` (defaults to the validation images).
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.
    """

    predict_split = "predict"

    default_class_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        num_classes: int | None = None,
        class_names_file: str | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        crop_size: int = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float = 0.2,
        predict_dir: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        names = read_class_names(class_names_file) if class_names_file else list(self.default_class_names)
        if num_classes is None:
            if not names:
                raise ValueError(f"{type(self).__name__}: give num_classes or a class_names_file")
            num_classes = len(names)
        if names and len(names) != num_classes:
            source = class_names_file or "the default class names"
            raise ValueError(f"{type(self).__name__}: num_classes={num_classes} but {source} lists {len(names)} names")
        check_ignore_index(ignore_index, num_classes)
        self.num_classes = num_classes
        self.class_names = names or [str(i) for i in range(num_classes)]
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.predict_dir = predict_dir
        self.collate_fn = functools.partial(segmentation_collate, ignore_index=self.ignore_index)

    def split_pairs(self, split: str) -> list[tuple[Path, Path]]:
        """``(image, mask)`` paths of ``split`` in ``("train", "val", "test")``."""
        raise NotImplementedError

    def build_dataset(self, split: str) -> SegmentationDataset:
        if split == "predict" and self.predict_dir is not None:
            images, masks = list_images(self.predict_dir), None
        else:
            pairs = self.split_pairs("val" if split == "predict" else split)
            images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
            masks = None if split == "predict" else masks
        return SegmentationDataset(
            images, masks, num_classes=self.num_classes, ignore_index=self.ignore_index,
            reduce_zero_label=self.reduce_zero_label, transform=self.transform(split),
        )

    def transform(self, split: str) -> A.Compose:
        """Random scale / crop / flip / jitter for ``"train"``, the image as it is for every other split."""
        if split == "train":
            return segmentation_train_transforms(
                self.crop_size, ignore_index=self.ignore_index, scale_range=self.scale_range, hflip=self.hflip,
                color_jitter=self.color_jitter,
            )
        return segmentation_eval_transforms()


class VOCSegmentationDataModule(MaskDataModule):
    """PASCAL VOC layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs of class ids,
    255 on object boundaries), ``ImageSets/Segmentation/<split>.txt`` listing the ids of each split.

    Args:
        root: the ``VOC2012`` folder (the one holding ``JPEGImages``).
        train_split, val_split, test_split: names of the split lists (VOC's test masks are not public, so
            testing defaults to ``val``).
        mask_dir: mask folder under ``root`` (``SegmentationClassAug`` for the augmented set).
        num_classes: 21 (background + 20 objects) unless ``class_names_file`` says otherwise.
        Other arguments: as ``MaskDataModule``.
    """

    default_class_names = VOC_CLASSES

    def __init__(
        self,
        root: str = "data/VOCdevkit/VOC2012",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        mask_dir: str = "SegmentationClass",
        num_classes: int | None = None,
        class_names_file: str | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        crop_size: int = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float = 0.2,
        predict_dir: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            num_classes=num_classes, class_names_file=class_names_file, ignore_index=ignore_index,
            reduce_zero_label=reduce_zero_label, crop_size=crop_size, scale_range=scale_range, hflip=hflip,
            color_jitter=color_jitter, predict_dir=predict_dir, batch_size=batch_size, num_workers=num_workers,
            pin_memory=pin_memory,
        )
        self.save_hyperparameters()
        self.record_resolved(num_classes=self.num_classes)  # what the CLI links, not the argument (None)
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.mask_dir = mask_dir

    def split_pairs(self, split: str) -> list[tuple[Path, Path]]:
        ids = read_split(self.root / "ImageSets" / "Segmentation" / f"{self.splits[split]}.txt")
        pairs = []
        for stem in ids:
            image = self.root / "JPEGImages" / f"{stem}.jpg"
            if not image.is_file():
                raise FileNotFoundError(f"VOC {split} split lists {stem!r} but {image} does not exist")
            pairs.extend(pair_by_stem([image], self.root / self.mask_dir))
        return pairs


class FolderSegmentationDataModule(MaskDataModule):
    """Any dataset as an image folder and a mask folder paired by file stem (``a.jpg`` <-> ``a.png``).

    Splits, in order of precedence: split lists (text files of stems, relative to ``root``); otherwise
    ``train``/``val``/``test`` sub-folders of both folders (``images/train``, ``masks/train``, ...);
    otherwise a seeded random ``val_fraction`` of the pairs is held out for validation (and testing).

    Args:
        root: dataset folder.
        image_dir, mask_dir: the two folders under ``root``.
        train_split, val_split, test_split: optional split lists under ``root``.
        val_fraction: held-out fraction when there are neither split lists nor sub-folders.
        split_seed: seed of that random hold-out.
        mask_suffix: mask file name = image stem + this.
        Other arguments: as ``MaskDataModule`` (``num_classes`` or ``class_names_file`` is required).
    """

    def __init__(
        self,
        root: str = "data/segmentation",
        image_dir: str = "images",
        mask_dir: str = "masks",
        train_split: str | None = None,
        val_split: str | None = None,
        test_split: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        mask_suffix: str = ".png",
        num_classes: int | None = None,
        class_names_file: str | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        crop_size: int = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float = 0.2,
        predict_dir: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        root_path = Path(root)
        if class_names_file is not None and not Path(class_names_file).is_absolute():
            if not Path(class_names_file).is_file() and (root_path / class_names_file).is_file():
                class_names_file = str(root_path / class_names_file)
        super().__init__(
            num_classes=num_classes, class_names_file=class_names_file, ignore_index=ignore_index,
            reduce_zero_label=reduce_zero_label, crop_size=crop_size, scale_range=scale_range, hflip=hflip,
            color_jitter=color_jitter, predict_dir=predict_dir, batch_size=batch_size, num_workers=num_workers,
            pin_memory=pin_memory,
        )
        self.save_hyperparameters()
        self.record_resolved(num_classes=self.num_classes)  # what the CLI links, not the argument (None)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = root_path
        self.image_dir = root_path / image_dir
        self.mask_dir = root_path / mask_dir
        self.split_lists = {"train": train_split, "val": val_split, "test": test_split}
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.mask_suffix = mask_suffix

    def split_pairs(self, split: str) -> list[tuple[Path, Path]]:
        listed = self.split_lists[split] or (self.split_lists["val"] if split == "test" else None)
        if listed is not None:
            return self._pairs_from_list(self.root / listed)
        sub = "val" if split == "test" and not (self.image_dir / "test").is_dir() else split
        if (self.image_dir / "train").is_dir():
            return pair_by_stem(list_images(self.image_dir / sub), self.mask_dir / sub, self.mask_suffix)
        pairs = pair_by_stem(list_images(self.image_dir), self.mask_dir, self.mask_suffix)
        order = np.random.default_rng(self.split_seed).permutation(len(pairs))
        n_val = int(round(self.val_fraction * len(pairs)))
        chosen = order[len(pairs) - n_val :] if split in ("val", "test") else order[: len(pairs) - n_val]
        return [pairs[i] for i in sorted(chosen)]

    def _pairs_from_list(self, list_path: Path) -> list[tuple[Path, Path]]:
        by_stem: dict[str, Path] = {}
        for image in list_images(self.image_dir):
            if image.stem in by_stem:
                raise ValueError(f"two images share the stem {image.stem!r}: {by_stem[image.stem]} and {image}")
            by_stem[image.stem] = image
        images = []
        for stem in read_split(list_path):
            if stem not in by_stem:
                raise FileNotFoundError(f"split list {list_path} names {stem!r} but {self.image_dir} has no such image")
            images.append(by_stem[stem])
        return pair_by_stem(images, self.mask_dir, self.mask_suffix)
