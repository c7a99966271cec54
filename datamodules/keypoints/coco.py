"""COCO-format keypoints, top-down: one sample per person box, cropped (and augmented) as the RLE recipe.

A split is a ``person_keypoints_*.json`` (any COCO-format keypoint dataset) plus its image folder. The keypoint
category (the one with a ``keypoints`` list; ``category_id`` picks one when there are several) gives K, the
keypoint names, the skeleton (1-based in the json) and, from the ``left_*`` / ``right_*`` names, the mirror
permutation used by flips; the config gives whatever the json lacks (``keypoint_names``, ``skeleton``,
``flip_pairs``). OKS sigmas come from the config (``oks_sigmas``; None = COCO's 17, which the task fills in).

Samples (as the official RLE reader ``rlepose/datasets/mscoco.py`` and mmpose 1.x's ``CocoDataset``):

* training: every annotation of the keypoint category with ``iscrowd = 0`` and at least one labelled
  keypoint (v > 0); crowd regions and people without keypoints are skipped. The box is clipped to the image
  (``x0 = clip(x, 0, w - 1)``, ``x1 = clip(x + w, 0, w - 1)``, mmpose 1.x) when the json gives the image size;
  a box with no extent left is an error naming the file, the annotation id and the box (the references
  drop it silently);
* evaluation on ground-truth boxes (the default): the same instances, unaugmented;
* evaluation on detector boxes (``val_detections`` / ``test_detections``: a COCO detection results json,
  e.g. ``COCO_val2017_detections_AP_H_56_person.json``): one sample per detection of the keypoint category
  with ``score >= detection_score_threshold``, without ground-truth keypoints; the task then runs OKS NMS.

Every annotation of the category -- crowd ones and those without keypoints included, pycocotools needs them
to ignore matches -- travels in exactly one sample of its split (the first sample of its image, or, for an
image without any sample, another sample), in the batch's ``gt`` dict; so KeypointAP sees the whole ground
truth once however the samples are split over batches and processes.

Batches (:func:`topdown_collate`) are dicts: ``image`` ``(B, 3, H, W)`` float32 in [0, 1]; ``keypoints``
``(B, K, 3)`` crop pixels ``(x, y, v)`` (zeros for detector boxes); ``keypoints_image`` ``(B, K, 3)`` the same
in image pixels; ``matrix_inv`` ``(B, 2, 3)`` float64 crop -> image map; ``box`` ``(B, 4)`` float64 xyxy image
pixels (the clipped box the crop was cut from); ``box_score`` ``(B,)`` (1 for ground-truth boxes);
``image_id``, ``id`` (annotation id, -1 for a detector box), ``category_id`` ``(B,)`` int64; ``area`` ``(B,)``
float64 (annotation area; box area for detector boxes); ``crop_area`` ``(B,)`` area of the crop region (OKS
NMS uses it, as the references); ``from_detector`` ``(B,)`` bool; ``gt`` a dict of the carried annotations
(``keypoints`` ``(M, K, 3)``, ``boxes`` ``(M, 4)`` xyxy, ``area``, ``image_id``, ``id``, ``iscrowd`` ``(M,)``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from datamodules.base import BaseDataModule
from datamodules.detection.coco import _record_name, _require
from datamodules.images import decode_image
from datamodules.keypoints.geometry import (
    COCO_KEYPOINT_NAMES,
    COCO_UPPER_BODY_IDS,
    DEFAULT_INPUT_SIZE,
    TopDownAffine,
    flip_index_from_names,
    validate_box_xywh,
    validate_keypoints,
)
from datamodules.keypoints.topdown import PersonBox, TopDownDataset, topdown_collate


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_json(path: str, kind: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO {kind} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"COCO {kind} file {path} is not valid JSON: {e}") from e


def clip_box_xywh(box: np.ndarray, size: tuple[int, int] | None, where: str) -> np.ndarray:
    """Clip a person box ``[x, y, w, h]`` to an image of ``size = (h, w)`` as mmpose 1.x; raise if nothing is left."""
    box = validate_box_xywh(box, where)
    if size is None:
        return box
    h, w = size
    x0, x1 = np.clip([box[0], box[0] + box[2]], 0, w - 1)
    y0, y1 = np.clip([box[1], box[1] + box[3]], 0, h - 1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: bbox {box.tolist()} has no extent inside the {w}x{h} (w x h) image; a top-down "
                         f"crop needs a box with an extent")
    return np.array([x0, y0, x1 - x0, y1 - y0])


@dataclass
class KeypointCategory:
    """The keypoint category of a json: ``id``, ``name``, keypoint ``names`` and a 0-based ``skeleton``."""

    id: int
    name: str
    names: list[str] | None
    skeleton: list[list[int]] | None


def keypoint_category(categories: list, where: str, category_id: int | None = None) -> KeypointCategory:
    """The category whose keypoints are annotated (the only one with a ``keypoints`` list, or ``category_id``).

    A json whose categories carry no ``keypoints`` list (a plain instances file re-used for keypoints) needs
    ``category_id``; names then come from the config.
    """
    chosen = None
    with_keypoints = []
    for pos, cat in enumerate(categories):
        name = f"{_record_name('category', cat, pos)} in {where}"
        _require(cat, ("id",), name)
        if category_id is not None and cat["id"] == category_id:
            chosen = cat
        if isinstance(cat.get("keypoints"), list):
            with_keypoints.append(cat)
    if category_id is not None and chosen is None:
        raise ValueError(f"COCO {where}: no category with id {category_id} (ids: {[c['id'] for c in categories]})")
    if chosen is None:
        if len(with_keypoints) != 1:
            raise ValueError(f"COCO {where}: {len(with_keypoints)} categories have a 'keypoints' list "
                             f"({[c['id'] for c in with_keypoints]}); name the keypoint category with "
                             "--data.category_id")
        chosen = with_keypoints[0]
    cid = chosen["id"]
    names = chosen.get("keypoints")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names):
        raise ValueError(f"COCO category {cid} in {where}: 'keypoints' must be a non-empty list of names, "
                         f"got {names!r:.200}")
    skeleton = chosen.get("skeleton")
    if skeleton is not None:
        k = len(names) if names else None
        if not isinstance(skeleton, list) or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(i, int) and 1 <= i <= (k or i) for i in e)
                for e in skeleton):
            raise ValueError(f"COCO category {cid} in {where}: 'skeleton' must be 1-based [a, b] keypoint pairs"
                             f"{f' within 1..{k}' if k else ''}, got {skeleton!r:.200}")
        skeleton = [[a - 1, b - 1] for a, b in skeleton]
    return KeypointCategory(cid, str(chosen.get("name", cid)), list(names) if names else None, skeleton)


class COCOKeypointSource:
    """A parsed and checked COCO keypoint json: images, the keypoint category and its annotations.

    Args:
        annotation_file: path of the json.
        image_dir: folder the images' ``file_name`` entries are relative to.
        num_keypoints: K when the json's category has no ``keypoints`` names (else taken from them).
        category_id: the keypoint category (None: the only category with a ``keypoints`` list).
        check_files: check at parse time that every image file exists.

    Attributes:
        category: :class:`KeypointCategory`.
        image_ids, files, sizes: per image (json order); ``sizes`` ``(h, w)`` or None.
        ann_ids ``(M,)``, ann_image ``(M,)`` image index, keypoints ``(M, K, 3)`` float32, boxes_xywh ``(M, 4)``
        (as in the json), area ``(M,)``, iscrowd ``(M,)``: every annotation of the category.
        instances: indices of the annotations a pose is trained / evaluated on (not crowd, >= 1 labelled
        keypoint), and ``instance_boxes`` their clipped ``[x, y, w, h]`` boxes.
    """

    def __init__(self, annotation_file: str, image_dir: str, num_keypoints: int | None = None,
                 category_id: int | None = None, check_files: bool = True) -> None:
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        name = annotation_file
        data = _load_json(annotation_file, "annotation")
        if not isinstance(data, dict):
            raise ValueError(f"COCO annotation file {name}: expected a JSON object at the top level")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"COCO annotation file {name}: missing list '{key}'")
        annotations = data.get("annotations", [])  # image-info files (test-dev) have none
        if not isinstance(annotations, list):
            raise ValueError(f"COCO annotation file {name}: 'annotations' must be a list")
        self.category = keypoint_category(data["categories"], name, category_id)
        k = len(self.category.names) if self.category.names else num_keypoints
        if k is None:
            raise ValueError(f"COCO category {self.category.id} in {name} has no 'keypoints' names: give them with "
                             "--data.keypoint_names")
        if num_keypoints is not None and k != num_keypoints:
            raise ValueError(f"COCO category {self.category.id} in {name} has {k} keypoints, the config "
                             f"{num_keypoints}")
        self.num_keypoints = k

        self.image_ids: list[int] = []
        self.files: list[str] = []
        self.sizes: list[tuple[int, int] | None] = []
        self.index_of: dict[int, int] = {}
        for pos, img in enumerate(data["images"]):
            where = f"{_record_name('image', img, pos)} in {name}"
            _require(img, ("id", "file_name"), where)
            iid = img["id"]
            if not isinstance(iid, int) or isinstance(iid, bool):
                raise ValueError(f"COCO {where}: id must be an integer, got {iid!r}")
            if iid in self.index_of:
                raise ValueError(f"COCO {where}: duplicate image id {iid}")
            self.index_of[iid] = len(self.image_ids)
            self.image_ids.append(iid)
            path = os.path.join(image_dir, img["file_name"])
            if check_files and not os.path.exists(path):
                raise FileNotFoundError(f"COCO image {iid} in {name}: image file not found: {path}")
            self.files.append(path)
            h, w = img.get("height"), img.get("width")
            self.sizes.append((int(h), int(w)) if h is not None and w is not None else None)

        ids, image, kpts, boxes, areas, crowd = [], [], [], [], [], []
        self.instances: list[int] = []
        self.instance_boxes: list[np.ndarray] = []
        seen: set[int] = set()
        for pos, ann in enumerate(annotations):
            where = f"{_record_name('annotation', ann, pos)} in {name}"
            _require(ann, ("id", "image_id", "category_id"), f"{where}")
            if ann["category_id"] != self.category.id:
                continue  # other categories of a multi-category file
            _require(ann, ("bbox", "keypoints"), where)
            aid = ann["id"]
            if not isinstance(aid, int) or isinstance(aid, bool):
                raise ValueError(f"COCO {where}: id must be an integer, got {aid!r}")
            if aid in seen:
                raise ValueError(f"COCO {where}: duplicate annotation id {aid}")
            seen.add(aid)
            if ann["image_id"] not in self.index_of:
                raise ValueError(f"COCO {where}: image_id {ann['image_id']} is not in 'images'")
            keypoints = validate_keypoints(ann["keypoints"], k, f"COCO {where}")
            bbox = ann["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_number(v) for v in bbox):
                raise ValueError(f"COCO {where}: bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}")
            if bbox[2] < 0 or bbox[3] < 0:
                raise ValueError(f"COCO {where}: bbox {bbox} has a negative width or height")
            iscrowd = ann.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                raise ValueError(f"COCO {where}: iscrowd must be 0 or 1, got {iscrowd!r}")
            area = ann.get("area", float(bbox[2]) * float(bbox[3]))
            if not _number(area) or area < 0:
                raise ValueError(f"COCO {where}: area must be a finite number >= 0, got {area!r}")
            index = self.index_of[ann["image_id"]]
            if not iscrowd and (keypoints[:, 2] > 0).any():
                self.instance_boxes.append(clip_box_xywh(np.asarray(bbox, dtype=np.float64), self.sizes[index],
                                                         f"COCO {where}"))
                self.instances.append(len(ids))
            ids.append(aid)
            image.append(index)
            kpts.append(keypoints)
            boxes.append([float(v) for v in bbox])
            areas.append(float(area))
            crowd.append(int(iscrowd))
        self.ann_ids = np.asarray(ids, dtype=np.int64)
        self.ann_image = np.asarray(image, dtype=np.int64)
        self.keypoints = np.asarray(kpts, dtype=np.float32).reshape(-1, k, 3)
        self.boxes_xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.area = np.asarray(areas, dtype=np.float64)
        self.iscrowd = np.asarray(crowd, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, index: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of image ``index``, checked against the json's size."""
        iid = self.image_ids[index]
        try:
            image = decode_image(self.files[index])
        except OSError as e:
            raise OSError(f"COCO image {iid} in {self.annotation_file}: {e}") from e
        expected = self.sizes[index]
        if expected is not None and expected != tuple(image.shape[:2]):
            raise ValueError(f"COCO image {iid} in {self.annotation_file}: {self.files[index]} is {image.shape[0]}x"
                             f"{image.shape[1]} (h x w, upright by its EXIF orientation) but the json says "
                             f"{expected[0]}x{expected[1]}; the keypoints would not match the pixels")
        return image


def read_detections(path: str, source: COCOKeypointSource, score_threshold: float = 0.0) -> list[PersonBox]:
    """Person boxes of a COCO detection results json (``[{"image_id", "category_id", "bbox", "score"}, ...]``).

    Keeps the detections of the source's keypoint category with ``score >= score_threshold``; an image id that
    is not in the annotation file, a malformed record or a box without extent is an error naming the record.
    """
    records = _load_json(path, "detection results")
    if not isinstance(records, list):
        raise ValueError(f"COCO detection results {path}: expected a JSON list of detections")
    boxes = []
    for pos, det in enumerate(records):
        where = f"COCO detection #{pos} in {path}"
        _require(det, ("image_id", "category_id", "bbox", "score"), f"detection #{pos} in {path}")
        if det["category_id"] != source.category.id:
            continue
        if det["image_id"] not in source.index_of:
            raise ValueError(f"{where}: image_id {det['image_id']} is not in {source.annotation_file}")
        if not _number(det["score"]):
            raise ValueError(f"{where}: score must be a finite number, got {det['score']!r}")
        if det["score"] < score_threshold:
            continue
        index = source.index_of[det["image_id"]]
        box = clip_box_xywh(det["bbox"], source.sizes[index], where)
        boxes.append(PersonBox(index, box, float(det["score"]), -1))
    return boxes


class COCOKeypointDataModule(BaseDataModule):
    """Top-down COCO-format keypoints from ``root`` (a keypoint json + image folder per split).

    Paths are relative to ``root`` unless absolute. ``test`` uses ``test_annotations`` / ``test_images`` when
    given (images default to the validation folder), else the validation split; ``predict`` reads the test
    split (point it at e.g. ``image_info_test-dev2017.json`` with ``test_detections`` to predict test-dev).
    The category (names, skeleton, flip pairs) comes from the validation json unless the config gives it.

    Args:
        root: dataset folder.
        train_annotations, val_annotations, test_annotations: keypoint json of each split.
        train_images, val_images, test_images: image folder of each split.
        val_detections, test_detections: COCO detection results json whose person boxes replace the ground
            truth boxes of that split (None: evaluate on ground-truth boxes).
        detection_score_threshold: detections below this score are not cropped (0.0 in both references).
        input_size: ``[H, W]`` of the crops (``[256, 192]`` in the paper); linked into the task.
        padding: box padding (1.25).
        augment: training augmentation (half-body, scale, rotation, flip; the official recipe) on ``train``.
        rotation, scale_factor, flip_prob, half_body_prob: its parameters (45 degrees with probability 0.5,
            +-0.25, 0.5, 0.3).
        upper_body_ids: keypoints of the upper body for half-body crops; None = COCO's nose .. wrists when the
            names are COCO's, else no half-body augmentation.
        keypoint_names: names when the json's category has none (else they must equal the json's).
        skeleton: 0-based ``[a, b]`` limbs when the json's category has none (pictures only).
        flip_pairs: 0-based ``[left, right]`` pairs, replacing the pairs derived from ``left_*`` / ``right_*`` names.
        oks_sigmas: K per-keypoint OKS sigmas; None = COCO's 17 (the task fills them in; other K must give them).
        category_id: the keypoint category when the json has several with keypoints.
        check_files: check that every image file exists when a json is read.
        batch_size, num_workers, pin_memory: as ``BaseDataModule`` (32 per GPU in the official recipe).
    """

    predict_split = "test"
    collate_fn = staticmethod(topdown_collate)

    def __init__(
        self,
        root: str,
        train_annotations: str = "annotations/person_keypoints_train2017.json",
        val_annotations: str = "annotations/person_keypoints_val2017.json",
        train_images: str = "train2017",
        val_images: str = "val2017",
        test_annotations: str | None = None,
        test_images: str | None = None,
        val_detections: str | None = None,
        test_detections: str | None = None,
        detection_score_threshold: float = 0.0,
        input_size: list[int] | None = None,
        padding: float = 1.25,
        augment: bool = True,
        rotation: float = 45.0,
        scale_factor: float = 0.25,
        flip_prob: float = 0.5,
        half_body_prob: float = 0.3,
        upper_body_ids: list[int] | None = None,
        keypoint_names: list[str] | None = None,
        skeleton: list[list[int]] | None = None,
        flip_pairs: list[list[int]] | None = None,
        oks_sigmas: list[float] | None = None,
        category_id: int | None = None,
        check_files: bool = True,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        given = input_size
        input_size = list(DEFAULT_INPUT_SIZE if input_size is None else input_size)  # saved as linked: a list
        if len(input_size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                           for v in input_size):
            raise ValueError(f"input_size must be [height, width] in pixels, got {given!r}")
        # What the CLI links into the task is resolved from the json later; saving the raw None here would
        # clash with the linked value in the logger's merged hyperparameters.
        self.save_hyperparameters(ignore=["keypoint_names", "skeleton", "flip_pairs", "oks_sigmas"])
        self._input_size = list(input_size)
        if keypoint_names is not None and len(set(keypoint_names)) != len(keypoint_names):
            raise ValueError(f"keypoint_names has duplicates: {keypoint_names}")
        if oks_sigmas is not None and keypoint_names is not None and len(oks_sigmas) != len(keypoint_names):
            raise ValueError(f"oks_sigmas has {len(oks_sigmas)} values for {len(keypoint_names)} keypoint names")
        self.root = root
        self.check_files = check_files
        self.padding = padding
        self.augment = augment
        self.augmentation = dict(rotation=rotation, scale_factor=scale_factor, flip_prob=flip_prob,
                                 half_body_prob=half_body_prob)
        self._upper_body_ids = upper_body_ids
        self._keypoint_names = None if keypoint_names is None else list(keypoint_names)
        self._skeleton = None if skeleton is None else [list(e) for e in skeleton]
        self._flip_pairs = None if flip_pairs is None else [list(p) for p in flip_pairs]
        self._oks_sigmas = None if oks_sigmas is None else [float(s) for s in oks_sigmas]
        self.category_id = category_id
        self.detection_score_threshold = detection_score_threshold
        if test_annotations is None:
            test_annotations, test_images = val_annotations, val_images
            test_detections = val_detections if test_detections is None else test_detections
        self.splits = {
            "train": (train_annotations, train_images, None),
            "val": (val_annotations, val_images, val_detections),
            "test": (test_annotations, test_images or val_images, test_detections),
        }
        self._sources: dict[str, COCOKeypointSource] = {}

    # -- the category and what the CLI links into the task ----------------------------------------------------
    def _path(self, path: str) -> str:
        return os.path.join(self.root, path)  # an absolute ``path`` is kept as is by os.path.join

    def source(self, split: str) -> COCOKeypointSource:
        """The parsed json of ``split`` ("train", "val" or "test"), read once and checked against the category."""
        if split not in self._sources:
            ann, images, _ = self.splits[split]
            if split != "val" and (ann, images) == self.splits["val"][:2]:
                return self.source("val")
            names = self._keypoint_names
            src = COCOKeypointSource(self._path(ann), self._path(images),
                                     num_keypoints=None if names is None else len(names),
                                     category_id=self.category_id, check_files=self.check_files)
            if names is not None and src.category.names is not None and src.category.names != names:
                raise ValueError(f"keypoint_names {names} differ from the names of category {src.category.id} in "
                                 f"{src.annotation_file}: {src.category.names}")
            if split != "val" and src.category.names != self.source("val").category.names:
                raise ValueError(f"the keypoint names of {src.annotation_file} ({src.category.names}) differ from "
                                 f"the validation json's ({self.source('val').category.names})")
            self._sources[split] = src
        return self._sources[split]

    @property
    def keypoint_names(self) -> list[str]:
        """Names of the K keypoints (the config's, else the validation json's category)."""
        if self._keypoint_names is not None:
            return list(self._keypoint_names)
        names = self.source("val").category.names
        if names is None:
            raise ValueError(f"the keypoint category of {self._path(self.splits['val'][0])} has no 'keypoints' "
                             "names: give them with --data.keypoint_names")
        return list(names)

    @property
    def num_keypoints(self) -> int:
        """K."""
        return len(self.keypoint_names)

    @property
    def skeleton(self) -> list[list[int]]:
        """0-based limbs ``[a, b]`` (the config's, else the json's; empty when neither has one)."""
        if self._skeleton is not None:
            return [list(e) for e in self._skeleton]
        skeleton = self.source("val").category.skeleton
        return [list(e) for e in skeleton] if skeleton else []

    @property
    def flip_index(self) -> list[int]:
        """``flip_index[k]``: the keypoint ``k`` becomes under a horizontal mirror (from ``flip_pairs`` or names)."""
        names = self.keypoint_names
        if self._flip_pairs is None:
            return flip_index_from_names(names, where=f"keypoint names of {self._path(self.splits['val'][0])}")
        index = list(range(len(names)))
        for pair in self._flip_pairs:
            if len(pair) != 2 or not all(isinstance(i, int) and 0 <= i < len(names) for i in pair):
                raise ValueError(f"flip_pairs: {pair} is not a pair of keypoint indices in [0, {len(names)})")
            index[pair[0]], index[pair[1]] = pair[1], pair[0]
        return index

    @property
    def oks_sigmas(self) -> list[float] | None:
        """Per-keypoint OKS sigmas from the config (None: the task uses COCO's 17)."""
        if self._oks_sigmas is not None and len(self._oks_sigmas) != self.num_keypoints:
            raise ValueError(f"oks_sigmas has {len(self._oks_sigmas)} values for {self.num_keypoints} keypoints")
        return None if self._oks_sigmas is None else list(self._oks_sigmas)

    @property
    def input_size(self) -> list[int]:
        """``[H, W]`` of the crops."""
        return list(self._input_size)

    @property
    def upper_body_ids(self) -> list[int] | None:
        """Upper-body keypoints for half-body crops (None: no half-body augmentation)."""
        if self._upper_body_ids is not None:
            return list(self._upper_body_ids)
        return list(COCO_UPPER_BODY_IDS) if tuple(self.keypoint_names) == COCO_KEYPOINT_NAMES else None

    # -- datasets ---------------------------------------------------------------------------------------------
    def transform(self, split: str) -> TopDownAffine:
        """The training augmentation for ``"train"`` when ``augment``, else the plain box crop."""
        train = split == "train" and self.augment
        return TopDownAffine(self.input_size, train=train, flip_index=self.flip_index if train else None,
                             upper_body_ids=self.upper_body_ids if train else None, padding=self.padding,
                             **self.augmentation)

    def build_dataset(self, split: str) -> TopDownDataset:
        """Person crops of ``split``: annotations, or the split's detections for evaluation splits."""
        src = self.source(split)
        detections = self.splits[split][2]
        if detections is not None:
            boxes = read_detections(self._path(detections), src, self.detection_score_threshold)
        else:
            boxes = [PersonBox(int(src.ann_image[a]), b, 1.0, a) for a, b in zip(src.instances, src.instance_boxes)]
        return TopDownDataset(src, boxes, self.transform(split), carry_ground_truth=split != "train")
