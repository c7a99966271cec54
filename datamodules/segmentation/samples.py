"""The segmentation family's sample contract: reading and checking class-id masks, transforms, samples, batches.

Masks are single-channel PNGs of class ids. Palette ("P" mode) PNGs, as VOC ships them, are read as their
palette *indices* (the class ids), never as RGB colours. ``ignore_index`` (default 255) marks unlabelled
pixels; every other value must lie in ``[0, num_classes)``, else loading fails naming the file and the value.
Images are read upright (``datamodules.images.decode_image`` applies the EXIF orientation); masks are read as
stored, so they must be drawn on the upright image, as labelling tools draw them (see ``read_mask``).
``reduce_zero_label`` is for datasets (ADE20K-style) whose 0 means "unlabelled": 0 becomes ``ignore_index``
and every other id moves down by one.

Samples are dicts: ``image`` float32 ``(3, H, W)`` in [0, 1], ``mask`` int64 ``(H, W)`` (absent when
predicting), ``size`` int64 ``[h, w]`` after the transform, ``orig_size`` int64 ``[h, w]`` of the file,
``path`` str. ``segmentation_collate`` pads a batch to a common size (images with 0, masks with
``ignore_index``) and stacks ``size``/``orig_size`` into ``(B, 2)``. Every segmentation DataModule (folders,
TFRecord, synthetic shapes) builds its samples here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import pad_images
from datamodules.images import decode_image, exif_orientation
from datamodules.transforms import to_tensor


# -- reading ---------------------------------------------------------------------------------------
def read_mask(path: str | Path | BinaryIO) -> np.ndarray:
    """``(H, W)`` int64 class ids of a mask file; palette PNGs give their indices, not their colours.

    A colour (RGB) mask is accepted only when its three channels are equal (a grey mask saved as RGB);
    otherwise the class ids cannot be recovered and the error says so. Masks are read as stored, never
    EXIF-rotated: labelling tools write them in the upright image's pixels (``decode_image`` reads the
    image upright), and a mask that carries a rotating orientation tag of its own is refused
    (``check_mask_orientation``).
    """
    with Image.open(path) as im:
        check_mask_orientation(im, path)
        mode = im.mode
        if mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            # np.asarray of a "P" image is its index plane: exactly the class ids VOC stores.
            return np.asarray(im).astype(np.int64)
        if mode in ("RGB", "RGBA"):
            rgb = np.asarray(im)[..., :3]
            if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
                return rgb[..., 0].astype(np.int64)
    raise ValueError(
        f"mask {path}: a {mode} image with distinct colour channels; expected a single-channel PNG of class "
        "ids or a palette (P mode) PNG"
    )


def check_mask_orientation(mask: Image.Image, path: str | Path | BinaryIO) -> None:
    """Refuse a mask whose EXIF orientation tag asks for a rotation or flip.

    Whether its pixels are already upright (the tag copied from the photo) or as the camera stored them
    cannot be told, and guessing wrong would misplace every label; saving it without the tag settles it.
    """
    orientation = exif_orientation(mask)
    if orientation != 1:
        raise ValueError(
            f"mask {path}: carries EXIF orientation {orientation}; masks are read as stored, in the pixels of the "
            "upright image, so a mask that asks to be rotated is ambiguous: save it without the orientation tag"
        )


def check_ignore_index(ignore_index: int, num_classes: int | None = None) -> None:
    """``ignore_index`` must be a non-negative id outside ``[0, num_classes)``.

    Negative values are refused rather than supported: mask files (PNG, TFRecord planes) store unsigned class
    ids, so no mask can hold one, and the masks travel through OpenCV as uint8/uint16 (-1 would become 255).
    """
    if ignore_index < 0:
        raise ValueError(f"ignore_index={ignore_index}: masks store unsigned class ids (PNG, TFRecord), so no mask "
                         "can hold a negative value; use an id >= num_classes, e.g. 255")
    if num_classes is not None and ignore_index < num_classes:
        raise ValueError(f"ignore_index={ignore_index} must lie outside [0, num_classes={num_classes})")


def check_mask(
    mask: np.ndarray, *, num_classes: int, ignore_index: int, reduce_zero_label: bool, path: str | Path
) -> np.ndarray:
    """Apply ``reduce_zero_label`` and check every id is in ``[0, num_classes)`` or ``ignore_index``.

    Raises:
        ValueError: naming ``path`` and the offending values (as stored in the file).
    """
    out = mask
    if reduce_zero_label:
        # ADE20K convention: 0 = unlabelled, classes are 1..C; ignore_index stays ignore_index.
        out = mask - 1
        out[(mask == 0) | (mask == ignore_index)] = ignore_index
    bad = ((out < 0) | (out >= num_classes)) & (out != ignore_index)
    if bad.any():
        values = np.unique(mask[bad])[:8].tolist()
        shift = " (after reduce_zero_label subtracts 1)" if reduce_zero_label else ""
        raise ValueError(
            f"mask {path}: values {values} are outside [0, num_classes={num_classes}){shift} and are not "
            f"ignore_index={ignore_index}"
        )
    return out


def check_mask_size(mask: np.ndarray, image: np.ndarray, mask_name: str, image_name: str) -> None:
    """Raise naming both unless the ``(H, W)`` mask covers the upright ``(H, W, 3)`` image pixel for pixel."""
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"{mask_name} is {mask.shape[1]}x{mask.shape[0]} but {image_name} is {image.shape[1]}x{image.shape[0]} "
            "(width x height); images are read upright (EXIF orientation applied), masks as stored"
        )



# -- transforms ------------------------------------------------------------------------------------
def segmentation_train_transforms(
    crop_size: int,
    *,
    ignore_index: int = 255,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
) -> A.Compose:
    """Joint image+mask augmentation: random scale, pad (mask with ``ignore_index``), random crop, flip, colour.

    Padding marks the new pixels as unlabelled, so the loss and metric never see invented background.
    Images are resized bilinearly and masks with nearest neighbour (ids must not blend).
    """
    lo, hi = scale_range
    return A.Compose(
        [
            A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST, p=1.0),
            A.PadIfNeeded(min_height=crop_size, min_width=crop_size, border_mode=cv2.BORDER_CONSTANT,
                          fill=0, fill_mask=ignore_index),
            A.RandomCrop(height=crop_size, width=crop_size),
            A.HorizontalFlip(p=hflip),
            A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                          hue=color_jitter / 4, p=0.5 if color_jitter > 0 else 0.0),
            *to_tensor(),
        ]
    )  # fmt: skip


def segmentation_eval_transforms() -> A.Compose:
    """Deterministic evaluation: the image at its own size (scores are computed at the label's resolution)."""
    return A.Compose(to_tensor())


# -- dataset and batching --------------------------------------------------------------------------
class SegmentationDataset(Dataset):
    """Image + mask pairs read from disk (masks optional, for prediction).

    Args:
        images: image paths.
        masks: mask paths aligned with ``images``, or None (predict: no labels).
        num_classes: ids must lie in ``[0, num_classes)`` or equal ``ignore_index``.
        ignore_index: the unlabelled id (also the fill value of padded mask pixels).
        reduce_zero_label: treat 0 as unlabelled and shift the other ids down by one.
        transform: albumentations pipeline applied jointly to ``image=`` and ``mask=``.
    """

    def __init__(
        self,
        images: Sequence[str | Path],
        masks: Sequence[str | Path] | None,
        *,
        num_classes: int,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        transform: A.Compose | None = None,
    ) -> None:
        if masks is not None and len(masks) != len(images):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.images = [Path(p) for p in images]
        self.masks = None if masks is None else [Path(p) for p in masks]
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform or segmentation_eval_transforms()

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw ``(image uint8 (H, W, 3), checked mask int64 (H, W) or None)`` of sample ``index``."""
        image = decode_image(self.images[index])
        if self.masks is None:
            return image, None
        path = self.masks[index]
        mask = check_mask(read_mask(path), num_classes=self.num_classes, ignore_index=self.ignore_index,
                          reduce_zero_label=self.reduce_zero_label, path=path)
        check_mask_size(mask, image, f"mask {path}", f"image {self.images[index]}")
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.load(index)
        return segmentation_sample(image, mask, self.transform, self.ignore_index, str(self.images[index]))


def segmentation_sample(
    image: np.ndarray, mask: np.ndarray | None, transform: A.Compose, ignore_index: int, path: str
) -> dict[str, Any]:
    """Run ``transform`` on an image (and mask) and pack the sample dict described in the module docstring."""
    orig_size = torch.tensor(image.shape[:2], dtype=torch.int64)
    if mask is None:
        out = transform(image=image)
    else:
        # OpenCV resizes/pads uint8 and uint16 but not int64; the ids fit in the narrowest that holds them.
        dtype = np.uint8 if max(int(mask.max(initial=0)), ignore_index) < 256 else np.uint16
        out = transform(image=image, mask=mask.astype(dtype))
    image_t = out["image"]
    sample = {"image": image_t, "size": torch.tensor(image_t.shape[-2:], dtype=torch.int64),
              "orig_size": orig_size, "path": path}  # fmt: skip
    if mask is not None:
        sample["mask"] = torch.as_tensor(out["mask"]).long()
    return sample


def segmentation_collate(samples: list[dict[str, Any]], ignore_index: int = 255, size_divisor: int = 1) -> dict[str, Any]:
    """Batch sample dicts: pad images (0) and masks (``ignore_index``) bottom/right to a common size.

    Returns ``image`` ``(B, 3, H, W)``, ``mask`` ``(B, H, W)`` int64 (if the samples have masks), ``size`` and
    ``orig_size`` ``(B, 2)`` int64, ``path`` list of str.
    """
    images = pad_images([s["image"] for s in samples], size_divisor)
    h, w = images.shape[-2:]
    batch = {
        "image": images,
        "size": torch.stack([s["size"] for s in samples]),
        "orig_size": torch.stack([s["orig_size"] for s in samples]),
        "path": [s["path"] for s in samples],
    }
    if "mask" in samples[0]:
        masks = torch.full((len(samples), h, w), ignore_index, dtype=torch.int64)
        for i, s in enumerate(samples):
            masks[i, : s["mask"].shape[-2], : s["mask"].shape[-1]] = s["mask"]
        batch["mask"] = masks
    return batch
