"""lit-tasks: PyTorch Lightning task plugins for computer vision."""

from lit_tasks.base import BaseTask
from lit_tasks.detection import DetectionTask

__all__ = ["BaseTask", "DetectionTask"]
