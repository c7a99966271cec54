"""lit-tasks: PyTorch Lightning task plugins for computer vision."""

from lit_tasks.action_detection import ActionDetectionTask
from lit_tasks.base import BaseTask
from lit_tasks.detection import DetectionTask
from lit_tasks.face_recognition import FaceRecognitionTask
from lit_tasks.pose import PoseTask
from lit_tasks.segmentation import SemanticSegmentationTask

__all__ = ["ActionDetectionTask", "BaseTask", "DetectionTask", "FaceRecognitionTask", "PoseTask",
           "SemanticSegmentationTask"]
