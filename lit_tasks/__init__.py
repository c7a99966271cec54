"""lit-tasks: PyTorch Lightning task plugins for computer vision."""

from lit_tasks.base import BaseTask
from lit_tasks.detection import DetectionTask
from lit_tasks.face_recognition import FaceRecognitionTask
from lit_tasks.pose import PoseTask
from lit_tasks.segmentation import SemanticSegmentationTask

__all__ = ["BaseTask", "DetectionTask", "FaceRecognitionTask", "PoseTask", "SemanticSegmentationTask"]
