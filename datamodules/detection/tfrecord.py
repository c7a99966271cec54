"""Detection as TFRecord shards in the TF Object Detection API layout: the COCO encoder, the decoder, the DataModule.

Besides the ``image/*`` keys (:mod:`datamodules.tfrecord_images`) a record holds
``image/object/bbox/xmin|ymin|xmax|ymax`` normalised to [0, 1] by the (upright) image size,
``image/object/class/label`` (label-map ids, e.g. COCO category ids, as the OD API does),
``image/object/class/text``, ``image/object/is_crowd`` and ``image/object/area`` (the annotation's area in
original pixels, which COCO evaluation's area ranges use; optional). ``tools/make_tfrecords.py coco`` writes them
with ``coco_examples`` and the label map (``label_map.pbtxt``) beside the shards; sorted by id, the label
map gives the contiguous labels ``0 .. num_classes - 1``, the same mapping as the COCO DataModule.

Boxes are scaled back by the decoded image's size and the sample is built by ``detection_sample``, so a
record gives what ``COCODetectionDataModule`` gives for the same image up to float32 rounding of the
normalised coordinates (well under 0.01 px).
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from datamodules.detection.coco import COCODetectionSource
from datamodules.detection.samples import DetectionDataModule, DetectionRecord, detection_sample
from datamodules.tfrecord import (
    TFRecordDataset,
    VarLen,
    build_example,
    bytes_feature,
    float_feature,
    int64_feature,
    normalize_spec,
    read_label_map,
)
from datamodules.tfrecord.example_pb2 import Example
from datamodules.tfrecord_images import IMAGE_FEATURES, decode_image_feature, image_features
from datamodules.tfrecord_shards import TFRecordShards
from datamodules.transforms import AugmentPreset, ResizeMode

BOX_KEYS = tuple(f"image/object/bbox/{k}" for k in ("xmin", "ymin", "xmax", "ymax"))
LABEL_KEY, TEXT_KEY, CROWD_KEY = "image/object/class/label", "image/object/class/text", "image/object/is_crowd"
AREA_KEY = "image/object/area"  # the annotation's area in original pixels (TF OD API key; COCO's segmentation area)
DETECTION_FEATURES = normalize_spec({
    **IMAGE_FEATURES,
    **{key: VarLen("float") for key in BOX_KEYS},
    LABEL_KEY: VarLen("int64"),
    CROWD_KEY: VarLen("int64"),
    AREA_KEY: VarLen("float"),
})


def coco_examples(source: COCODetectionSource) -> Iterator[Example]:
    """One detection Example per image of a parsed COCO json (images kept as their original bytes)."""
    ids = np.asarray(source.category_ids, dtype=np.int64)
    names = [n.encode("utf-8") for n in source.class_names]
    for i in range(len(source)):
        path, image_id = source.files[i], source.image_ids[i]
        try:
            features, height, width = image_features(path, os.path.basename(path), str(image_id))
        except OSError as err:
            raise OSError(f"COCO image {image_id} in {source.annotation_file}: {err}") from err
        source.check_size(i, (height, width))
        boxes, labels = source.boxes[i], source.labels[i]
        yield build_example({
            **features,
            BOX_KEYS[0]: float_feature(boxes[:, 0] / width),
            BOX_KEYS[1]: float_feature(boxes[:, 1] / height),
            BOX_KEYS[2]: float_feature(boxes[:, 2] / width),
            BOX_KEYS[3]: float_feature(boxes[:, 3] / height),
            LABEL_KEY: int64_feature(ids[labels]),
            TEXT_KEY: bytes_feature([names[k] for k in labels]),
            CROWD_KEY: int64_feature(source.iscrowd[i]),
            AREA_KEY: float_feature(source.areas[i]),
        })


def image_id_of(source_id: bytes) -> int:
    """``image/source_id`` as an int: the number it spells (COCO image ids), else a stable CRC32 of it."""
    text = source_id.decode("utf-8", errors="replace").strip()
    return int(text) if text.lstrip("-").isdigit() else zlib.crc32(source_id)


class DetectionDecoder:
    """Parsed OD API example -> ``(image, target)`` of ``detection_sample`` (picklable for workers)."""

    def __init__(self, category_ids: Sequence[int], transform: Callable[..., dict[str, Any]] | None) -> None:
        self.category_ids = list(category_ids)
        self.label_of = {int(cid): label for label, cid in enumerate(self.category_ids)}
        self.transform = transform

    def record(self, example: dict[str, Any]) -> DetectionRecord:
        """``(image (H,W,3) uint8, boxes (N,4) xyxy pixels, labels (N,), iscrowd (N,), image_id, area (N,) | None)``."""
        image = decode_image_feature(example)
        h, w = image.shape[:2]
        columns = [example[k] for k in BOX_KEYS]
        ids = example[LABEL_KEY]
        crowd, area = example[CROWD_KEY], example[AREA_KEY]
        if len({len(c) for c in columns} | {len(ids)}) != 1 or len(crowd) not in (0, len(ids)) or \
                len(area) not in (0, len(ids)):
            raise ValueError(f"object lists differ in length: {[len(c) for c in columns]} box values, "
                             f"{len(ids)} labels, {len(crowd)} is_crowd flags, {len(area)} areas")
        unknown = sorted(set(ids.tolist()) - set(self.label_of))
        if unknown:
            raise ValueError(f"class ids {unknown} are not in the label map (ids {self.category_ids})")
        boxes = np.stack(columns, axis=1).astype(np.float32) * np.array([w, h, w, h], dtype=np.float32)
        labels = np.array([self.label_of[i] for i in ids.tolist()], dtype=np.int64)
        iscrowd = crowd.astype(np.int64) if len(crowd) else np.zeros(len(ids), np.int64)
        return image, boxes, labels, iscrowd, image_id_of(example["image/source_id"]), area if len(area) else None

    def __call__(self, example: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return detection_sample(*self.record(example), self.transform)


class TFRecordDetectionDataModule(DetectionDataModule):
    """Detection from TF OD API shards: ``train_files`` / ``val_files`` are paths or globs (``data/train-*.tfrecord``).

    Args:
        train_files, val_files, test_files: shards of each split (``test_files`` defaults to ``val_files``).
        label_map: ``label_map.pbtxt`` of the class ids in ``image/object/class/label``.
        image_size, augment, resize, max_size, train_scales: resizing and training augmentation, as
            ``COCODetectionDataModule``.
        shuffle_buffer, seed: training shuffle (shard order per epoch + a buffer of this many records).
        on_corrupt: ``"raise"`` or ``"skip"`` damaged records (see ``TFRecordDataset``).
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.

    The shard arguments and how each split is read: :mod:`datamodules.tfrecord_shards`.
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str],
        label_map: str,
        test_files: str | list[str] | None = None,
        image_size: int = 800,
        augment: bool | AugmentPreset = True,
        shuffle_buffer: int = 256,
        seed: int = 0,
        on_corrupt: str = "raise",
        batch_size: int = 2,
        num_workers: int = 2,
        pin_memory: bool = False,
        resize: ResizeMode = "longest",
        max_size: int | None = None,
        train_scales: list[int] | None = None,
    ) -> None:
        super().__init__(image_size=image_size, augment=augment, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, resize=resize, max_size=max_size, train_scales=train_scales)
        self.save_hyperparameters()
        self.shards = TFRecordShards.of_splits(train_files=train_files, val_files=val_files, test_files=test_files,
                                               shuffle_buffer=shuffle_buffer, seed=seed, on_corrupt=on_corrupt)
        self.label_map = label_map
        self._labels: tuple[list[int], list[str]] | None = None

    def classes(self) -> tuple[list[int], list[str]]:
        """Ids and names of the label map file, read once."""
        if self._labels is None:
            self._labels = read_label_map(self.label_map)
        return self._labels

    def build_dataset(self, split: str) -> TFRecordDataset:
        return self.shards.dataset(split, features=DETECTION_FEATURES,
                                   decode=DetectionDecoder(self.category_ids, self.transform(split)),
                                   batch_size=self.batch_size)
