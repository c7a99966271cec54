"""Semantic segmentation on the synthetic shapes: the built-in dataset behind the segmentation demo.

Class 0 is background and class ``k + 1`` is shape class ``k`` (``render_shapes(...)["semantic"]``), so
``num_classes = len(SHAPE_CLASSES) + 1``. Every pixel is labelled; ``ignore_index`` only appears where the
training augmentation pads.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch.utils.data import Dataset

from datamodules.base import BaseDataModule
from datamodules.segmentation.samples import (
    check_ignore_index,
    segmentation_collate,
    segmentation_eval_transforms,
    segmentation_sample,
    segmentation_train_transforms,
)
from datamodules.synthetic.shapes import SHAPE_CLASSES, render_shapes
from datamodules.synthetic.shapes_detection import split_seed


class ShapesSegmentationDataset(Dataset):
    """Image ``i`` and its semantic mask, rendered on demand from ``(seed, i)``, as ``segmentation_sample`` packs them."""

    def __init__(
        self, num_images: int, *, seed: int, image_size: int, max_objects: int, transform: Callable[..., dict],
        ignore_index: int = 255,
    ) -> None:
        if num_images < 0:
            raise ValueError(f"ShapesSegmentationDataset: num_images must be >= 0, got {num_images}")
        self.num_images = num_images
        self.seed = seed
        self.image_size = image_size
        self.max_objects = max_objects
        self.transform = transform
        self.ignore_index = ignore_index
        self.with_masks = True

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"ShapesSegmentationDataset: index {index} out of range [0, {self.num_images})")
        s = render_shapes(index, seed=self.seed, image_size=self.image_size, max_objects=self.max_objects)
        mask = s["semantic"] if self.with_masks else None
        name = f"shapes_{self.seed}_{index:06d}.png"
        return segmentation_sample(s["image"], mask, self.transform, self.ignore_index, name)


class ShapesSegmentationDataModule(BaseDataModule):
    """Synthetic shapes semantic segmentation (``num_classes = len(SHAPE_CLASSES) + 1``, 0 = background).

    Train and validation use different seed streams (``split_seed``); test and predict reuse the
    validation split (predict without masks).

    Args:
        num_train: images per training epoch.
        num_val: images in the validation (= test = predict) split.
        image_size: side of the square images.
        max_objects: up to this many shapes per image.
        seed: picks the pair of train/val streams.
        augment: random scale/crop (padding marked ``ignore_index``), flip and colour jitter when training.
        scale_range: random rescale range of the training augmentation.
        ignore_index: label of padded pixels.
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.
    """

    predict_split = "predict"

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 200,
        image_size: int = 128,
        max_objects: int = 6,
        seed: int = 0,
        augment: bool = True,
        scale_range: tuple[float, float] = (0.75, 1.5),
        ignore_index: int = 255,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        check_ignore_index(ignore_index, len(SHAPE_CLASSES) + 1)
        self.save_hyperparameters()
        self.num_train = num_train
        self.num_val = num_val
        self.image_size = image_size
        self.max_objects = max_objects
        self.seed = seed
        self.augment = augment
        self.scale_range = tuple(scale_range)
        self.ignore_index = ignore_index
        self.collate_fn = functools.partial(segmentation_collate, ignore_index=self.ignore_index)

    @property
    def num_classes(self) -> int:
        """Background plus one class per shape."""
        return len(SHAPE_CLASSES) + 1

    @property
    def class_names(self) -> list[str]:
        """Name of each class id."""
        return ["background", *SHAPE_CLASSES]

    def build_dataset(self, split: str) -> ShapesSegmentationDataset:
        train = split == "train"
        if train and self.augment:
            transform = segmentation_train_transforms(self.image_size, ignore_index=self.ignore_index,
                                                      scale_range=self.scale_range)
        else:
            transform = segmentation_eval_transforms()
        seed = split_seed(self.seed, "train" if train else "val")
        dataset = ShapesSegmentationDataset(
            self.num_train if train else self.num_val, seed=seed, image_size=self.image_size,
            max_objects=self.max_objects, transform=transform, ignore_index=self.ignore_index,
        )
        dataset.with_masks = split != "predict"
        return dataset

