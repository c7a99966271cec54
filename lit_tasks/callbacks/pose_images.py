"""TensorBoard pictures for pose: validation crops with the ground-truth and the predicted skeleton.

Once per validation epoch on rank 0, the first ``num_images`` crops of the first batch, side by side: ground
truth (green limbs and joints, labelled keypoints only) and prediction (red limbs; joints in yellow whose
radius is the predicted sigma in crop pixels, so an uncertain keypoint shows as a large disc), both drawn with
``torchvision.utils.draw_keypoints``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchvision.utils import draw_keypoints, make_grid

from lit_tasks.callbacks.tensorboard import tensorboard

MAX_RADIUS = 12


def sigma_radii(sigma: Tensor, image_size: tuple[int, int]) -> list[int]:
    """Marker radius per keypoint: the predicted scale ``sigma`` ``(K, 2)`` (normalised) in crop pixels, ``(H, W)``,
    averaged over the axes and clamped to ``[1, MAX_RADIUS]``."""
    h, w = image_size
    pixels = (sigma[:, 0].float() * w + sigma[:, 1].float() * h) / 2
    return [int(v) for v in pixels.round().clamp(1, MAX_RADIUS).tolist()]


def draw_pose(image: Tensor, keypoints: Tensor, skeleton: list[list[int]] | None, visible: Tensor | None = None,
              radii: list[int] | None = None, limb_colour: str = "red", joint_colour: str = "yellow") -> Tensor:
    """``(3, H, W)`` image (float [0, 1] or uint8) with one pose ``(K, 2)`` drawn: limbs, then one disc per joint.

    Args:
        visible: ``(K,)`` bool; hidden keypoints and the limbs touching them are not drawn.
        radii: per-keypoint disc radius (e.g. :func:`sigma_radii`); 2 px when None.
    """
    canvas = image if image.dtype == torch.uint8 else (image.detach().float().clamp(0, 1) * 255).to(torch.uint8)
    canvas = canvas.cpu()
    points = keypoints.detach().float().cpu()[None]
    shown = torch.ones(points.shape[1], dtype=torch.bool) if visible is None else visible.cpu().bool()
    if skeleton:
        canvas = draw_keypoints(canvas, points, connectivity=[tuple(e) for e in skeleton], colors=limb_colour,
                                radius=1, width=2, visibility=shown[None])
    for k in torch.nonzero(shown).flatten().tolist():
        radius = 2 if radii is None else radii[k]
        canvas = draw_keypoints(canvas, points[:, k:k + 1], colors=joint_colour, radius=radius)
    return canvas


class PoseImageLogger(pl.Callback):
    """Log ``num_images`` validation crops with ground-truth | predicted skeletons to TensorBoard (rank 0).

    Needs a task whose ``validation_step`` returns ``{"keypoints": (B, K, 2) crop pixels, "sigma": (B, K, 2)}``
    and whose hyperparameters may hold a 0-based ``skeleton``; ``PoseTask`` attaches it (``num_log_images``).
    """

    def __init__(self, num_images: int = 4) -> None:
        self.num_images = num_images

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        writer = tensorboard(trainer)
        if batch_idx != 0 or not trainer.is_global_zero or writer is None or trainer.sanity_checking:
            return
        skeleton = pl_module.hparams.get("skeleton")
        size = tuple(batch["image"].shape[-2:])
        pictures = []
        for i in range(min(self.num_images, batch["image"].shape[0])):
            image = batch["image"][i]
            truth = batch["keypoints"][i]
            gt = draw_pose(image, truth[:, :2], skeleton, truth[:, 2] > 0, limb_colour="lime", joint_colour="lime")
            pred = draw_pose(image, outputs["keypoints"][i], skeleton, radii=sigma_radii(outputs["sigma"][i], size))
            pictures.append(torch.cat([gt, pred], dim=-1))
        if pictures:
            writer.add_image("val/poses (truth | prediction, disc = sigma)", make_grid(pictures, nrow=len(pictures),
                                                                                     padding=2), trainer.global_step)
