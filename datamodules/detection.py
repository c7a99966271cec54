"""Map-style detection dataset over any "source" of images and boxes (COCO files, synthetic shapes).

A source only knows how to load record ``i`` as numpy arrays; this wrapper runs the albumentations
transform and builds the target dict every detection task expects.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

DetectionRecord = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


class DetectionSource(Protocol):
    """Random access to detection records.

    ``load(i)`` returns ``(image (H,W,3) uint8 RGB, boxes (N,4) float xyxy pixels, labels (N,) int64,
    iscrowd (N,) int64, image_id int)``.
    """

    def __len__(self) -> int: ...

    def load(self, index: int) -> DetectionRecord: ...


class DetectionDataset(Dataset):
    """``(image, target)`` pairs from a source and an albumentations transform.

    ``image`` is float32 ``(3, H, W)`` in [0, 1]. ``target`` holds ``boxes`` (N, 4) float32 xyxy pixels
    of the transformed image, ``labels`` (N,) int64, ``iscrowd`` (N,) int64, ``image_id`` int64 scalar,
    ``size`` int64 ``[h, w]`` of the transformed image and ``orig_size`` int64 ``[h, w]`` of the
    source image. The transform must take ``image``, ``bboxes``, ``labels`` and ``iscrowd`` and
    return a float tensor image (see ``datamodules.transforms``); ``None`` only converts to a tensor.
    """

    def __init__(self, source: DetectionSource, transform: Callable[..., dict[str, Any]] | None = None) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, boxes, labels, iscrowd, image_id = self.source.load(index)
        orig_h, orig_w = int(image.shape[0]), int(image.shape[1])
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        iscrowd = np.asarray(iscrowd, dtype=np.int64).reshape(-1)
        if not len(boxes) == len(labels) == len(iscrowd):
            raise ValueError(
                f"{type(self.source).__name__}.load({index}) (image_id {image_id}): {len(boxes)} boxes, "
                f"{len(labels)} labels and {len(iscrowd)} iscrowd flags; they must have one entry per object"
            )
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, labels=labels, iscrowd=iscrowd)
            image_t = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            iscrowd = np.asarray(out["iscrowd"], dtype=np.int64).reshape(-1)
        else:
            image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        if not (isinstance(image_t, torch.Tensor) and image_t.is_floating_point() and image_t.ndim == 3):
            raise TypeError(
                f"DetectionDataset: the transform must return a float (3, H, W) tensor image "
                f"(end it with datamodules.transforms.to_tensor()), got {type(image_t).__name__} "
                f"{getattr(image_t, 'dtype', '')} {tuple(getattr(image_t, 'shape', ()))}"
            )
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "iscrowd": torch.from_numpy(iscrowd),
            "image_id": torch.tensor(int(image_id), dtype=torch.int64),
            "size": torch.tensor([image_t.shape[-2], image_t.shape[-1]], dtype=torch.int64),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
        }
        return image_t.float(), target
