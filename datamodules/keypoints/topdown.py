"""Top-down pose samples: one crop per person box, and their collation (any keypoint source: COCO files, ...).

A source gives image ``i`` and, per annotation, ``(K, 3)`` keypoints ``(x, y, v)``; :class:`PersonBox` lists the
boxes to crop (from annotations, or from a detector). :func:`topdown_sample` is the one sample-building function
of the family (the crop and its inverse map), :class:`TopDownDataset` adds what evaluation needs (the box, its
score, ids, areas, and the ground truth each sample carries) and :func:`topdown_collate` batches them; the keys
are listed in :mod:`datamodules.keypoints.coco`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.keypoints.geometry import TopDownAffine, invert_affine


class KeypointSource(Protocol):
    """What :class:`TopDownDataset` reads: images, the keypoint category and every annotation of it.

    Attributes: ``num_keypoints``, ``annotation_file`` (for messages), ``image_ids`` (per image), ``category.id``;
    per annotation ``ann_ids`` ``(M,)``, ``ann_image`` ``(M,)`` image index, ``keypoints`` ``(M, K, 3)``,
    ``boxes_xywh`` ``(M, 4)``, ``area`` ``(M,)``, ``iscrowd`` ``(M,)``. ``load_image(i)`` gives ``(H, W, 3)`` uint8.
    """

    num_keypoints: int
    annotation_file: str
    image_ids: list[int]
    ann_ids: np.ndarray
    ann_image: np.ndarray
    keypoints: np.ndarray
    boxes_xywh: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray

    def load_image(self, index: int) -> np.ndarray: ...


@dataclass
class PersonBox:
    """One sample: a person box ``[x, y, w, h]`` (clipped) in image ``image_index``, from an annotation
    (``annotation`` index into the source's arrays) or a detector (``annotation = -1``)."""

    image_index: int
    box_xywh: np.ndarray
    score: float
    annotation: int


def topdown_sample(image: np.ndarray, keypoints: np.ndarray, box_xywh: Sequence[float], transform: TopDownAffine,
                   rng: np.random.Generator | None = None, where: str = "person box") -> dict[str, torch.Tensor]:
    """The crop of one person: ``image`` ``(3, H, W)`` float32 [0, 1], ``keypoints`` ``(K, 3)`` crop pixels,
    ``matrix_inv`` ``(2, 3)`` float64 crop -> image, ``crop_area`` (the crop region's area in image pixels)."""
    sample = transform(image, keypoints, box_xywh, rng, where)
    crop = torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1))).float().div_(255.0)
    return {
        "image": crop,
        "keypoints": torch.from_numpy(sample.keypoints),
        "matrix_inv": torch.from_numpy(invert_affine(sample.matrix)),
        "crop_area": torch.tensor(float(sample.scale[0] * sample.scale[1]), dtype=torch.float64),
    }


class TopDownDataset(Dataset):
    """One sample per :class:`PersonBox` of a source (the keys are listed in :mod:`datamodules.keypoints.coco`).

    Args:
        source: the keypoint source (e.g. :class:`~datamodules.keypoints.coco.COCOKeypointSource`).
        boxes: the samples' person boxes.
        transform: the crop (augmenting for training).
        carry_ground_truth: attach every annotation of the source to exactly one sample (evaluation splits).
    """

    def __init__(self, source: KeypointSource, boxes: list[PersonBox], transform: TopDownAffine,
                 carry_ground_truth: bool = True) -> None:
        self.source = source
        self.boxes = boxes
        self.transform = transform
        self.carried: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in boxes]
        if carry_ground_truth and boxes:
            first: dict[int, int] = {}
            for i, b in enumerate(boxes):
                first.setdefault(b.image_index, i)
            owner = np.array([first.get(int(im), int(im) % len(boxes)) for im in source.ann_image], dtype=np.int64)
            order = np.argsort(owner, kind="stable")
            splits = np.searchsorted(owner[order], np.arange(len(boxes) + 1))
            self.carried = [order[splits[i]:splits[i + 1]] for i in range(len(boxes))]

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        src, box = self.source, self.boxes[index]
        k = src.num_keypoints
        ann = box.annotation
        keypoints = src.keypoints[ann] if ann >= 0 else np.zeros((k, 3), dtype=np.float32)
        where = (f"COCO annotation {int(src.ann_ids[ann])} in {src.annotation_file}" if ann >= 0
                 else f"detection box {box.box_xywh.tolist()} of image {src.image_ids[box.image_index]}")
        sample = topdown_sample(src.load_image(box.image_index), keypoints, box.box_xywh, self.transform,
                                None, where)  # the transform draws its generator from torch's (resumable)
        x, y, w, h = box.box_xywh
        carried = self.carried[index]
        boxes = src.boxes_xywh[carried]
        sample.update(
            keypoints_image=torch.from_numpy(np.array(keypoints, dtype=np.float32)),
            box=torch.tensor([x, y, x + w, y + h], dtype=torch.float64),
            box_score=torch.tensor(box.score, dtype=torch.float32),
            image_id=torch.tensor(src.image_ids[box.image_index], dtype=torch.int64),
            id=torch.tensor(int(src.ann_ids[ann]) if ann >= 0 else -1, dtype=torch.int64),
            category_id=torch.tensor(src.category.id, dtype=torch.int64),
            area=torch.tensor(float(src.area[ann]) if ann >= 0 else float(w * h), dtype=torch.float64),
            from_detector=torch.tensor(ann < 0),
            gt={
                "keypoints": torch.from_numpy(src.keypoints[carried]),
                "boxes": torch.from_numpy(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)),
                "area": torch.from_numpy(src.area[carried]),
                "image_id": torch.tensor([src.image_ids[i] for i in src.ann_image[carried]], dtype=torch.int64),
                "id": torch.from_numpy(src.ann_ids[carried]),
                "iscrowd": torch.from_numpy(src.iscrowd[carried]),
            },
        )
        return sample


def topdown_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the samples' tensors; concatenate their carried ground truth (``gt``) into one dict of ``(M, ...)``."""
    out: dict[str, Any] = {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key != "gt"}
    if "gt" in samples[0]:
        out["gt"] = {key: torch.cat([s["gt"][key] for s in samples]) for key in samples[0]["gt"]}
    return out
