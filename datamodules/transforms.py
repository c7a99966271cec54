"""Albumentations presets shared by the DataModules.

Every preset ends with ``ToFloat`` + ``ToTensorV2``: images leave as float32 ``(3, H, W)`` tensors in
[0, 1] with no mean/std normalisation (networks normalise inside, so a trained model takes plain
[0, 1] images). Boxes are pascal_voc (xyxy absolute pixels) and travel with the label fields named in
``label_fields``; boxes partly outside the image are clipped, and those left (almost) empty are dropped.
Segmentation and pose presets reuse ``bbox_params`` and add ``masks`` / ``KeypointParams`` of their own.

Detection resizing (:func:`detection_resize`) has two modes: ``"longest"`` (the longest side to ``image_size``,
for small square demos) and ``"shorter"``, the COCO recipe of mmdetection / Detectron2 / DETR: the shorter side
to ``image_size`` unless the longer side would then exceed ``max_size`` (800 / 1333: a 640x480 image becomes
1067x800). Training may draw the size from a list (multi-scale training). ``detection_train_transforms`` offers
the presets ``"flip"`` (the FCOS / VFNet COCO recipe), ``"jitter"`` (flip, zoom, colour: the small demos) and
``"detr"`` (DETR's multi-scale resize with random crops).
"""

from __future__ import annotations

import random
from typing import Any, Literal, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.augmentations.geometric import functional as fgeometric
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


ResizeMode = Literal["longest", "shorter"]
AugmentPreset = Literal["none", "flip", "jitter", "detr"]
AUGMENT_PRESETS: tuple[str, ...] = ("none", "flip", "jitter", "detr")

# DETR's training resize (detr datasets/coco.py make_coco_transforms), for image_size 800 / max_size 1333.
DETR_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))
DETR_CROP_RESIZE: tuple[int, ...] = (400, 500, 600)  # shorter side before the random crop (no cap)
DETR_CROP_RANGE: tuple[int, int] = (384, 600)  # crop side range
DETR_BASE_SIZE = 800


def rescale_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``size``, or smaller so that the longer side stays <= ``max_size``.

    mmcv's ``rescale_size(scale=(max_size, size))`` (mmdet ``Resize(keep_ratio=True)``): one factor
    ``min(size / short, max_size / long)``, each side ``int(side * factor + 0.5)``; 640x480 -> 1067x800. DETR's
    resize truncates instead (``int(size * w / h)``: 1066x800): at most one pixel apart.
    """
    factor = size / min(height, width)
    if max_size is not None:
        factor = min(factor, max_size / max(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class ShorterSideResize(A.DualTransform):
    """Resize keeping the aspect ratio: shorter side ``size`` drawn from ``sizes``, longer side capped at ``max_size``.

    The output size is :func:`rescale_size`'s. Boxes scale per axis with the image (new w / old w, new h / old h,
    as mmdet's ``Resize``), exactly: albumentations keeps boxes normalised while transforming.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None, interpolation: int = cv2.INTER_LINEAR,
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"ShorterSideResize: sizes must be positive integers, got {sizes}")
        self.max_size = max_size
        self.interpolation = interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        size = self.sizes[0] if len(self.sizes) == 1 else self.py_random.choice(self.sizes)
        new_h, new_w = rescale_size(height, width, size, self.max_size)
        return {"target_shape": (new_h, new_w), "scale_xy": (new_w / width, new_h / height)}

    def apply(self, img: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        return fgeometric.resize(img, target_shape, interpolation=self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        return fgeometric.resize(mask, target_shape, interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalised coordinates do not change under a resize

    def apply_to_keypoints(self, keypoints: np.ndarray, scale_xy: tuple[float, float], **params: Any) -> np.ndarray:
        return fgeometric.keypoints_scale(keypoints, *scale_xy)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sizes", "max_size", "interpolation")


class RandomSizeCrop(BaseCrop):
    """A crop of random width and height in ``[min_size, max_size]`` (at most the image's) at a random place.

    DETR's ``RandomSizeCrop``: each side drawn uniformly among the integers, then the corner uniformly. A side of
    the image shorter than ``min_size`` is kept whole. Boxes are clipped to the crop (the Compose's ``bbox_params``
    then drop those left empty).
    """

    def __init__(self, min_size: int, max_size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not 1 <= min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rng: random.Random = self.py_random
        w = rng.randint(min(self.min_size, width), min(width, self.max_size))
        h = rng.randint(min(self.min_size, height), min(height, self.max_size))
        x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
        return {"crop_coords": (x0, y0, x0 + w, y0 + h)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size")


def _scaled(sizes: Sequence[int], image_size: int) -> list[int]:
    """DETR's sizes (for 800-px evaluation) scaled to ``image_size``, rounded, duplicates removed."""
    return list(dict.fromkeys(max(1, round(s * image_size / DETR_BASE_SIZE)) for s in sizes))


def detr_scales(image_size: int = DETR_BASE_SIZE) -> list[int]:
    """DETR's training shorter sides 480, 512, ..., 800 (scaled by ``image_size`` / 800 for other sizes)."""
    return _scaled(DETR_SCALES, image_size)


def check_resize_options(*, resize: str, image_size: int, max_size: int | None, train_scales: Sequence[int] | None,
                         augment: bool | str) -> str:
    """Fail early, naming the option, on resize / augmentation settings that do not fit together.

    Returns the augmentation preset name (``True`` is ``"jitter"``, ``False`` is ``"none"``).
    """
    preset = {True: "jitter", False: "none"}.get(augment, augment) if isinstance(augment, bool) else augment
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"augment must be true, false or one of {list(AUGMENT_PRESETS)}, got {augment!r}")
    if resize not in ("longest", "shorter"):
        raise ValueError(f"resize must be 'longest' or 'shorter', got {resize!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if max_size is not None:
        if resize != "shorter":
            raise ValueError(f"max_size={max_size} caps the longer side in resize='shorter' mode; with "
                             f"resize='longest' the longest side is image_size={image_size}")
        if max_size < image_size:
            raise ValueError(f"max_size={max_size} must be >= image_size={image_size} (shorter side)")
    if train_scales is not None and (not train_scales or any(int(s) < 1 for s in train_scales)):
        raise ValueError(f"train_scales must be a non-empty list of positive sizes, got {train_scales}")
    if preset == "detr" and resize != "shorter":
        raise ValueError("augment='detr' resizes the shorter side (DETR's recipe): use it with resize='shorter'")
    return preset


def detection_resize(resize: ResizeMode, image_size: int | Sequence[int],
                     max_size: int | None = None) -> A.BasicTransform:
    """The resize of a detection preset; a list ``image_size`` draws the size per image (multi-scale training).

    ``"longest"``: longest side to the size (aspect kept). ``"shorter"``: :class:`ShorterSideResize` with
    ``max_size`` (None: no cap).
    """
    sizes = [int(image_size)] if isinstance(image_size, int) else [int(s) for s in image_size]
    if resize == "longest":
        if max_size is not None:
            raise ValueError("max_size applies to resize='shorter' only")
        return A.LongestMaxSize(max_size=sizes[0] if len(sizes) == 1 else sizes)
    if resize == "shorter":
        return ShorterSideResize(sizes, max_size)
    raise ValueError(f"resize must be 'longest' or 'shorter', got {resize!r}")


def detection_train_transforms(
    image_size: int,
    *,
    label_fields: Sequence[str] = DETECTION_LABEL_FIELDS,
    hflip: float = 0.5,
    scale_jitter: tuple[float, float] = (0.9, 1.1),
    color_jitter: float = 0.2,
    preset: AugmentPreset = "jitter",
    resize: ResizeMode = "longest",
    max_size: int | None = None,
    scales: Sequence[int] | None = None,
) -> A.Compose:
    """Training preset: resize (``scales`` draws the size per image, else ``image_size``) and augmentation.

    Presets:

    - ``"none"``: the resize only;
    - ``"flip"``: horizontal flip with probability ``hflip`` (the mmdet FCOS / VFNet COCO recipe);
    - ``"jitter"``: flip, a mild zoom (an ``Affine`` about the centre keeping the output size, borders 0) and
      colour jitter: for the small synthetic demos;
    - ``"detr"`` (``resize="shorter"`` only): DETR's (detr datasets/coco.py): flip, then with probability 1/2
      the multi-scale resize (``scales``, default 480, 512, ..., 800, longer side <= ``max_size``), else a resize
      of the shorter side to 400, 500 or 600, a :class:`RandomSizeCrop` of sides in [384, 600] and the same
      multi-scale resize. For ``image_size`` other than 800 those sizes scale with image_size / 800.
    """
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {list(AUGMENT_PRESETS)}")
    if preset == "detr":
        if resize != "shorter":
            raise ValueError("the 'detr' preset resizes the shorter side: use resize='shorter'")
        sizes = list(scales) if scales else detr_scales(image_size)
        crop_lo, crop_hi = _scaled(DETR_CROP_RANGE, image_size)
        transforms = [
            A.HorizontalFlip(p=hflip),
            A.OneOf([
                ShorterSideResize(sizes, max_size, p=0.5),
                A.Sequential([
                    ShorterSideResize(_scaled(DETR_CROP_RESIZE, image_size)),
                    RandomSizeCrop(crop_lo, crop_hi),
                    ShorterSideResize(sizes, max_size),
                ], p=0.5),
            ], p=1.0),
        ]
    else:
        transforms = [detection_resize(resize, list(scales) if scales else image_size, max_size)]
        if preset in ("flip", "jitter"):
            transforms.append(A.HorizontalFlip(p=hflip))
        if preset == "jitter":
            transforms += [
                A.Affine(scale=scale_jitter, keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5),
                A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                              hue=color_jitter / 10, p=0.5),
            ]
    return A.Compose([*transforms, *to_tensor()], bbox_params=bbox_params(label_fields))


def detection_val_transforms(image_size: int, label_fields: Sequence[str] = DETECTION_LABEL_FIELDS,
                             resize: ResizeMode = "longest", max_size: int | None = None) -> A.Compose:
    """Evaluation preset: the resize of ``resize`` mode to ``image_size`` (aspect kept), nothing random."""
    return A.Compose([detection_resize(resize, image_size, max_size), *to_tensor()],
                     bbox_params=bbox_params(label_fields))
