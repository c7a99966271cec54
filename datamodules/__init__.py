"""DataModules for lit-tasks: standard formats on disk and generated data (never imports ``lit_tasks``).

Names are imported on first use (PEP 562), so ``from datamodules.tfrecord import read_records`` loads
neither Lightning nor albumentations. Layout: ``base`` (loader plumbing), ``images`` (the one image
decoder), ``transforms``; a family per task: ``detection`` + ``coco`` + ``tfrecord_detection``,
``faces`` + ``tfrecord_faces`` + ``recordio_faces`` (with the formats ``recordio``, ``face_bin`` and
``face_align``), ``masks`` + ``tfrecord_masks``, ``keypoints`` + ``topdown`` + ``coco_keypoints`` (pose),
``features`` + ``tfrecord_features`` (feature streams); ``synthetic`` (generated data); ``tfrecord`` (the
TFRecord format itself, knowing no DataModule).
"""

import importlib
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise checks the network

_EXPORTS = {
    "BaseDataModule": "base",
    "pad_images": "base",
    "ResumableDataLoader": "loaders",
    "COCODetectionDataModule": "detection.coco",
    "COCODetectionSource": "detection.coco",
    "COCOKeypointDataModule": "keypoints.coco",
    "COCOKeypointSource": "keypoints.coco",
    "TopDownDataset": "keypoints.topdown",
    "topdown_collate": "keypoints.topdown",
    "topdown_sample": "keypoints.topdown",
    "DetectionDataset": "detection.samples",
    "detection_collate": "detection.samples",
    "detection_sample": "detection.samples",
    "IdentityFolderDataModule": "faces.identities",
    "LSTRFeatureDataModule": "features.streams",
    "OadTRFeatureDataModule": "features.streams",
    "SyntheticStreamsDataModule": "synthetic",
    "TFRecordFeatureDataModule": "features.tfrecord",
    "FolderSegmentationDataModule": "segmentation.masks",
    "RecordIOFaceDataModule": "faces.recordio",
    "SegmentationDataset": "segmentation.masks",
    "VOCSegmentationDataModule": "segmentation.masks",
    "segmentation_collate": "segmentation.masks",
    "FiguresKeypointDataModule": "synthetic",
    "ShapesDetectionDataModule": "synthetic",
    "ShapesSegmentationDataModule": "synthetic",
    "SyntheticFacesDataModule": "synthetic",
    "TFRecordDetectionDataModule": "detection.tfrecord",
    "TFRecordIdentityDataModule": "faces.tfrecord",
    "TFRecordMaskDataModule": "segmentation.tfrecord",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
