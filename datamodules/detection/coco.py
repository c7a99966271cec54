"""COCO-format object detection: an instances json plus a folder of images.

Labels are contiguous: category ids sorted ascending map to ``0 .. num_classes - 1`` (no background
class), and ``category_ids[label]`` maps a prediction back to the json's id. Crowd regions are kept
with ``iscrowd = 1`` (detection losses ignore them; COCO evaluation needs them), and images with no
annotation are kept (they are negatives).

The json is checked when it is read, so a broken file fails before training starts, with a message
naming the file, the record and the problem. Boxes with zero width or height are normal in COCO
exports (degenerate polygons) and are dropped silently; negative sizes are errors.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from datamodules.detection.samples import DetectionDataModule, DetectionDataset, DetectionRecord
from datamodules.images import decode_image
from datamodules.transforms import AugmentPreset, ResizeMode


def _record_name(kind: str, record: dict[str, Any], position: int) -> str:
    """``"annotation 17"`` when the record has an id, else ``"annotation #3 (no 'id')"``."""
    if isinstance(record, dict) and "id" in record:
        return f"{kind} {record['id']}"
    return f"{kind} #{position} (no 'id')"


def _require(record: Any, keys: tuple[str, ...], where: str) -> None:
    """Raise naming ``where`` if ``record`` is not a dict holding every key."""
    if not isinstance(record, dict):
        raise ValueError(f"COCO {where}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"COCO {where}: missing key(s) {missing}")


class COCODetectionSource:
    """Parsed and checked COCO instances json; ``load(i)`` returns image ``i`` and its boxes.

    Args:
        annotation_file: path of the instances json.
        image_dir: folder the images' ``file_name`` entries are relative to.
        check_files: check at parse time that every image file exists (one ``os.path.exists`` each).

    Attributes:
        category_ids: json category id of each contiguous label.
        class_names: category name of each label.
        image_ids: json image id of each record, in json order.
    """

    def __init__(self, annotation_file: str, image_dir: str, check_files: bool = True) -> None:
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        name = annotation_file
        if not os.path.isfile(annotation_file):
            raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
        try:
            with open(annotation_file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"COCO annotation file {name} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"COCO annotation file {name}: expected a JSON object at the top level")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"COCO annotation file {name}: missing list '{key}'")
        annotations = data.get("annotations", [])  # image-info files (test-dev) have none
        if not isinstance(annotations, list):
            raise ValueError(f"COCO annotation file {name}: 'annotations' must be a list")

        # Categories -> contiguous labels, ordered by id so the mapping does not depend on json order.
        names: dict[int, str] = {}
        for pos, cat in enumerate(data["categories"]):
            where = f"{_record_name('category', cat, pos)} in {name}"
            _require(cat, ("id",), where)
            cid = cat["id"]
            if not isinstance(cid, int) or isinstance(cid, bool):
                raise ValueError(f"COCO {where}: id must be an integer, got {cid!r}")
            if cid in names:
                raise ValueError(f"COCO {where}: duplicate category id {cid}")
            names[cid] = str(cat.get("name", cid))
        self.category_ids: list[int] = sorted(names)
        self.class_names: list[str] = [names[c] for c in self.category_ids]
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}

        # Images.
        self.image_ids: list[int] = []
        self.files: list[str] = []
        self.sizes: list[tuple[int, int] | None] = []  # (h, w) from the json, checked when loaded
        index_of: dict[int, int] = {}
        for pos, img in enumerate(data["images"]):
            where = f"{_record_name('image', img, pos)} in {name}"
            _require(img, ("id", "file_name"), where)
            iid = img["id"]
            if not isinstance(iid, int) or isinstance(iid, bool):
                raise ValueError(f"COCO {where}: id must be an integer, got {iid!r}")
            if iid in index_of:
                raise ValueError(f"COCO {where}: duplicate image id {iid}")
            index_of[iid] = len(self.image_ids)
            self.image_ids.append(iid)
            path = os.path.join(image_dir, img["file_name"])
            if check_files and not os.path.exists(path):
                raise FileNotFoundError(f"COCO image {iid} in {name}: image file not found: {path}")
            self.files.append(path)
            h, w = img.get("height"), img.get("width")
            self.sizes.append((int(h), int(w)) if h is not None and w is not None else None)

        # Annotations, grouped per image.
        per_image: list[list[tuple[list[float], int, int, float]]] = [[] for _ in self.image_ids]
        for pos, ann in enumerate(annotations):
            where = f"{_record_name('annotation', ann, pos)} in {name}"
            _require(ann, ("image_id", "category_id", "bbox"), where)
            if ann["image_id"] not in index_of:
                raise ValueError(f"COCO {where}: image_id {ann['image_id']} is not in 'images'")
            if ann["category_id"] not in label_of:
                raise ValueError(f"COCO {where}: category_id {ann['category_id']} is not in 'categories'")
            bbox = ann["bbox"]
            if (
                not isinstance(bbox, (list, tuple))
                or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            ):
                raise ValueError(f"COCO {where}: bbox must be 4 numbers [x, y, width, height], got {bbox!r}")
            if not all(math.isfinite(v) for v in bbox):
                raise ValueError(f"COCO {where}: bbox {bbox} has a non-finite value")
            if bbox[2] < 0:
                raise ValueError(f"COCO {where}: bbox {bbox} has negative width")
            if bbox[3] < 0:
                raise ValueError(f"COCO {where}: bbox {bbox} has negative height")
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1):
                raise ValueError(f"COCO {where}: iscrowd must be 0 or 1, got {crowd!r}")
            area = ann.get("area", 0.0)
            if not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area) or area < 0:
                raise ValueError(f"COCO {where}: area must be a non-negative number, got {area!r}")
            if bbox[2] == 0 or bbox[3] == 0:
                continue  # degenerate boxes are common in exports and mark nothing to detect
            x, y, w, h = (float(v) for v in bbox)
            record = ([x, y, x + w, y + h], label_of[ann["category_id"]], int(crowd), float(area))
            per_image[index_of[ann["image_id"]]].append(record)

        self.boxes: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.iscrowd: list[np.ndarray] = []
        self.areas: list[np.ndarray] = []  # the annotations' own areas (0: none given), for COCO's area ranges
        for anns in per_image:
            self.boxes.append(np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4))
            self.labels.append(np.array([a[1] for a in anns], dtype=np.int64))
            self.iscrowd.append(np.array([a[2] for a in anns], dtype=np.int64))
            self.areas.append(np.array([a[3] for a in anns], dtype=np.float32))

    @property
    def num_classes(self) -> int:
        """Number of categories (no background class)."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def check_size(self, index: int, size: tuple[int, int]) -> None:
        """Raise unless ``size`` (h, w), of the image as displayed, is the json's ``height``/``width`` (when given).

        COCO's sizes are of the displayed image, so they are compared after the EXIF orientation is applied.
        """
        expected = self.sizes[index]
        if expected is not None and expected != tuple(size):
            raise ValueError(
                f"COCO image {self.image_ids[index]} in {self.annotation_file}: {self.files[index]} is "
                f"{size[0]}x{size[1]} (h x w, upright by its EXIF orientation) but the json says "
                f"{expected[0]}x{expected[1]}; the boxes would not match the pixels"
            )

    def load(self, index: int) -> DetectionRecord:
        """``(image (H,W,3) uint8 RGB, boxes (N,4) xyxy, labels (N,), iscrowd (N,), image_id)`` of record ``index``."""
        path = self.files[index]
        iid = self.image_ids[index]
        try:
            image = decode_image(path)
        except OSError as e:
            raise OSError(f"COCO image {iid} in {self.annotation_file}: {e}") from e
        self.check_size(index, image.shape[:2])
        return (image, self.boxes[index].copy(), self.labels[index].copy(), self.iscrowd[index].copy(), iid,
                self.areas[index].copy())


class COCODetectionDataModule(DetectionDataModule):
    """COCO-format detection from ``root`` (an instances json + image folder per split).

    Paths are relative to ``root`` unless absolute. The label set comes from the validation json
    (read on first use of ``num_classes``, which the CLI links into the task); the training json
    must list the same categories. ``test`` uses ``test_annotations``/``test_images`` when given
    (images default to the validation folder), else the validation split; ``predict`` uses the
    validation split.

    Args:
        root: dataset folder.
        train_annotations, val_annotations, test_annotations: instances json of each split.
        train_images, val_images, test_images: image folder of each split.
        image_size: the longest side (``resize="longest"``) or the shorter side (``resize="shorter"``) after
            resizing (aspect ratio kept).
        augment: training augmentation: ``"flip"`` (the FCOS / VFNet recipe), ``"jitter"`` (= true: flip, zoom,
            colour), ``"detr"`` (DETR's multi-scale resize and random crop) or ``"none"`` (= false); see
            ``datamodules.transforms.detection_train_transforms``.
        check_files: check that every image file exists when a json is read.
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.
        resize: ``"longest"`` or ``"shorter"`` (the COCO recipes: shorter side 800, longer side <= ``max_size``
            1333, so a 640x480 image becomes 1067x800).
        max_size: cap on the longer side with ``resize="shorter"`` (None: no cap).
        train_scales: training sizes drawn per image (multi-scale training, e.g. [640, 672, ..., 800]); None:
            ``image_size``.
    """

    def __init__(
        self,
        root: str,
        train_annotations: str = "annotations/instances_train2017.json",
        val_annotations: str = "annotations/instances_val2017.json",
        train_images: str = "train2017",
        val_images: str = "val2017",
        test_annotations: str | None = None,
        test_images: str | None = None,
        image_size: int = 800,
        augment: bool | AugmentPreset = True,
        check_files: bool = True,
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
        self.root = root
        self.check_files = check_files
        if test_annotations is None:
            test_annotations, test_images = val_annotations, val_images
        self.splits = {
            "train": (train_annotations, train_images),
            "val": (val_annotations, val_images),
            "test": (test_annotations, test_images or val_images),
        }
        self._sources: dict[str, COCODetectionSource] = {}

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path)  # an absolute ``path`` is kept as is by os.path.join

    def source(self, split: str) -> COCODetectionSource:
        """The parsed json of ``split`` ("train", "val" or "test"), read once and cached."""
        if split not in self._sources:
            if split != "val" and self.splits[split] == self.splits["val"]:
                return self.source("val")  # same files: parse once
            ann, images = self.splits[split]
            src = COCODetectionSource(self._path(ann), self._path(images), check_files=self.check_files)
            if split != "val":
                self._check_same_categories(src, self.source("val"))
            self._sources[split] = src
        return self._sources[split]

    @staticmethod
    def _check_same_categories(src: COCODetectionSource, ref: COCODetectionSource) -> None:
        """Labels must mean the same thing in every split; mismatched category lists are an error."""
        a = dict(zip(src.category_ids, src.class_names))
        b = dict(zip(ref.category_ids, ref.class_names))
        if a != b:
            only_a = sorted(set(a.items()) - set(b.items()))
            only_b = sorted(set(b.items()) - set(a.items()))
            raise ValueError(
                f"COCO categories differ between {src.annotation_file} and {ref.annotation_file}: "
                f"only in the first {only_a[:10]}, only in the second {only_b[:10]} (as (id, name))"
            )

    def classes(self) -> tuple[list[int], list[str]]:
        """Category ids (sorted) and names of the validation json (the CLI links ``num_classes`` from it)."""
        source = self.source("val")
        return source.category_ids, source.class_names

    def build_dataset(self, split: str) -> DetectionDataset:
        """Parse the split's json (train augmented when ``augment``)."""
        return DetectionDataset(self.source(split), self.transform(split))
