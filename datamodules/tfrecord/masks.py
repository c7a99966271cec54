"""Semantic segmentation from TFRecord shards (``image/segmentation/class/encoded``, as ``make_tfrecords.py masks``
and TensorFlow DeepLab's converters write).

A record holds the image (``image/encoded``) and a lossless mask image of class ids. Both are decoded
by :mod:`datamodules.masks`' own readers (palette PNGs give their indices), checked by its
``check_mask`` (ids in ``[0, num_classes)`` or ``ignore_index``, ``reduce_zero_label``) and packed by
its ``make_sample`` with its transforms, so a record gives exactly the sample ``MaskDataModule`` gives
for the same image + mask files; ``path`` is ``image/filename`` (what prediction writers name files by).
Errors name the feature key and what is wrong; ``TFRecordDataset`` adds the shard, record and offset.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise checks the network

import albumentations as A
from torch.utils.data import Dataset

from ..masks import (
    MaskDataModule,
    check_mask,
    make_sample,
    read_image,
    read_mask,
)
from .dataset import TFRecordDataset
from .features import FixedLen, normalize_spec

MASK_KEY, MASK_FORMAT_KEY = "image/segmentation/class/encoded", "image/segmentation/class/format"
LOSSY_FORMATS = frozenset({"jpeg", "jpg"})  # class ids do not survive lossy compression
_COMMON = {
    "image/encoded": FixedLen((), "bytes"),
    "image/filename": FixedLen((), "bytes", default=b""),
    "image/source_id": FixedLen((), "bytes", default=b""),
    "image/height": FixedLen((), "int64", default=0),
    "image/width": FixedLen((), "int64", default=0),
    MASK_FORMAT_KEY: FixedLen((), "bytes", default=b""),
}
MASK_FEATURES = normalize_spec({**_COMMON, MASK_KEY: FixedLen((), "bytes")})
IMAGE_FEATURES = normalize_spec(_COMMON)  # predicting: records may carry no mask


class _NamedBytes(io.BytesIO):
    """Encoded bytes that print as a feature key, so ``datamodules.masks``' readers name it in their errors."""

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

    def __init__(self, num_classes: int, ignore_index: int, reduce_zero_label: bool, transform: A.Compose,
                 with_mask: bool = True) -> None:
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.transform, self.with_mask = transform, with_mask

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        encoded = example["image/encoded"]
        image = read_image(_NamedBytes(encoded, "image/encoded"))
        h, w = image.shape[:2]
        stored = (int(example["image/height"]), int(example["image/width"]))
        if stored != (0, 0) and stored != (h, w):
            raise ValueError(f"image/height x image/width say {stored[0]}x{stored[1]} but image/encoded is {h}x{w}")
        name = example["image/filename"] or example["image/source_id"]
        path = name.decode("utf-8", errors="replace") if name else f"{zlib.crc32(encoded):08x}.png"
        if not self.with_mask:
            return make_sample(image, None, self.transform, self.ignore_index, path)
        fmt = example[MASK_FORMAT_KEY].decode("utf-8", errors="replace").lower()
        if fmt in LOSSY_FORMATS:
            raise ValueError(f"{MASK_FORMAT_KEY} is {fmt!r}: masks must be stored losslessly (PNG), lossy "
                             "compression changes class ids")
        mask = read_mask(_NamedBytes(example[MASK_KEY], MASK_KEY))
        mask = check_mask(mask, self.num_classes, self.ignore_index, self.reduce_zero_label, MASK_KEY)
        if mask.shape != (h, w):
            raise ValueError(f"{MASK_KEY} is {mask.shape[1]}x{mask.shape[0]} but image/encoded is {w}x{h} "
                             "(width x height)")
        return make_sample(image, mask, self.transform, self.ignore_index, path)


class TFRecordMaskDataModule(MaskDataModule):
    """Segmentation from image + mask shards; ``train_files`` / ``val_files`` are paths or globs (``seg-*.tfrecord``).

    Args:
        train_files, val_files, test_files: shards of each split (``test_files`` defaults to ``val_files``).
        shuffle_buffer, seed: training shuffle (shard order per epoch + a buffer of this many records).
        on_corrupt: ``"raise"`` or ``"skip"`` damaged records (see ``TFRecordDataset``).
        predict_dir: folder of images for ``predict``; default the validation shards (masks not read).
        Other arguments: as ``MaskDataModule`` (``num_classes`` or ``class_names_file`` is required).

    Training splits records across DDP ranks and workers with equal batch counts per rank (padding by
    repetition); indexes beside the shards (``python -m datamodules.tfrecord.index``) give exact epoch
    lengths and record-level balancing.
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
        super().__init__(num_classes, class_names_file, ignore_index, reduce_zero_label, crop_size, scale_range,
                         hflip, color_jitter, predict_dir, batch_size, num_workers, pin_memory)  # fmt: skip
        self.save_hyperparameters()
        self.files: dict[str, str | Sequence[str]] = {"train": train_files, "val": val_files,
                                                      "test": test_files or val_files}
        self.shuffle_buffer, self.seed, self.on_corrupt = shuffle_buffer, seed, on_corrupt

    def build_dataset(self, split: str) -> Dataset:
        if split == "predict" and self.predict_dir is not None:
            return super().build_dataset(split)  # an image folder, read as MaskDataModule reads it
        train = split == "train"
        with_mask = split != "predict"
        decoder = MaskDecoder(self.num_classes, self.ignore_index, self.reduce_zero_label, self.transform(split),
                              with_mask)
        return TFRecordDataset(
            self.files["val" if split == "predict" else split], features=MASK_FEATURES if with_mask else IMAGE_FEATURES,
            decode=decoder, shuffle=train, shuffle_buffer=self.shuffle_buffer, seed=self.seed, uneven="pad",
            batch_size=self.batch_size, on_corrupt=self.on_corrupt,
        )
