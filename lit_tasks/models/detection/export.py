"""How each detector of :class:`~lit_tasks.detection.DetectionTask` exports (``tools/export.py``): the network up to
its raw output tensors, and those tensors back into what its post-processor takes.

The exported file holds no post-processing (decoding, thresholds, NMS, top queries): any runtime's raw outputs go
back through :class:`DetectorExport` ``from_tensors`` and the task's own post-processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from lit_tasks.models.detection.detr import DETR_EXPORT_NAMES, detr_export_tensors, detr_output_from_export
from lit_tasks.models.detection.fcos import FCOS_EXPORT_NAMES, fcos_export_tensors, fcos_output_from_export
from lit_tasks.models.detection.vfnet import VFNET_EXPORT_NAMES, vfnet_export_tensors, vfnet_output_from_export


@dataclass(frozen=True)
class DetectorExport:
    """How one detector model exports: output names, ``to_tensors(outputs)`` -> its raw output tensors (each with the
    batch first), ``from_tensors(tensors, (H, W), model)`` -> the outputs its post-processor takes, the ONNX opset."""

    names: tuple[str, ...]
    to_tensors: Callable[[Any], tuple[torch.Tensor, ...]]
    from_tensors: Callable[[tuple[torch.Tensor, ...], tuple[int, int], torch.nn.Module], Any]
    opset: int = 17


# One entry per model of DetectionTask's trio table (a new model adds its own).
EXPORTERS = {
    "fcos": DetectorExport(FCOS_EXPORT_NAMES, fcos_export_tensors, fcos_output_from_export),
    # VFNet's deformable convolution exports as ONNX DeformConv, which needs opset 19.
    "vfnet": DetectorExport(VFNET_EXPORT_NAMES, vfnet_export_tensors, vfnet_output_from_export, opset=19),
    "detr": DetectorExport(DETR_EXPORT_NAMES, detr_export_tensors, detr_output_from_export),
}


class RawDetectorOutputs(torch.nn.Module):
    """Images ``(B, 3, H, W)`` in [0, 1], unpadded -> a detector's raw output tensors (the exported network)."""

    def __init__(self, model: torch.nn.Module, to_tensors: Callable[[Any], tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.model, self.to_tensors = model, to_tensors

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.to_tensors(self.model(images)))
