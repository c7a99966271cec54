"""Semantic segmentation as TFRecord shards: the image + mask folder encoder, the decoder, the DataModule.

Besides the ``image/*`` keys (:mod:`datamodules.tfrecord_images`) a record holds
``image/segmentation/class/encoded`` (a lossless image of class ids, PNG) and
``image/segmentation/class/format``, as ``tools/make_tfrecords.py masks`` (``mask_examples``) and
TensorFlow DeepLab's converters write them.

Image and mask are decoded by :mod:`datamodules.segmentation.samples`' own readers (the image upright, the mask as
stored; palette PNGs give their indices), checked by its ``check_mask`` (ids in ``[0, num_classes)`` or
``ignore_index``, ``reduce_zero_label``) and packed by its ``segmentation_sample`` with its transforms, so
a record gives exactly the sample ``MaskDataModule`` gives for the same image + mask files; ``path`` is
``image/filename`` (what prediction writers name files by). Errors name the feature key and what is
wrong; ``TFRecordDataset`` adds the shard, record and offset.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import albumentations as A
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datamodules.images import list_images
from datamodules.segmentation.folders import MaskDataModule, pair_by_stem
from datamodules.segmentation.samples import (
    check_mask,
    check_mask_orientation,
    check_mask_size,
    read_mask,
    segmentation_sample,
)
from datamodules.tfrecord import FixedLen, build_example, bytes_feature, normalize_spec
from datamodules.tfrecord.example_pb2 import Example
from datamodules.tfrecord_images import IMAGE_FEATURES, decode_image_feature, image_features, read_bytes
from datamodules.tfrecord_shards import TFRecordShards

MASK_KEY, MASK_FORMAT_KEY = "image/segmentation/class/encoded", "image/segmentation/class/format"
LOSSY_FORMATS = frozenset({"jpeg", "jpg"})  # class ids do not survive lossy compression
_COMMON = {**IMAGE_FEATURES, MASK_FORMAT_KEY: FixedLen((), "bytes", default=b"")}
MASK_FEATURES = normalize_spec({**_COMMON, MASK_KEY: FixedLen((), "bytes")})
IMAGE_ONLY_FEATURES = normalize_spec(_COMMON)  # predicting: records may carry no mask


def mask_pairs(images: str, masks: str, mask_suffix: str = ".png") -> list[tuple[str, str]]:
    """``(image, mask)`` paths as ``FolderSegmentationDataModule`` pairs them: ``masks/<image stem><mask_suffix>``."""
    pairs = pair_by_stem(list_images(images), Path(masks), mask_suffix)
    if not pairs:
        raise ValueError(f"no images in {images}")
    return [(str(image), str(mask)) for image, mask in pairs]


def _png_of_class_ids(ids: np.ndarray, where: str) -> bytes:
    """An 8-bit greyscale PNG of class ids; ids outside 0..255 cannot be stored so and raise."""
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"mask {where}: class ids {ids.min()}..{ids.max()} do not fit an 8-bit PNG mask (0..255)")
    buffer = io.BytesIO()
    Image.fromarray(ids.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_examples(pairs: Sequence[tuple[str, str]]) -> Iterator[Example]:
    """One segmentation Example per (image, mask) pair; the mask is stored as a PNG of class indices.

    PNG masks of 8-bit ids (L or palette) are stored byte for byte; others are read as ``MaskDataModule``
    reads them (palette indices, grey RGB) and re-encoded, and a colour mask fails naming the file. The
    mask must cover the image as displayed (EXIF orientation applied) and carry no rotating orientation
    tag of its own, as when the folder is read directly.
    """
    for image_path, mask_path in pairs:
        stem = os.path.splitext(os.path.basename(image_path))[0]
        features, height, width = image_features(image_path, os.path.basename(image_path), stem)
        mask_bytes = read_bytes(mask_path)
        with Image.open(io.BytesIO(mask_bytes)) as mask:
            check_mask_orientation(mask, mask_path)
            if mask.size != (width, height):
                raise ValueError(f"mask {mask_path} is {mask.height}x{mask.width} (h x w) but image {image_path} "
                                 f"is {height}x{width}")
            stored_as_is = mask.format == "PNG" and mask.mode in ("L", "P")  # 8-bit class indices already
        if not stored_as_is:  # re-encode the class ids (never colours: read_mask refuses a colour mask)
            mask_bytes = _png_of_class_ids(read_mask(mask_path), mask_path)
        yield build_example({**features, MASK_KEY: bytes_feature(mask_bytes), MASK_FORMAT_KEY: bytes_feature("png")})


class _NamedBytes(io.BytesIO):
    """Encoded bytes that print as a feature key, so ``datamodules.segmentation.samples``' readers name it in their errors."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


class MaskDecoder:
    """Parsed example -> the ``MaskDataModule`` sample dict (``image``, ``mask``, ``size``, ``orig_size``, ``path``).

    Args:
        num_classes, ignore_index, reduce_zero_label: as ``MaskDataModule`` (ids checked by ``check_mask``).
        transform: albumentations pipeline applied jointly to image and mask.
        with_mask: False for prediction: the mask (if any) is neither read nor returned.
    """

    def __init__(self, *, num_classes: int, ignore_index: int, reduce_zero_label: bool, transform: A.Compose,
                 with_mask: bool = True) -> None:
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.transform, self.with_mask = transform, with_mask

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        image = decode_image_feature(example)
        name = example["image/filename"] or example["image/source_id"]
        path = name.decode("utf-8", errors="replace") if name else f"{zlib.crc32(example['image/encoded']):08x}.png"
        if not self.with_mask:
            return segmentation_sample(image, None, self.transform, self.ignore_index, path)
        fmt = example[MASK_FORMAT_KEY].decode("utf-8", errors="replace").lower()
        if fmt in LOSSY_FORMATS:
            raise ValueError(f"{MASK_FORMAT_KEY} is {fmt!r}: masks must be stored losslessly (PNG), lossy "
                             "compression changes class ids")
        mask = read_mask(_NamedBytes(example[MASK_KEY], MASK_KEY))
        mask = check_mask(mask, num_classes=self.num_classes, ignore_index=self.ignore_index,
                          reduce_zero_label=self.reduce_zero_label, path=MASK_KEY)
        check_mask_size(mask, image, MASK_KEY, "image/encoded")
        return segmentation_sample(image, mask, self.transform, self.ignore_index, path)


class TFRecordMaskDataModule(MaskDataModule):
    """Segmentation from image + mask shards; ``train_files`` / ``val_files`` are paths or globs (``seg-*.tfrecord``).

    Args:
        train_files, val_files, test_files: shards of each split (``test_files`` defaults to ``val_files``).
        shuffle_buffer, seed: training shuffle (shard order per epoch + a buffer of this many records).
        on_corrupt: ``"raise"`` or ``"skip"`` damaged records (see ``TFRecordDataset``).
        predict_dir: folder of images for ``predict``; default the validation shards (masks not read).
        Other arguments: as ``MaskDataModule`` (``num_classes`` or ``class_names_file`` is required).

    The shard arguments and how each split is read: :mod:`datamodules.tfrecord_shards`.
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str],
        test_files: str | list[str] | None = None,
        num_classes: int | None = None,
        class_names_file: str | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        crop_size: int = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float = 0.2,
        predict_dir: str | None = None,
        shuffle_buffer: int = 256,
        seed: int = 0,
        on_corrupt: str = "raise",
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
        self.shards = TFRecordShards.of_splits(train_files=train_files, val_files=val_files, test_files=test_files,
                                               shuffle_buffer=shuffle_buffer, seed=seed, on_corrupt=on_corrupt)

    def build_dataset(self, split: str) -> Dataset:
        if split == "predict" and self.predict_dir is not None:
            return super().build_dataset(split)  # an image folder, read as MaskDataModule reads it
        with_mask = split != "predict"
        decoder = MaskDecoder(num_classes=self.num_classes, ignore_index=self.ignore_index,
                              reduce_zero_label=self.reduce_zero_label, transform=self.transform(split),
                              with_mask=with_mask)
        return self.shards.dataset("val" if split == "predict" else split,  # predict: the validation shards, in order
                                   features=MASK_FEATURES if with_mask else IMAGE_ONLY_FEATURES, decode=decoder,
                                   batch_size=self.batch_size)
