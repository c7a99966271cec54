"""Object detection on the synthetic shapes: the built-in dataset behind ``make demo``."""

from __future__ import annotations

from datamodules.detection.samples import DetectionDataModule, DetectionDataset, DetectionRecord
from datamodules.transforms import AugmentPreset
from datamodules.synthetic.shapes import SHAPE_CLASSES, SIZE_RANGE, render_shapes


def split_seed(seed: int, split: str) -> int:
    """Seed stream of a split: even for train, odd for validation, so the splits never share an image."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return 2 * seed + (split == "val")


class ShapesSource:
    """Detection source over ``render_shapes``: image ``i`` is ``render_shapes(i, seed, ...)``, rendered on demand."""

    def __init__(self, num_images: int, seed: int = 0, image_size: int = 256, max_objects: int = 6,
                 size_range: tuple[float, float] = SIZE_RANGE) -> None:
        if num_images < 0:
            raise ValueError(f"ShapesSource: num_images must be >= 0, got {num_images}")
        self.num_images = num_images
        self.seed = seed
        self.image_size = image_size
        self.max_objects = max_objects
        self.size_range = tuple(size_range)

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> DetectionRecord:
        """``(image, boxes, labels, iscrowd, image_id, area)`` of image ``index`` (no crowd regions; box areas)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"ShapesSource: index {index} out of range [0, {self.num_images})")
        s = render_shapes(index, seed=self.seed, image_size=self.image_size, max_objects=self.max_objects,
                          size_range=self.size_range)
        iscrowd = s["labels"] * 0
        return s["image"], s["boxes"], s["labels"], iscrowd, index, None


class ShapesDetectionDataModule(DetectionDataModule):
    """Synthetic shapes detection (``num_classes = len(SHAPE_CLASSES)``, no background class).

    Images are generated on the fly from ``(seed, index)``, so there is nothing to download or cache.
    Train and validation use different seed streams (``split_seed``); test and predict reuse the
    validation split.

    Args:
        num_train: images per training epoch.
        num_val: images in the validation (= test = predict) split.
        image_size: side of the square images.
        max_objects: up to this many shapes per image before occlusion removes any.
        size_range: (min, max) shape diameter as a fraction of the image side (default 0.07-0.6, spanning
            COCO small to large).
        seed: picks the pair of train/val streams.
        augment: training augmentation preset (``datamodules.transforms.detection_train_transforms``): true =
            ``"jitter"`` (flip / zoom / colour jitter), ``"flip"``, false = ``"none"``.
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 200,
        image_size: int = 256,
        max_objects: int = 6,
        size_range: tuple[float, float] = SIZE_RANGE,
        seed: int = 0,
        augment: bool | AugmentPreset = True,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size=image_size, augment=augment, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        self.save_hyperparameters()
        self.num_train = num_train
        self.num_val = num_val
        self.max_objects = max_objects
        self.size_range = tuple(size_range)
        self.seed = seed

    def classes(self) -> tuple[list[int], list[str]]:
        """One class per shape, ids ``0 .. len(SHAPE_CLASSES) - 1`` (the labels themselves)."""
        return list(range(len(SHAPE_CLASSES))), list(SHAPE_CLASSES)

    def build_dataset(self, split: str) -> DetectionDataset:
        """Train: the augmented train stream; val and test: the validation stream."""
        stream = "train" if split == "train" else "val"
        count = self.num_train if split == "train" else self.num_val
        source = ShapesSource(count, seed=split_seed(self.seed, stream), image_size=self.image_size,
                              max_objects=self.max_objects, size_range=self.size_range)
        return DetectionDataset(source, self.transform(split))
