"""Albumentations presets shared by the DataModules.

Every preset ends with ``ToFloat`` + ``ToTensorV2``: images leave as float32 ``(3, H, W)`` tensors in
[0, 1] with no mean/std normalisation (networks normalise inside, so a trained model takes plain
[0, 1] images). Boxes are pascal_voc (xyxy absolute pixels) and travel with the label fields named in
``label_fields``; boxes partly outside the image are clipped, and those left (almost) empty are dropped.
Segmentation and pose presets reuse ``bbox_params`` and add ``masks`` / ``KeypointParams`` of their own.
"""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

DETECTION_LABEL_FIELDS: tuple[str, ...] = ("labels", "iscrowd")
MIN_BOX_AREA = 1.0  # pixels^2 after the transform: slivers cut off by a crop or clip carry no object


def bbox_params(label_fields: Sequence[str] = DETECTION_LABEL_FIELDS, min_visibility: float = 0.0) -> A.BboxParams:
    """Pascal-VOC box handling: clip to the image, drop invalid boxes and boxes under ``MIN_BOX_AREA``."""
    return A.BboxParams(
        format="pascal_voc",
        label_fields=list(label_fields),
        clip=True,
        filter_invalid_bboxes=True,
        min_area=MIN_BOX_AREA,
        min_visibility=min_visibility,
    )


def to_tensor() -> list[A.BasicTransform]:
    """uint8 HWC image -> float32 CHW tensor in [0, 1] (masks become tensors, unscaled)."""
    return [A.ToFloat(max_value=255.0), ToTensorV2()]


def detection_train_transforms(
    image_size: int,
    label_fields: Sequence[str] = DETECTION_LABEL_FIELDS,
    hflip: float = 0.5,
    scale_jitter: tuple[float, float] = (0.9, 1.1),
    color_jitter: float = 0.2,
) -> A.Compose:
    """Training preset: resize the longest side to ``image_size`` (aspect kept), flip, mild zoom and colour jitter.

    The zoom keeps the output size (an ``Affine`` about the centre, borders filled with 0), so batch
    shapes stay those of the validation preset.
    """
    return A.Compose(
        [
            A.LongestMaxSize(max_size=image_size),
            A.HorizontalFlip(p=hflip),
            A.Affine(scale=scale_jitter, keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5),
            A.ColorJitter(
                brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=color_jitter / 10, p=0.5
            ),
            *to_tensor(),
        ],
        bbox_params=bbox_params(label_fields),
    )


def detection_val_transforms(image_size: int, label_fields: Sequence[str] = DETECTION_LABEL_FIELDS) -> A.Compose:
    """Evaluation preset: resize the longest side to ``image_size`` (aspect kept), nothing random."""
    return A.Compose(
        [A.LongestMaxSize(max_size=image_size), *to_tensor()],
        bbox_params=bbox_params(label_fields),
    )
