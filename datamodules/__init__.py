"""DataModules for lit-tasks: standard formats on disk and generated data (never imports ``lit_tasks``)."""

from .base import BaseDataModule, detection_collate, pad_images
from .coco import COCODetectionDataModule, COCODetectionSource
from .detection import DetectionDataset
from .faces import IdentityFolderDataModule
from .masks import FolderSegmentationDataModule, SegmentationDataset, VOCSegmentationDataModule, segmentation_collate
from .synthetic import ShapesDetectionDataModule, ShapesSegmentationDataModule, SyntheticFacesDataModule
from .tfrecord import TFRecordDetectionDataModule, TFRecordIdentityDataModule, TFRecordMaskDataModule

__all__ = [
    "BaseDataModule",
    "COCODetectionDataModule",
    "COCODetectionSource",
    "DetectionDataset",
    "FolderSegmentationDataModule",
    "IdentityFolderDataModule",
    "SegmentationDataset",
    "ShapesDetectionDataModule",
    "ShapesSegmentationDataModule",
    "SyntheticFacesDataModule",
    "TFRecordDetectionDataModule",
    "TFRecordIdentityDataModule",
    "TFRecordMaskDataModule",
    "VOCSegmentationDataModule",
    "detection_collate",
    "pad_images",
    "segmentation_collate",
]
