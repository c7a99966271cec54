"""TensorBoard pictures for detection: a few validation images with ground truth and predicted boxes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchvision.utils import draw_bounding_boxes, make_grid

from lit_tasks.callbacks.tensorboard import tensorboard


def draw_detections(
    image: torch.Tensor,
    pred: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor] | None,
    class_names: list[str] | None,
    min_score: float = 0.3,
) -> torch.Tensor:
    """(3, H, W) float [0, 1] image -> uint8 image with GT boxes (green) and predictions (red, "name score")."""
    canvas = (image.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu()
    name = lambda i: class_names[i] if class_names and i < len(class_names) else str(i)  # noqa: E731
    if target is not None and len(target["boxes"]):
        canvas = draw_bounding_boxes(canvas, target["boxes"].cpu().float(), colors="lime", width=1,
                                     labels=[name(int(c)) for c in target["labels"]])
    keep = pred["scores"] >= min_score
    if keep.any():
        labels = [f"{name(int(c))} {float(s):.2f}" for c, s in zip(pred["labels"][keep], pred["scores"][keep])]
        canvas = draw_bounding_boxes(canvas, pred["boxes"][keep].cpu().float(), colors="red", width=2, labels=labels)
    return canvas


class DetectionImageLogger(pl.Callback):
    """Once per validation epoch on rank 0, log ``num_images`` images of the first batch with boxes drawn.

    Class names come from the task's ``class_names`` hyperparameter, else the DataModule's ``class_names``.
    """

    def __init__(self, num_images: int = 4, min_score: float = 0.3) -> None:
        self.num_images = num_images
        self.min_score = min_score

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        writer = tensorboard(trainer)
        if batch_idx != 0 or not trainer.is_global_zero or writer is None or trainer.sanity_checking:
            return
        images, targets = batch
        names = pl_module.hparams.get("class_names") or getattr(trainer.datamodule, "class_names", None)
        pictures = []
        for image, pred, target in list(zip(images, outputs, targets))[: self.num_images]:
            h, w = target["size"].tolist()
            pictures.append(draw_detections(image[:, :h, :w], pred, target, names, self.min_score))
        size = max(p.shape[-2] for p in pictures), max(p.shape[-1] for p in pictures)
        padded = [torch.nn.functional.pad(p, (0, size[1] - p.shape[-1], 0, size[0] - p.shape[-2])) for p in pictures]
        writer.add_image("val/detections", make_grid(padded, nrow=len(padded), padding=2), trainer.global_step)
