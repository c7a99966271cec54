"""Object detection task: one LightningModule, ``model`` picks the network + criterion + post-processing.

Implemented: ``model="fcos"`` (FCOS with the mmdetection/FCOS-repo improvements, see
:mod:`lit_tasks.models.fcos`). ``"vfnet"`` and ``"detr"`` are planned.

Batches (torchvision's detection convention): images ``(B, 3, H, W)`` float in [0, 1], padded;
targets a list of dicts with ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,) int64 in [0, num_classes)
(no background class), optional ``iscrowd`` (N,) (crowd boxes are not trained on but count as ignore
regions in COCO mAP), ``size`` (h, w) before padding and ``orig_size`` (h, w) of the original image.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.detection import MeanAveragePrecision

from lit_tasks.base import BaseTask
from lit_tasks.metrics.coco import LOGGED_MAP_KEYS, coco_map_metric, format_coco_table
from lit_tasks.models.backbone import IMAGENET_MEAN, IMAGENET_STD
from lit_tasks.ops.box_ops import rescale_boxes
from lit_tasks.callbacks.detection_images import DetectionImageLogger
from lit_tasks.losses.iou import box_loss as iou_loss_by_name
from lit_tasks.models.fcos import FCOS, fcos_loss, fcos_postprocess
from lit_tasks.ops.assigners import FCOS_REGRESS_RANGES

MODELS = ("fcos",)
PLANNED = ("vfnet", "detr")


class DetectionTask(BaseTask):
    """Train, evaluate (COCO mAP) and run a detector.

    Args:
        num_classes: foreground classes (no background), linked from the DataModule.
        model: ``"fcos"``.
        backbone: timm model name with ``features_only`` support (strides 8/16/32 used as C3-C5).
        pretrained: load timm backbone weights (needs network access; False by default).
        fpn_channels: FPN and head width (256 in the paper; smaller for CPU demos).
        head_convs: stacked convs per head tower (4 in the paper).
        box_loss: ``"giou"`` (default, FCOS imprv), ``"iou"`` (-ln IoU), ``"linear_iou"``, ``"diou"`` or ``"ciou"``.
        center_sampling_radius: centre sampling radius in strides (1.5; 0 disables).
        regress_ranges: FCOS size range per level P3..P7, ``[[lo, hi], ...]`` limits on max(l, t, r, b) in
            input pixels (mmdet's ``regress_ranges``). None = the paper's ranges for ~800-px images,
            ``[[-1, 64], [64, 128], [128, 256], [256, 512], [512, inf]]``; smaller inputs can scale them
            down so large objects still reach the coarse levels.
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2.0).
        score_threshold: minimum raw class probability kept at inference (0.05).
        pre_nms_top_k: candidates per level before NMS (1000).
        nms_threshold: class-wise NMS IoU (0.6).
        max_detections: detections kept per image (100).
        lr, weight_decay, momentum: the default optimizer, SGD as the FCOS recipe (used when
            ``optimizer`` is not given).
        warmup_steps: linear LR warm-up of the default scheduler.
        channels_last: run the backbone and FPN in channels_last memory format (the GroupNorm head stays
            NCHW: its backward is slower in channels_last on CPU). On 2 CPU cores, FCOS R50 at 512 px: backbone
            forward ~20 % faster, whole inference ~5 % (benchmarks/detection_speed.py); tiny models on tiny
            images gain nothing (the demo turns it off).
        class_names: names of the classes (linked from the DataModule; used for pictures and by users).
        num_log_images: validation images drawn with boxes to TensorBoard each epoch (0 disables).
        optimizer, lr_scheduler: injected callables (``--model.optimizer=AdamW``); None = SGD as above and
            linear warm-up + cosine decay per step.
    """

    monitor = "val/map"
    mode = "max"

    def __init__(
        self,
        num_classes: int = 80,
        model: str = "fcos",
        backbone: str = "resnet50",
        pretrained: bool = False,
        fpn_channels: int = 256,
        head_convs: int = 4,
        box_loss: str = "giou",
        center_sampling_radius: float = 1.5,
        regress_ranges: list[list[float]] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_threshold: float = 0.05,
        pre_nms_top_k: int = 1000,
        nms_threshold: float = 0.6,
        max_detections: int = 100,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int = 500,
        channels_last: bool = True,
        class_names: list[str] | None = None,
        num_log_images: int = 4,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if model in PLANNED:
            raise NotImplementedError(f"DetectionTask: model={model!r} is planned but not implemented yet")
        if model not in MODELS:
            raise ValueError(f"DetectionTask: unknown model {model!r}; choose one of {MODELS}")
        iou_loss_by_name(box_loss)  # fails early, naming the valid choices
        check_regress_ranges(regress_ranges)
        if num_classes < 1:
            raise ValueError(f"DetectionTask: num_classes must be >= 1, got {num_classes}")
        super().__init__(optimizer, lr_scheduler)

    # -- construction ---------------------------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        self.net = FCOS(hp.num_classes, hp.backbone, hp.pretrained, hp.fpn_channels, hp.head_convs)
        if hp.channels_last:  # backbone + FPN only: GroupNorm's backward is slower in channels_last on CPU
            self.net.backbone.to(memory_format=torch.channels_last)
            self.net.fpn.to(memory_format=torch.channels_last)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def configure_metrics(self) -> None:
        self.val_map = coco_map_metric()
        self.test_map = coco_map_metric()

    def configure_callbacks(self) -> list[pl.Callback]:
        n = self.hparams.num_log_images
        return [DetectionImageLogger(num_images=n)] if n > 0 else []

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    # -- inference ---------------------------------------------------------------------------------
    def _images(self, images: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and (for a list of differently sized images) pad to /32; returns the unpadded sizes."""
        if isinstance(images, (list, tuple)):
            sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
            h = -(-max(s[0] for s in sizes) // 32) * 32
            w = -(-max(s[1] for s in sizes) // 32) * 32
            batch = images[0].new_zeros((len(images), 3, h, w))
            for i, im in enumerate(images):
                batch[i, :, : im.shape[-2], : im.shape[-1]] = im
        else:
            batch = images
            sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
        x = (batch.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, sizes

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detect objects in [0, 1] images (a (B,3,H,W) tensor or a list of (3,H,W)); boxes in input pixels."""
        x, sizes = self._images(images)
        return self.postprocess(self.net(x), sizes)

    def postprocess(self, out: Any, sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        hp = self.hparams
        return fcos_postprocess(out, sizes, hp.score_threshold, hp.pre_nms_top_k, hp.nms_threshold,
                                hp.max_detections)

    # -- steps -------------------------------------------------------------------------------------
    def _loss(self, out: Any, targets: list[dict]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        ranges = FCOS_REGRESS_RANGES if hp.regress_ranges is None else tuple(map(tuple, hp.regress_ranges))
        losses = fcos_loss(out, targets, hp.num_classes, hp.center_sampling_radius, hp.box_loss,
                           hp.focal_alpha, hp.focal_gamma, ranges)
        losses["loss"] = sum(losses.values())
        return losses

    def training_step(self, batch: tuple[torch.Tensor, list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        x, _ = self._images(images)
        losses = self._loss(self.net(x), targets)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite detection loss at step {self.global_step}: {losses}")
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(targets))
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=len(targets))
        return losses["loss"]

    def _eval_step(self, batch: tuple[torch.Tensor, list[dict]], metric: MeanAveragePrecision, prefix: str) -> list[dict]:
        images, targets = batch
        x, _ = self._images(images)
        out = self.net(x)
        losses = self._loss(out, targets)
        self.log(f"{prefix}/loss", losses["loss"], batch_size=len(targets), sync_dist=True)
        preds = self.postprocess(out, [tuple(t["size"].tolist()) for t in targets])
        preds_orig, targets_orig = [], []
        for p, t in zip(preds, targets):
            preds_orig.append({**p, "boxes": rescale_boxes(p["boxes"], t["size"], t["orig_size"])})
            gt = {"boxes": rescale_boxes(t["boxes"].float(), t["size"], t["orig_size"]), "labels": t["labels"]}
            if "iscrowd" in t:
                gt["iscrowd"] = t["iscrowd"]
            targets_orig.append(gt)
        metric.update(preds_orig, targets_orig)
        return preds

    def validation_step(self, batch: Any, batch_idx: int) -> list[dict]:
        return self._eval_step(batch, self.val_map, "val")

    def test_step(self, batch: Any, batch_idx: int) -> list[dict]:
        return self._eval_step(batch, self.test_map, "test")

    def _log_map(self, metric: MeanAveragePrecision, prefix: str) -> dict[str, torch.Tensor]:
        values = metric.compute()
        metric.reset()
        self.log_metrics({k: values[k] for k in LOGGED_MAP_KEYS}, prefix)
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        values = self._log_map(self.test_map, "test")
        if self.trainer.is_global_zero:
            print(format_coco_table(values))

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        """Detections in original-image pixels, with each target's ``image_id`` when the batch has one."""
        images, targets = batch
        x, _ = self._images(images)
        preds = self.postprocess(self.net(x), [tuple(t["size"].tolist()) for t in targets])
        return [
            {**p, "boxes": rescale_boxes(p["boxes"], t["size"], t["orig_size"]), "image_id": t["image_id"]}
            for p, t in zip(preds, targets)
        ]


def check_regress_ranges(ranges: list[list[float]] | None, num_levels: int = 5) -> None:
    """Fail early on FCOS regress ranges that are not ``num_levels`` increasing ``[lo, hi]`` pairs."""
    if ranges is None:
        return
    pairs = [tuple(r) for r in ranges]
    if len(pairs) != num_levels or any(len(r) != 2 or not r[0] < r[1] for r in pairs):
        raise ValueError(f"DetectionTask: regress_ranges must be {num_levels} [lo, hi] pairs with lo < hi "
                         f"(one per level P3..P7), got {ranges}")
    if any(a[0] > b[0] for a, b in zip(pairs, pairs[1:])):
        raise ValueError(f"DetectionTask: regress_ranges must increase from P3 to P7, got {ranges}")
