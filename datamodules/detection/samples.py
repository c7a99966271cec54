"""Detection samples and what every detection DataModule shares (COCO files, TFRecord shards, synthetic shapes).

A source only loads record ``i`` as numpy arrays; ``detection_sample`` runs the albumentations transform
and builds the target dict every detection task expects, for map-style sources (``DetectionDataset``) and
for TFRecord examples alike. ``DetectionDataModule`` holds the label map (contiguous labels
``0 .. num_classes - 1`` for the dataset's sorted class ids, no background class), the transforms and
the collation.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, pad_images
from datamodules.transforms import (
    AugmentPreset,
    ResizeMode,
    check_resize_options,
    detection_train_transforms,
    detection_val_transforms,
)

DetectionRecord = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, "np.ndarray | None"]


class DetectionSource(Protocol):
    """Random access to detection records.

    ``load(i)`` returns ``(image (H,W,3) uint8 RGB, boxes (N,4) float xyxy pixels, labels (N,) int64,
    iscrowd (N,) int64, image_id int, area (N,) float or None)``; ``area`` is the annotation's own area in
    original pixels (COCO's segmentation area), 0 (or None for all) where the dataset gives none: the box
    area is used then.
    """

    def __len__(self) -> int: ...

    def load(self, index: int) -> DetectionRecord: ...


def detection_sample(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    iscrowd: np.ndarray,
    image_id: int,
    area: np.ndarray | None,
    transform: Callable[..., dict[str, Any]] | None,
    where: str = "detection record",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(image, target)`` of one record after ``transform``.

    ``image`` is float32 ``(3, H, W)`` in [0, 1]. ``target`` holds the training targets: ``boxes`` (N, 4)
    float32 xyxy pixels of the transformed image, ``labels`` (N,) int64, ``iscrowd`` (N,) int64 (boxes the
    transform cut to nothing are gone); ``image_id`` int64 scalar, ``size`` int64 ``[h, w]`` of the
    transformed image and ``orig_size`` int64 ``[h, w]`` of the source image; and ``original``, the
    dataset's own annotations for evaluation, untouched by the transform: ``boxes`` (M, 4) xyxy in
    original pixels, ``labels``, ``iscrowd`` and ``area`` (M,) float32 (the annotation's area, COCO's
    segmentation area, which pycocotools' small/medium/large ranges use; the box area where none is given).
    The transform must take ``image``, ``bboxes``, ``labels`` and ``iscrowd`` and return a float tensor
    image (see ``datamodules.transforms``); ``None`` only converts to a tensor. ``where`` names the record
    in errors.
    """
    orig_h, orig_w = int(image.shape[0]), int(image.shape[1])
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    iscrowd = np.asarray(iscrowd, dtype=np.int64).reshape(-1)
    area = np.zeros(len(boxes), np.float32) if area is None else np.asarray(area, dtype=np.float32).reshape(-1)
    if not len(boxes) == len(labels) == len(iscrowd) == len(area):
        raise ValueError(
            f"{where} (image_id {image_id}): {len(boxes)} boxes, {len(labels)} labels, {len(iscrowd)} iscrowd "
            f"flags and {len(area)} areas; they must have one entry per object"
        )
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    original = {
        "boxes": torch.from_numpy(boxes.copy()),
        "labels": torch.from_numpy(labels.copy()),
        "iscrowd": torch.from_numpy(iscrowd.copy()),
        "area": torch.from_numpy(np.where(area > 0, area, box_area).astype(np.float32)),
    }
    if transform is not None:
        out = transform(image=image, bboxes=boxes, labels=labels, iscrowd=iscrowd)
        image_t = out["image"]
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        iscrowd = np.asarray(out["iscrowd"], dtype=np.int64).reshape(-1)
    else:
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
    if not (isinstance(image_t, torch.Tensor) and image_t.is_floating_point() and image_t.ndim == 3):
        raise TypeError(
            f"{where}: the transform must return a float (3, H, W) tensor image (end it with "
            f"datamodules.transforms.to_tensor()), got {type(image_t).__name__} {getattr(image_t, 'dtype', '')} "
            f"{tuple(getattr(image_t, 'shape', ()))}"
        )
    target = {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.from_numpy(labels),
        "iscrowd": torch.from_numpy(iscrowd),
        "image_id": torch.tensor(int(image_id), dtype=torch.int64),
        "size": torch.tensor([image_t.shape[-2], image_t.shape[-1]], dtype=torch.int64),
        "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
        "original": original,
    }
    return image_t.float(), target


class DetectionDataset(Dataset):
    """``(image, target)`` pairs (see ``detection_sample``) from a source and an albumentations transform."""

    def __init__(self, source: DetectionSource, transform: Callable[..., dict[str, Any]] | None = None) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return detection_sample(*self.source.load(index), self.transform,
                                where=f"{type(self.source).__name__}.load({index})")


def detection_collate(samples: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, list[dict]]:
    """Collate ``(image, target)`` pairs into ``(images (B,3,H,W), [target, ...])`` padded to /32.

    Each target keeps ``size`` = (h, w) of its image before padding and ``orig_size`` = (h, w) of the
    file on disk, so predictions can be mapped back to original pixels.
    """
    images, targets = zip(*samples)
    return pad_images(images), list(targets)


class DetectionDataModule(BaseDataModule):
    """Label map, transforms and collation shared by the detection DataModules.

    A subclass implements ``classes()`` (class ids sorted ascending and their names) and
    ``build_dataset(split)``, taking each split's transform from ``transform(split)``.

    Args:
        image_size: the size images are resized to (aspect ratio kept): the longest side (``resize="longest"``)
            or the shorter side (``resize="shorter"``).
        augment: training augmentation (``datamodules.transforms.detection_train_transforms``): ``"flip"``,
            ``"jitter"`` (flip / zoom / colour, = ``True``), ``"detr"`` or ``"none"`` (= ``False``).
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.
        resize: ``"longest"`` or ``"shorter"`` side to ``image_size``.
        max_size: ``resize="shorter"`` only: cap on the longer side (1333 in the COCO recipes; None: no cap).
        train_scales: sizes the training resize draws from per image (multi-scale training); None = image_size
            (the ``"detr"`` preset: DETR's 480..800 scaled to image_size).
    """

    collate_fn = staticmethod(detection_collate)

    def __init__(self, *, image_size: int, augment: bool | AugmentPreset, batch_size: int, num_workers: int,
                 pin_memory: bool, resize: ResizeMode = "longest", max_size: int | None = None,
                 train_scales: list[int] | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.preset = check_resize_options(resize=resize, image_size=image_size, max_size=max_size,
                                           train_scales=train_scales, augment=augment)
        self.image_size = image_size
        self.augment = augment
        self.resize, self.max_size = resize, max_size
        self.train_scales = list(train_scales) if train_scales is not None else None

    def classes(self) -> tuple[list[int], list[str]]:
        """``(class ids ascending, their names)``: label ``k`` is the ``k``-th id."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes (labels ``0 .. num_classes - 1``, no background class)."""
        return len(self.classes()[0])

    @property
    def class_names(self) -> list[str]:
        """Class name of each label."""
        return list(self.classes()[1])

    @property
    def category_ids(self) -> list[int]:
        """The dataset's class id of each label: ``category_ids[label]``."""
        return list(self.classes()[0])

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Contiguous label -> the dataset's class id, to write predictions back in the dataset's ids."""
        return dict(enumerate(self.classes()[0]))

    def transform(self, split: str) -> A.Compose:
        """The training preset (``augment``, ``train_scales``) for ``"train"``, else the evaluation preset."""
        if split == "train":
            return detection_train_transforms(self.image_size, preset=self.preset, resize=self.resize,
                                              max_size=self.max_size, scales=self.train_scales)
        return detection_val_transforms(self.image_size, resize=self.resize, max_size=self.max_size)
