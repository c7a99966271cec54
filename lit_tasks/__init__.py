"""lit-tasks: PyTorch Lightning task plugins for computer vision."""

from lit_tasks.base import BaseTask
from lit_tasks.detection import DetectionTask
from lit_tasks.face_recognition import FaceRecognitionTask

__all__ = ["BaseTask", "DetectionTask", "FaceRecognitionTask"]
