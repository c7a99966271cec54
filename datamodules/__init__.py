"""DataModules for lit-tasks: standard formats on disk and generated data (never imports ``lit_tasks``).

Names are imported on first use (PEP 562), so ``from datamodules.tfrecord import read_records`` loads
neither Lightning nor albumentations. Layout: plumbing at the top (``base``, ``loaders``, ``transfer``,
``images`` the one image decoder, ``transforms``; ``tfrecord_images`` and ``tfrecord_shards``, the keys and the
argument block every TFRecord DataModule shares); one folder per family with its sample contract, its on-disk
DataModules and its TFRecord DataModule: ``detection/`` (``samples``, ``coco``),
``segmentation/`` (``samples``, ``folders``), ``faces/`` (``samples``, ``folders``, ``recordio``, ``align``),
``keypoints/`` (``topdown``, ``geometry``, ``coco``), ``features/`` (``samples``, ``layouts``, ``datamodules``);
``synthetic/`` (generated data). The formats know no DataModule and import nothing else of
``datamodules`` (a family passes the image decoder): ``tfrecord/``, ``recordio`` (MXNet RecordIO) and
``face_bin`` (insightface's ``.bin`` verification sets).
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
    "IdentityFolderDataModule": "faces.folders",
    "LSTRFeatureDataModule": "features.datamodules",
    "OadTRFeatureDataModule": "features.datamodules",
    "SyntheticStreamsDataModule": "synthetic",
    "TFRecordFeatureDataModule": "features.tfrecord",
    "FolderSegmentationDataModule": "segmentation.folders",
    "RecordIOFaceDataModule": "faces.recordio",
    "SegmentationDataset": "segmentation.samples",
    "VOCSegmentationDataModule": "segmentation.folders",
    "segmentation_collate": "segmentation.samples",
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
