"""Detection from TFRecord shards in the TF Object Detection API layout (see :mod:`.convert` for the keys).

Boxes are stored normalised to [0, 1]; they are scaled back by the decoded image's size, so a sample
equals what ``COCODetectionDataModule`` gives for the same image up to float32 rounding of the
normalised coordinates (well under 0.01 px). ``image/object/class/label`` holds label-map ids (COCO
category ids for shards made from COCO); the label map (``label_map.pbtxt``, written by
``tools/make_tfrecords.py``) sorted by id gives the contiguous labels ``0 .. num_classes - 1``, the same
mapping as the COCO DataModule.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..base import BaseDataModule, detection_collate
from ..detection import DetectionDataset, DetectionRecord
from ..transforms import detection_train_transforms, detection_val_transforms
from .convert import read_label_map
from .dataset import TFRecordDataset
from .features import FixedLen, VarLen, normalize_spec

BOX_KEYS = tuple(f"image/object/bbox/{k}" for k in ("xmin", "ymin", "xmax", "ymax"))
DETECTION_FEATURES = normalize_spec({
    "image/encoded": FixedLen((), "bytes"),
    "image/source_id": FixedLen((), "bytes", default=b""),
    "image/height": FixedLen((), "int64", default=0),
    "image/width": FixedLen((), "int64", default=0),
    **{key: VarLen("float") for key in BOX_KEYS},
    "image/object/class/label": VarLen("int64"),
    "image/object/is_crowd": VarLen("int64"),
})


class _OneRecord:
    """A one-record source, so decoding reuses ``DetectionDataset``'s transform and target code unchanged."""

    def __init__(self, record: DetectionRecord) -> None:
        self.record = record

    def __len__(self) -> int:
        return 1

    def load(self, index: int) -> DetectionRecord:
        return self.record


def image_id_of(source_id: bytes) -> int:
    """``image/source_id`` as an int: the number it spells (COCO image ids), else a stable CRC32 of it."""
    text = source_id.decode("utf-8", errors="replace").strip()
    return int(text) if text.lstrip("-").isdigit() else zlib.crc32(source_id)


class DetectionDecoder:
    """Parsed OD API example -> ``(image, target)`` as ``DetectionDataset`` builds them (picklable for workers)."""

    def __init__(self, category_ids: Sequence[int], transform: Callable[..., dict[str, Any]] | None) -> None:
        self.category_ids = list(category_ids)
        self.label_of = {int(cid): label for label, cid in enumerate(self.category_ids)}
        self.transform = transform

    def record(self, example: dict[str, Any]) -> DetectionRecord:
        """``(image (H,W,3) uint8, boxes (N,4) xyxy pixels, labels (N,), iscrowd (N,), image_id)``."""
        with Image.open(io.BytesIO(example["image/encoded"])) as im:
            image = np.asarray(im.convert("RGB"))
        h, w = image.shape[:2]
        stored = (int(example["image/height"]), int(example["image/width"]))
        if stored != (0, 0) and stored != (h, w):
            raise ValueError(f"image/height x image/width say {stored[0]}x{stored[1]} but the image is {h}x{w}")
        columns = [example[k] for k in BOX_KEYS]
        ids = example["image/object/class/label"]
        crowd = example["image/object/is_crowd"]
        if len({len(c) for c in columns} | {len(ids)}) != 1 or len(crowd) not in (0, len(ids)):
            raise ValueError(f"object lists differ in length: {[len(c) for c in columns]} box values, "
                             f"{len(ids)} labels, {len(crowd)} is_crowd flags")
        unknown = sorted(set(ids.tolist()) - set(self.label_of))
        if unknown:
            raise ValueError(f"class ids {unknown} are not in the label map (ids {self.category_ids})")
        boxes = np.stack(columns, axis=1).astype(np.float32) * np.array([w, h, w, h], dtype=np.float32)
        labels = np.array([self.label_of[i] for i in ids.tolist()], dtype=np.int64)
        iscrowd = crowd.astype(np.int64) if len(crowd) else np.zeros(len(ids), np.int64)
        return image, boxes, labels, iscrowd, image_id_of(example["image/source_id"])

    def __call__(self, example: dict[str, Any]) -> Any:
        return DetectionDataset(_OneRecord(self.record(example)), self.transform)[0]


class TFRecordDetectionDataModule(BaseDataModule):
    """Detection from TF OD API shards: ``train_files`` / ``val_files`` are paths or globs (``data/train-*.tfrecord``).

    Args:
        train_files, val_files, test_files: shards of each split (``test_files`` defaults to ``val_files``).
        label_map: ``label_map.pbtxt`` of the class ids in ``image/object/class/label``.
        image_size: longest image side after resizing (aspect ratio kept), as ``COCODetectionDataModule``.
        augment: flip / zoom / colour jitter on the training split.
        shuffle_buffer, seed: training shuffle (shard order per epoch + a buffer of this many records).
        on_corrupt: ``"raise"`` or ``"skip"`` damaged records (see ``TFRecordDataset``).
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.

    Training splits records across DDP ranks and workers with equal batch counts per rank (padding by
    repetition); indexes beside the shards (``python -m datamodules.tfrecord.index``) give exact epoch
    lengths and record-level balancing.
    """

    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str],
        label_map: str,
        test_files: str | list[str] | None = None,
        image_size: int = 800,
        augment: bool = True,
        shuffle_buffer: int = 256,
        seed: int = 0,
        on_corrupt: str = "raise",
        batch_size: int = 2,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.files = {"train": train_files, "val": val_files, "test": test_files or val_files}
        self.label_map = label_map
        self.image_size, self.augment = image_size, augment
        self.shuffle_buffer, self.seed, self.on_corrupt = shuffle_buffer, seed, on_corrupt
        self._labels: tuple[list[int], list[str]] | None = None

    def _label_map(self) -> tuple[list[int], list[str]]:
        if self._labels is None:
            self._labels = read_label_map(self.label_map)
        return self._labels

    @property
    def num_classes(self) -> int:
        """Number of classes in the label map (no background class)."""
        return len(self._label_map()[0])

    @property
    def class_names(self) -> list[str]:
        return list(self._label_map()[1])

    @property
    def category_ids(self) -> list[int]:
        """Label-map id of each contiguous label: ``category_ids[label]``."""
        return list(self._label_map()[0])

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return dict(enumerate(self.category_ids))

    def build_dataset(self, split: str) -> TFRecordDataset:
        train = split == "train"
        transform = (detection_train_transforms if train and self.augment else detection_val_transforms)(self.image_size)
        return TFRecordDataset(
            self.files[split], features=DETECTION_FEATURES, decode=DetectionDecoder(self.category_ids, transform),
            shuffle=train, shuffle_buffer=self.shuffle_buffer, seed=self.seed, uneven="pad",
            batch_size=self.batch_size, on_corrupt=self.on_corrupt,
        )
