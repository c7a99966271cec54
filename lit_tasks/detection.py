"""Object detection task: one LightningModule; ``model`` picks a detector trio (network, criterion, post-processor).

Every detector is built once by its ``build_<name>`` function (``lit_tasks/models/<name>.py``) as three modules:
``self.model(images, image_sizes) -> outputs``, ``self.criterion(outputs, targets) -> {"loss_*": ...}`` (already
weighted; the task sums them) and ``self.postprocess(outputs, image_sizes) -> detections``. Implemented:
``model="fcos"`` (FCOS with the mmdetection/FCOS-repo improvements, :mod:`lit_tasks.models.fcos`).

Batches (torchvision's detection convention): images ``(B, 3, H, W)`` float in [0, 1], zero-padded;
targets a list of dicts with ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,) int64 in [0, num_classes)
(no background class), optional ``iscrowd`` (N,) (crowd boxes are not trained on but count as ignore
regions in COCO mAP), ``size`` (h, w) before padding and ``orig_size`` (h, w) of the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.detection import MeanAveragePrecision

from lit_tasks.base import BaseTask
from lit_tasks.callbacks.detection_images import DetectionImageLogger
from lit_tasks.losses.iou import box_loss as iou_loss_by_name
from lit_tasks.metrics.coco import LOGGED_MAP_KEYS, coco_map_metric, format_class_ap_table, format_coco_table, per_class_ap
from lit_tasks.models.fcos import FCOS_EXPORT_NAMES, build_fcos, fcos_export_tensors, fcos_output_from_export
from lit_tasks.ops.assigners import FCOS_REGRESS_RANGES
from lit_tasks.ops.box_ops import rescale_boxes
from lit_tasks.ops.images import stack_padded


class DetectionTask(BaseTask):
    """Train, evaluate (COCO mAP) and run a detector.

    Args:
        num_classes: foreground classes (no background), linked from the DataModule.
        model: ``"fcos"``.

        Backbone (every model):
        backbone: timm model name with ``features_only`` support (strides 8/16/32 used as C3-C5).
        pretrained: load timm backbone weights (needs network access; False by default).
        frozen_stages: freeze the stem and the first k stages (mmdet's ``frozen_stages``; -1 none). None = the
            recipe: 1 with ``pretrained``, -1 from scratch.
        frozen_bn: freeze every backbone BatchNorm (statistics and affine). None = the recipe: True with
            ``pretrained`` (2 images per device give useless batch statistics), False from scratch (a randomly
            initialised network cannot train with fixed identity normalisation).
        backbone_lr_ratio: the backbone's learning rate relative to the rest (1.0 for FCOS).
        channels_last: run the backbone in channels_last memory format (the GroupNorm head stays NCHW: its
            backward is slower in channels_last on CPU). On 2 CPU cores, FCOS R50 at 512 px: backbone forward
            ~20 % faster, whole inference ~5 % (benchmarks/detection_speed.py); tiny models on tiny images
            gain nothing (the demo turns it off).

        FCOS:
        fpn_channels: FPN and head width (256 in the paper; smaller for CPU demos).
        head_convs: stacked convs per head tower (4 in the paper).
        box_loss: ``"giou"`` (default, FCOS imprv), ``"iou"`` (-ln IoU), ``"linear_iou"``, ``"diou"`` or ``"ciou"``.
        center_sampling_radius: centre sampling radius in strides (1.5; 0 disables).
        regress_ranges: FCOS size range per level P3..P7, ``[[lo, hi], ...]`` limits on max(l, t, r, b) in
            input pixels (mmdet's ``regress_ranges``). None = the paper's ranges for ~800-px images,
            ``[[-1, 64], [64, 128], [128, 256], [256, 512], [512, inf]]``; smaller inputs can scale them
            down so large objects still reach the coarse levels.
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2.0).

        Evaluation-time (not saved in checkpoints: ``test --ckpt_path`` takes them from its own config):
        score_threshold: minimum raw class probability kept at inference (0.05).
        pre_nms_top_k: candidates per level before NMS (1000).
        nms_threshold: class-wise NMS IoU (0.6).
        max_detections: detections kept per image (100).
        num_log_images: validation images drawn with boxes to TensorBoard each epoch (0 disables).

        Optimisation:
        lr, weight_decay, momentum: the default optimizer, SGD as the FCOS recipe (used when
            ``optimizer`` is not given).
        warmup_steps: linear LR warm-up of the default scheduler.
        class_names: names of the classes (linked from the DataModule; used for pictures and by users).
        optimizer, lr_scheduler, lr_scheduler_interval: injected callables (``--model.optimizer=AdamW``);
            None = SGD as above and linear warm-up + cosine decay per step (see ``BaseTask``).
    """

    monitor = "val/map"
    mode = "max"
    eval_options = ("score_threshold", "pre_nms_top_k", "nms_threshold", "max_detections", "num_log_images")

    def __init__(
        self,
        num_classes: int = 80,
        model: Literal["fcos"] = "fcos",
        backbone: str = "resnet50",
        pretrained: bool = False,
        frozen_stages: int | None = None,
        frozen_bn: bool | None = None,
        backbone_lr_ratio: float = 1.0,
        channels_last: bool = True,
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
        num_log_images: int = 4,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int = 500,
        class_names: list[str] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        iou_loss_by_name(box_loss)  # fails early, naming the valid choices
        check_regress_ranges(regress_ranges)
        if num_classes < 1:
            raise ValueError(f"DetectionTask: num_classes must be >= 1, got {num_classes}")
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    # -- construction ---------------------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the trio of ``hparams.model`` once: ``self.model``, ``self.criterion``, ``self.postprocess``."""
        hp = self.hparams
        frozen_stages = hp.frozen_stages if hp.frozen_stages is not None else (1 if hp.pretrained else -1)
        frozen_bn = hp.frozen_bn if hp.frozen_bn is not None else hp.pretrained
        backbone = dict(backbone=hp.backbone, pretrained=hp.pretrained, frozen_stages=frozen_stages,
                        frozen_bn=frozen_bn)
        inference = dict(score_threshold=self.score_threshold, pre_nms_top_k=self.pre_nms_top_k,
                         nms_threshold=self.nms_threshold, max_detections=self.max_detections)
        match hp.model:
            case "fcos":
                ranges = FCOS_REGRESS_RANGES if hp.regress_ranges is None else tuple(map(tuple, hp.regress_ranges))
                self.model, self.criterion, self.postprocess = build_fcos(
                    hp.num_classes, **backbone, fpn_channels=hp.fpn_channels, head_convs=hp.head_convs,
                    box_loss=hp.box_loss, focal_alpha=hp.focal_alpha, focal_gamma=hp.focal_gamma,
                    regress_ranges=ranges, center_sampling_radius=hp.center_sampling_radius, **inference)
            case _:
                raise ValueError(f"DetectionTask: unknown model {hp.model!r}; choose 'fcos'")
        if hp.channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)

    def configure_metrics(self) -> None:
        self.val_map = coco_map_metric(class_metrics=True)
        self.test_map = coco_map_metric(class_metrics=True)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [DetectionImageLogger(num_images=self.num_log_images)] if self.num_log_images > 0 else []

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def param_groups(self) -> list[dict[str, Any]]:
        """BaseTask's groups, with the backbone's parameters in groups of their own at ``backbone_lr_ratio``."""
        groups = super().param_groups()
        ratio = self.hparams.backbone_lr_ratio
        if ratio == 1.0:
            return groups
        backbone = {id(p) for p in self.model.backbone.parameters()}
        split = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in backbone]
            mine = [p for p in group["params"] if id(p) in backbone]
            split += [{**group, "params": rest}] if rest else []
            split += [{**group, "params": mine, "lr_ratio": ratio}] if mine else []
        return split

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detect objects in [0, 1] images (a (B,3,H,W) tensor or a list of (3,H,W)); boxes in input pixels."""
        batch, sizes = stack_padded(images, size_divisor=32)
        return self.postprocess(self.model(batch, sizes), sizes)

    # -- steps -------------------------------------------------------------------------------------
    def losses(self, outputs: Any, targets: list[dict]) -> dict[str, torch.Tensor]:
        """The criterion's weighted parts plus their sum under ``loss`` (entries not named ``loss_*`` are logged only)."""
        values = self.criterion(outputs, targets)
        values["loss"] = sum(v for k, v in values.items() if k.startswith("loss_"))
        return values

    def training_step(self, batch: tuple[torch.Tensor, list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.losses(self.model(images, sizes_of(targets)), targets)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite detection loss at step {self.global_step}: {losses}")
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(targets))
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=len(targets))
        return losses["loss"]

    def _eval_step(self, batch: tuple[torch.Tensor, list[dict]], metric: MeanAveragePrecision, stage: str) -> list[dict]:
        """Loss on the training targets; mAP of the detections, mapped to original pixels, against the dataset's
        own annotations (``target["original"]``: boxes before any resize or clipping, with their ``area``), so a
        small object a downscale erased still counts as a miss; without them, the targets mapped back."""
        images, targets = batch
        sizes = sizes_of(targets)
        outputs = self.model(images, sizes)
        self.log(f"{stage}/loss", self.losses(outputs, targets)["loss"], batch_size=len(targets), sync_dist=True)
        preds = self.postprocess(outputs, sizes)
        preds_orig = [{**p, "boxes": rescale_boxes(p["boxes"], t["size"], t["orig_size"])} for p, t in zip(preds, targets)]
        metric.update(preds_orig, [evaluation_target(t) for t in targets])
        return preds
    def validation_step(self, batch: Any, batch_idx: int) -> list[dict]:
        return self._eval_step(batch, self.val_map, "val")

    def test_step(self, batch: Any, batch_idx: int) -> list[dict]:
        return self._eval_step(batch, self.test_map, "test")

    def _log_map(self, metric: MeanAveragePrecision, stage: str) -> dict[str, torch.Tensor]:
        values = self.log_epoch_metric(metric, stage, LOGGED_MAP_KEYS)
        self.log_metrics(per_class_ap(values, self.hparams.class_names), stage)
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        values = self._log_map(self.test_map, "test")
        if self.trainer.is_global_zero:
            print(format_coco_table(values))
            print(format_class_ap_table(values, self.hparams.class_names))

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        """Detections in original-image pixels, with each target's ``image_id`` when the batch has one."""
        images, targets = batch
        sizes = sizes_of(targets)
        preds = self.postprocess(self.model(images, sizes), sizes)
        return [
            {**p, "boxes": rescale_boxes(p["boxes"], t["size"], t["orig_size"]), "image_id": t["image_id"]}
            for p, t in zip(preds, targets)
        ]

    # -- export (tools/export.py) -------------------------------------------------------------------
    @property
    def export_output_names(self) -> tuple[str, ...]:
        """Names of the exported network's outputs (the model's raw outputs, see ``EXPORTERS``)."""
        return EXPORTERS[self.hparams.model].names

    def export_module(self) -> torch.nn.Module:
        """For ``tools/export.py``: unpadded images in [0, 1] -> the detector's raw outputs (FCOS: class logits,
        l/t/r/b distances in strides, centerness logits). Post-processing (decoding, thresholds, NMS) stays outside
        the exported file: :meth:`detections_from_export` applies it to the outputs of any runtime."""
        return RawDetectorOutputs(self.model, EXPORTERS[self.hparams.model].to_tensors).eval()

    def export_example(self, batch_size: int = 1, size: Sequence[int] = (512, 512)) -> tuple[torch.Tensor]:
        """Example input: ``(batch_size, 3, H, W)`` uniform images in [0, 1]; the exported file is fixed to ``size``."""
        generator = torch.Generator().manual_seed(batch_size)
        return (torch.rand(batch_size, 3, int(size[0]), int(size[1]), generator=generator),)

    @torch.no_grad()
    def detections_from_export(self, outputs: Sequence[Any], image_size: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The exported network's post-processing: its raw outputs (tensors or arrays, from TorchScript, onnxruntime,
        ...) for ``(H, W)`` images -> per image ``{"boxes" (N, 4) xyxy pixels, "scores", "labels"}``, as ``forward``
        gives for the same images (with this task's score / NMS / max-detection settings)."""
        tensors = tuple(torch.as_tensor(o, device=self.device) for o in outputs)
        size = (int(image_size[0]), int(image_size[1]))
        decoded = EXPORTERS[self.hparams.model].from_tensors(tensors, size, self.model)
        return self.postprocess(decoded, [size] * tensors[0].shape[0])


@dataclass(frozen=True)
class DetectorExport:
    """How one detector model exports: output names, ``to_tensors(outputs)`` -> its raw output tensors (each with the
    batch first), ``from_tensors(tensors, (H, W), model)`` -> the outputs its post-processor takes."""

    names: tuple[str, ...]
    to_tensors: Callable[[Any], tuple[torch.Tensor, ...]]
    from_tensors: Callable[[tuple[torch.Tensor, ...], tuple[int, int], torch.nn.Module], Any]


# One entry per model of the trio table (a new model adds its own).
EXPORTERS = {"fcos": DetectorExport(FCOS_EXPORT_NAMES, fcos_export_tensors, fcos_output_from_export)}


class RawDetectorOutputs(torch.nn.Module):
    """Images ``(B, 3, H, W)`` in [0, 1], unpadded -> a detector's raw output tensors (the exported network)."""

    def __init__(self, model: torch.nn.Module, to_tensors: Callable[[Any], tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.model, self.to_tensors = model, to_tensors

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.to_tensors(self.model(images)))


def evaluation_target(target: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ground truth COCO evaluation scores against: ``target["original"]`` when the DataModule gives it (the
    dataset's annotations in original pixels, with their areas), else the training target mapped back."""
    if "original" in target:
        return target["original"]
    gt = {"boxes": rescale_boxes(target["boxes"].float(), target["size"], target["orig_size"]), "labels": target["labels"]}
    if "iscrowd" in target:
        gt["iscrowd"] = target["iscrowd"]
    return gt


def sizes_of(targets: list[dict[str, torch.Tensor]]) -> list[tuple[int, int]]:
    """The unpadded (h, w) of each image of a batch, from its target's ``size``."""
    return [(int(t["size"][0]), int(t["size"][1])) for t in targets]


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
