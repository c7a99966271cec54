"""DataModules for lit-tasks: standard formats on disk and generated data (never imports ``lit_tasks``)."""

from .base import BaseDataModule, detection_collate, pad_images
from .coco import COCODetectionDataModule, COCODetectionSource
from .detection import DetectionDataset
from .faces import IdentityFolderDataModule
from .synthetic import ShapesDetectionDataModule, SyntheticFacesDataModule
from .tfrecord import TFRecordDetectionDataModule
