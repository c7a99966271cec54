"""Semantic segmentation data on disk: image + class-id mask pairs in the VOC layout or any two folders.

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
``ignore_index``) and stacks ``size``/``orig_size`` into ``(B, 2)``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, pad_images
from datamodules.images import decode_image, exif_orientation, list_images
from datamodules.transforms import to_tensor

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


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
    mask: np.ndarray, num_classes: int, ignore_index: int, reduce_zero_label: bool, path: str | Path
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


# -- transforms ------------------------------------------------------------------------------------
def segmentation_train_transforms(
    crop_size: int,
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
        mask = check_mask(read_mask(path), self.num_classes, self.ignore_index, self.reduce_zero_label, path)
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
            images, masks, self.num_classes, self.ignore_index, self.reduce_zero_label, self.transform(split)
        )

    def transform(self, split: str) -> A.Compose:
        """Random scale / crop / flip / jitter for ``"train"``, the image as it is for every other split."""
        if split == "train":
            return segmentation_train_transforms(
                self.crop_size, self.ignore_index, self.scale_range, self.hflip, self.color_jitter
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
