"""The ``image/*`` keys every TFRecord family shares (TF Object Detection API layout): an image file in, pixels out.

Keys follow TensorFlow's conventions so shards read in TensorFlow and TensorFlow's shards read here:
``image/encoded`` (the original file bytes, never re-encoded), ``image/format``, ``image/filename``,
``image/source_id``, ``image/height`` and ``image/width`` (of the image as displayed: EXIF orientation
applied, the frame boxes and masks refer to). The families add their own keys: detection in
:mod:`datamodules.detection.tfrecord`, identities in :mod:`datamodules.faces.tfrecord`, masks in
:mod:`datamodules.segmentation.tfrecord`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datamodules.images import decode_image, image_header
from datamodules.tfrecord import FixedLen, bytes_feature, int64_feature
from datamodules.tfrecord.example_pb2 import Feature

IMAGE_FEATURES = {
    "image/encoded": FixedLen((), "bytes"),
    "image/filename": FixedLen((), "bytes", default=b""),
    "image/source_id": FixedLen((), "bytes", default=b""),
    "image/height": FixedLen((), "int64", default=0),
    "image/width": FixedLen((), "int64", default=0),
}


def read_bytes(path: str) -> bytes:
    """The file's bytes."""
    with open(path, "rb") as f:
        return f.read()


def image_features(path: str, filename: str, source_id: str) -> tuple[dict[str, Feature], int, int]:
    """The ``image/*`` features of an image file (its bytes as they are) and its upright ``(height, width)``.

    Raises:
        OSError: naming ``path`` when it is not a readable image.
    """
    return encoded_image_features(read_bytes(path), filename, source_id, path)


def encoded_image_features(encoded: bytes, filename: str, source_id: str, name: str | None = None
                           ) -> tuple[dict[str, Feature], int, int]:
    """The ``image/*`` features of encoded image bytes (stored as they are) and the upright ``(height, width)``.

    Raises:
        OSError: naming ``name`` (default ``filename``) when the bytes are not a readable image.
    """
    height, width, fmt = image_header(encoded, name or filename)
    features = {
        "image/encoded": bytes_feature(encoded),
        "image/format": bytes_feature(fmt),
        "image/filename": bytes_feature(filename),
        "image/source_id": bytes_feature(source_id),
        "image/height": int64_feature(height),
        "image/width": int64_feature(width),
    }
    return features, height, width


def decode_image_feature(example: dict[str, Any]) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB upright of a parsed example's ``image/encoded``, checked against its stored size.

    ``image/height`` x ``image/width`` (0 x 0 or absent: not stored) must be the decoded image's.

    Raises:
        OSError / ValueError: naming the key and the problem (``TFRecordDataset`` adds the shard and record).
    """
    image = decode_image(example["image/encoded"], "image/encoded")
    stored = (int(example.get("image/height", 0)), int(example.get("image/width", 0)))
    if stored != (0, 0) and stored != image.shape[:2]:
        raise ValueError(f"image/height x image/width say {stored[0]}x{stored[1]} but image/encoded is "
                         f"{image.shape[0]}x{image.shape[1]} (upright by its EXIF orientation)")
    return image
