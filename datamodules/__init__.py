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
    "COCODetectionDataModule": "coco",
    "COCODetectionSource": "coco",
    "COCOKeypointDataModule": "coco_keypoints",
    "COCOKeypointSource": "coco_keypoints",
    "TopDownDataset": "topdown",
    "topdown_collate": "topdown",
    "topdown_sample": "topdown",
    "DetectionDataset": "detection",
    "detection_collate": "detection",
    "detection_sample": "detection",
    "IdentityFolderDataModule": "faces",
    "LSTRFeatureDataModule": "features",
    "OadTRFeatureDataModule": "features",
    "SyntheticStreamsDataModule": "synthetic",
    "TFRecordFeatureDataModule": "tfrecord_features",
    "FolderSegmentationDataModule": "masks",
    "RecordIOFaceDataModule": "recordio_faces",
    "SegmentationDataset": "masks",
    "VOCSegmentationDataModule": "masks",
    "segmentation_collate": "masks",
    "FiguresKeypointDataModule": "synthetic",
    "ShapesDetectionDataModule": "synthetic",
    "ShapesSegmentationDataModule": "synthetic",
    "SyntheticFacesDataModule": "synthetic",
    "TFRecordDetectionDataModule": "tfrecord_detection",
    "TFRecordIdentityDataModule": "tfrecord_faces",
    "TFRecordMaskDataModule": "tfrecord_masks",
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
