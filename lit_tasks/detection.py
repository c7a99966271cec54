"""Object detection task: one LightningModule; ``model`` picks a detector trio (network, criterion, post-processor).

Every detector is built once by its ``build_<name>`` function (``lit_tasks/models/detection/<name>.py``, its export
adapter in ``export.py`` there) as three modules: ``self.model(images, image_sizes) -> outputs``,
``self.criterion(outputs, targets) -> {"loss_*": ...}`` (already weighted; the task sums them) and
``self.postprocess(outputs, image_sizes) -> detections``. Implemented:
``model="fcos"`` (FCOS with the mmdetection/FCOS-repo improvements, :mod:`lit_tasks.models.detection.fcos`),
``model="vfnet"`` (VarifocalNet: ATSS, star-shaped deformable refinement, varifocal loss,
:mod:`lit_tasks.models.detection.vfnet`) and ``model="detr"`` (DETR: set prediction with Hungarian matching,
:mod:`lit_tasks.models.detection.detr`, loadable from the published weights).

Batches (torchvision's detection convention): images ``(B, 3, H, W)`` float in [0, 1], zero-padded;
targets a list of dicts with ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,) int64 in [0, num_classes)
(no background class), optional ``iscrowd`` (N,) (crowd boxes are not trained on but count as ignore
regions in COCO mAP), ``size`` (h, w) before padding and ``orig_size`` (h, w) of the original image.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_tasks.base import STAGES, BaseTask
from lit_tasks.callbacks.detection_images import DetectionImageLogger
from lit_tasks.losses.iou import box_loss as iou_loss_by_name
from lit_tasks.metrics.coco import (LOGGED_MAP_KEYS, coco_map_metric, evaluation_target, format_class_ap_table,
                                   format_coco_table, per_class_ap)
from lit_tasks.models.detection.convert import read_detection_weights
from lit_tasks.models.detection.detr import DETR_OPTIONS, build_detr
from lit_tasks.models.detection.detr_convert import load_pretrained_detr
from lit_tasks.models.detection.detr_queries import check_query_options
from lit_tasks.models.detection.export import EXPORTERS, RawDetectorOutputs
from lit_tasks.models.detection.fcos import build_fcos
from lit_tasks.models.detection.recipes import PARAM_GROUP_RULES, RECIPES
from lit_tasks.models.detection.vfnet import build_vfnet
from lit_tasks.models.published import published_weights
from lit_tasks.ops.assigners import FCOS_REGRESS_RANGES, check_regress_ranges
from lit_tasks.ops.box_ops import rescale_boxes
from lit_tasks.ops.images import sizes_of, stack_padded
from lit_tasks.param_groups import ParamGroupRules, linear_scaling, scale_lr
from lit_tasks.run.lightning_seams import attached_trainer
from lit_tasks.schedules import warmup_cosine

MODELS = ("fcos", "vfnet", "detr")


class DetectionTask(BaseTask):
    """Train, evaluate (COCO mAP) and run a detector.

    Options of one model are ignored by the others; an option the docstring lists under several models is
    shared. Options left at None take the chosen model's recipe (``RECIPES``, :mod:`lit_tasks.models.detection.recipes`:
    FCOS / VFNet SGD lr 0.01, 500 linear warm-up steps from 1/3 (FCOS) / 0.1 (VFNet) of the LR; DETR AdamW lr 1e-4,
    backbone at 0.1x, no warm-up).
    The default optimizer's parameter groups are the recipe's too (``PARAM_GROUP_RULES``, cited there): FCOS and
    VFNet train biases at 2x the LR without weight decay, DETR decays every parameter. Bad values raise ValueError
    naming the option when the task is built.

    Args:
        num_classes: foreground classes (no background), linked from the DataModule.
        model: ``"fcos"``, ``"vfnet"`` or ``"detr"``.

        Backbone (every model):
        backbone: timm model name with ``features_only`` support (FCOS / VFNet: strides 8/16/32 used as C3-C5;
            DETR: the last stage, C5).
        pretrained: load timm backbone weights (needs network access; False by default).
        frozen_stages: freeze the stem and the first k stages (mmdet's ``frozen_stages``; -1 none). None = the
            recipe: 1 with ``pretrained`` or ``pretrained_weights``, -1 from scratch.
        frozen_bn: the backbone's BatchNorms outside the frozen stages: ``true`` freezes statistics and affine,
            ``"statistics"`` the running statistics only (weight and bias train: mmdet ``norm_eval=True`` with
            ``requires_grad=True``), ``false`` none. None = the recipe: with ``pretrained`` or
            ``pretrained_weights`` (2 images per device give useless batch statistics) True for FCOS (mmdet's caffe
            ResNet, ``requires_grad=False``) and DETR (FrozenBatchNorm2d), ``"statistics"`` for VFNet; False from
            scratch (a randomly initialised network cannot train with fixed identity normalisation; timm
            zero-initialises each residual block's last BN, which frozen stays 0).
        backbone_lr_ratio: the backbone's learning rate relative to the rest; None = the recipe (1.0 FCOS /
            VFNet, 0.1 DETR: 1e-5 against 1e-4).
        channels_last: run the backbone in channels_last memory format (the FPN and FCOS's GroupNorm head follow
            it). On 2 CPU cores, FCOS R50 at 512 px: backbone forward
            ~20 % faster, whole inference ~5 % (benchmarks/detection_speed.py); tiny models on tiny images
            gain nothing (the demo turns it off).

        FCOS and VFNet:
        fpn_channels: FPN and head width (256 in the papers; smaller for CPU demos).
        head_convs: stacked convs per head tower; None = the paper's (FCOS 4, VFNet 3).
        regress_ranges: size range per level P3..P7, ``[[lo, hi], ...]`` limits on max(l, t, r, b) in input pixels
            (mmdet's ``regress_ranges``). None = the paper's ranges for ~800-px images,
            ``[[-1, 64], [64, 128], [128, 256], [256, 512], [512, inf]]``; smaller inputs can scale them down so
            large objects still reach the coarse levels. FCOS: the target assignment; VFNet: the scale of each
            level's initial box (the upper ends, the last twice the one before) and the targets with
            ``use_atss=False``.
        center_sampling_radius: centre sampling radius in strides (0 disables); VFNet: FCOS targets only. None =
            the model's: 1.5 for FCOS (mmdet ``center_sampling=True``), 0 for VFNet (``center_sampling=False``).

        FCOS:
        points: where each feature cell's location is: ``"center"`` (x + 1/2) x stride (mmdetection, the FCOS
            repo) or ``"torchvision"`` (x x stride, torchvision's FCOS, whose published weights need it; see
            :func:`~lit_tasks.models.detection.fcos.fcos_points`). None = ``"center"``, or what
            ``pretrained_weights`` needs.
        box_loss: ``"giou"`` (default, FCOS imprv), ``"iou"`` (-ln IoU), ``"linear_iou"``, ``"diou"`` or ``"ciou"``.
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2.0).

        VFNet:
        use_atss: ATSS assignment over one 8-stride square anchor per location (the paper); False: FCOS targets.
        vfl_alpha, vfl_gamma: varifocal loss parameters (0.75, weighting the negatives; 2.0).

        DETR (defaults: the paper's R-50 model, REFERENCE.md §5):
        num_queries: object queries (100), the most objects an image can have detected.
        d_model, nheads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: the transformer
            (256, 8, 6, 6, 2048, 0.1).
        dilation: DC5, the last backbone stage dilated (output stride 16).
        position_embedding: ``"sine"`` (normalised over each image's unpadded area) or ``"learned"``.
        aux_loss: the set loss on every decoder layer (True).
        eos_coef: weight of the no-object class in the class loss (0.1).
        cost_class, cost_bbox, cost_giou: Hungarian matching costs (1, 5, 2).
        weight_ce, weight_bbox, weight_giou: loss weights (1, 5, 2).
        dn_groups, dn_label_noise, dn_box_noise, query_groups: training-only convergence aids, off by default (0,
            0.2, 0.4, 1): DN-DETR denoising query groups with their label / box noise, Group DETR query sets
            (:mod:`lit_tasks.models.detection.detr_queries`); ``aux_dense_head``: Co-DETR's auxiliary FCOS head on
            the encoder (:mod:`lit_tasks.models.detection.detr_aux_head`); ``anchor_queries``: DAB-DETR's anchor-box
            queries, ``query_selection`` (anchors from the auxiliary head's best boxes) and ``selection_content``
            (content queries from the encoder memory there), changes of the network
            (:class:`~lit_tasks.models.detection.detr.DETR`). Off by default.
        Published weights (every model):
        pretrained_weights: a local weights file loaded when the task is built, as published or converted once by
            ``tools/convert_weights.py``: torchvision's ``fcos_resnet50_fpn`` (FCOS), mmdetection's VFNet
            checkpoints (VFNet), a facebookresearch/detr ``.pth`` or Hugging Face ``DetrForObjectDetection`` file or a
            ``tools/convert_detr.py`` output (DETR). The architecture options the file needs are checked (a
            difference is an error naming it; an option left at None takes the file's value) and every key is
            matched both ways (see ``lit_tasks.models.published``); the file holds the backbone too (leave
            ``pretrained`` off). Checkpoints of a fit do not name the file again (its weights are in them).
        pretrained_class_rows: the file's class-head row for each of our classes (e.g. COCO category ids for a
            COCO subset); reinit_class_head: load everything but the class head (another dataset). Published
            COCO models have 91 class rows (torchvision: index = COCO category id) or 92 logits (DETR: plus
            no-object): for another number of classes, give one of the two; see README "Start from published
            weights".

        Evaluation-time (not saved in checkpoints: ``test --ckpt_path`` takes them from its own config):
        score_threshold: minimum score kept at inference (0.05; FCOS / VFNet).
        score_threshold_on: FCOS: the score ``score_threshold`` applies to, ``"class"`` (the raw class probability)
            or ``"joint"`` (sqrt(class x centerness), torchvision's: with 0.2 it reproduces its evaluation).
        pre_nms_top_k: candidates per level before NMS (1000; FCOS / VFNet).
        nms_threshold: class-wise NMS IoU (0.6; FCOS / VFNet).
        max_detections: detections kept per image (100); DETR keeps its best-scoring queries (no threshold, no NMS).
        num_log_images: validation images drawn with boxes to TensorBoard each epoch (0 disables).

        Optimisation:
        lr, weight_decay, momentum: the default optimizer (used when ``optimizer`` is not given): SGD with
            momentum for FCOS / VFNet, AdamW for DETR (``momentum`` unused). ``lr`` None = the recipe.
        warmup_steps: linear LR warm-up of the default scheduler; None = the recipe (500; DETR 0).
        warmup_ratio: the fraction of the LR the warm-up starts from (mmcv's ``warmup_ratio``: ``ratio + (1 -
            ratio) * step / warmup_steps``); None = the recipe (FCOS 1/3, VFNet 0.1; DETR none: ``(step + 1) /
            warmup_steps``).
        lr_drop_epochs: the default scheduler multiplies the LR by ``lr_gamma`` at each of these epochs (the
            recipes: [8, 11] of 12 for FCOS / VFNet, [200] of 300 for DETR); None = cosine decay to 0 over the fit.
        lr_gamma: the factor of each drop (0.1, every recipe).
        lr_base_batch_size: the linear scaling rule (Goyal et al. 2017; mmdet ``auto_scale_lr``): ``lr`` is for
            this many images per step, and the optimizer's LR (default or injected) is scaled by the run's images
            per step (batch size x devices x accumulation) / this. None: ``lr`` as given.
        class_names: names of the classes (linked from the DataModule; used for pictures and by users).
        optimizer, lr_scheduler, lr_scheduler_interval: injected callables (``--model.optimizer=AdamW``);
            None = the default optimizer and scheduler above, stepped per step (see ``BaseTask``).
    """

    monitor = "val/map"
    mode = "max"
    eval_options = ("score_threshold", "score_threshold_on", "pre_nms_top_k", "nms_threshold", "max_detections",
                    "num_log_images")
    logged_metric_keys = LOGGED_MAP_KEYS

    def __init__(
        self,
        num_classes: int = 80,
        model: Literal["fcos", "vfnet", "detr"] = "fcos",
        backbone: str = "resnet50",
        pretrained: bool = False,
        frozen_stages: int | None = None,
        frozen_bn: bool | Literal["statistics"] | None = None,
        backbone_lr_ratio: float | None = None,
        channels_last: bool = True,
        fpn_channels: int = 256,
        head_convs: int | None = None,
        box_loss: str = "giou",
        center_sampling_radius: float | None = None,
        regress_ranges: list[list[float]] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        points: Literal["center", "torchvision"] | None = None,
        use_atss: bool = True,
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        num_queries: int = 100,
        d_model: int = 256,
        nheads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        dilation: bool = False,
        position_embedding: Literal["sine", "learned"] = "sine",
        aux_loss: bool = True,
        eos_coef: float = 0.1,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        dn_groups: int = 0,
        dn_label_noise: float = 0.2,
        dn_box_noise: float = 0.4,
        query_groups: int = 1,
        aux_dense_head: bool = False,
        anchor_queries: bool = False,
        query_selection: bool = False,
        selection_content: bool = False,
        pretrained_weights: str | None = None,
        pretrained_class_rows: list[int] | None = None,
        reinit_class_head: bool = False,
        score_threshold: float = 0.05,
        score_threshold_on: Literal["class", "joint"] = "class",
        pre_nms_top_k: int = 1000,
        nms_threshold: float = 0.6,
        max_detections: int = 100,
        num_log_images: int = 4,
        lr: float | None = None,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int | None = None,
        warmup_ratio: float | None = None,
        lr_drop_epochs: list[int] | None = None,
        lr_gamma: float = 0.1,
        lr_base_batch_size: int | None = None,
        class_names: list[str] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    def argument_problems(self, args: dict[str, Any]) -> list[str]:
        """Options that cannot work, each named (DETR's architecture values are checked by
        :func:`lit_tasks.models.detection.detr.check_detr_args` when it is built)."""
        o, problems = args, super().argument_problems(args)
        for check, value in ((iou_loss_by_name, o["box_loss"]), (check_regress_ranges, o["regress_ranges"])):
            try:
                check(value)
            except ValueError as error:  # the message names the option and the valid choices
                problems.append(str(error))
        weights, rows = o["pretrained_weights"], o["pretrained_class_rows"]
        checks = [
            (o["model"] in MODELS, f"unknown model {o['model']!r}; choose one of {list(MODELS)}"),
            (o["num_classes"] >= 1, f"num_classes must be >= 1, got {o['num_classes']}"),
            *((o[k] >= 1, f"{k} must be >= 1, got {o[k]}")
              for k in ("fpn_channels", "pre_nms_top_k", "max_detections")),
            *((o[k] is None or o[k] >= 1, f"{k} must be >= 1 or null, got {o[k]}")
              for k in ("head_convs", "lr_base_batch_size")),
            (o["frozen_stages"] is None or o["frozen_stages"] >= -1,
             f"frozen_stages must be >= -1, got {o['frozen_stages']}"),
            (0.0 <= o["score_threshold"] <= 1.0, f"score_threshold must be in [0, 1], got {o['score_threshold']}"),
            (0.0 < o["nms_threshold"] <= 1.0, f"nms_threshold must be in (0, 1], got {o['nms_threshold']}"),
            (o["center_sampling_radius"] is None or o["center_sampling_radius"] >= 0,
             f"center_sampling_radius must be >= 0 or null, got {o['center_sampling_radius']}"),
            (o["warmup_ratio"] is None or 0.0 <= o["warmup_ratio"] <= 1.0,
             f"warmup_ratio must be in [0, 1] or null, got {o['warmup_ratio']}"),
            (o["frozen_bn"] in (None, True, False, "statistics"),
             f"frozen_bn must be true, false, 'statistics' or null, got {o['frozen_bn']!r}"),
            (0.0 <= o["focal_alpha"] <= 1.0, f"focal_alpha must be in [0, 1], got {o['focal_alpha']}"),
            *((o[k] >= 0, f"{k} must be >= 0, got {o[k]}")
              for k in ("focal_gamma", "vfl_alpha", "vfl_gamma", "weight_decay", "momentum")),
            (o["lr"] is None or o["lr"] > 0, f"lr must be > 0, got {o['lr']}"),
            (o["backbone_lr_ratio"] is None or o["backbone_lr_ratio"] >= 0,
             f"backbone_lr_ratio must be >= 0, got {o['backbone_lr_ratio']}"),
            (o["warmup_steps"] is None or o["warmup_steps"] >= 0,
             f"warmup_steps must be >= 0, got {o['warmup_steps']}"),
            (not weights or os.path.isfile(weights), f"pretrained_weights: no file {weights}"),
            (o["points"] in (None, "center", "torchvision"),
             f"points must be 'center' or 'torchvision', got {o['points']!r}"),
            (o["score_threshold_on"] in ("class", "joint"),
             f"score_threshold_on must be 'class' or 'joint', got {o['score_threshold_on']!r}"),
            (weights or (rows is None and not o["reinit_class_head"]),
             "pretrained_class_rows / reinit_class_head choose the class head of pretrained_weights; none is given"),
            (rows is None or not o["reinit_class_head"], "give pretrained_class_rows or reinit_class_head, not both"),
            (rows is None or len(rows) == o["num_classes"],
             f"pretrained_class_rows needs one row per class ({o['num_classes']}), got {rows}"),
        ]
        problems += check_query_options(o["dn_groups"], o["dn_label_noise"], o["dn_box_noise"], o["query_groups"])
        if o["model"] != "detr" and (o["dn_groups"] or o["query_groups"] != 1 or o["aux_dense_head"]
                                     or o["anchor_queries"] or o["query_selection"] or o["selection_content"]):
            problems.append("dn_groups / query_groups / aux_dense_head / anchor_queries / query_selection / "
                            f"selection_content are DETR's, not model {o['model']!r}'s")
        return problems + [message for ok, message in checks if not ok]

    # -- parts -----------------------------------------------------------------------------------
    def recipe(self, name: str) -> Any:
        """The option ``name``, or the model's recipe value (``RECIPES``) where it is None."""
        value = self.hparams.get(name)
        return RECIPES[self.hparams.model][name] if value is None else value

    def frozen(self) -> tuple[int, bool | str]:
        """``(frozen_stages, frozen_bn)`` in effect: as given, else the recipe's (frozen with pretrained weights)."""
        hp = self.hparams
        pretrained = hp.pretrained or bool(hp.get("pretrained_weights"))
        frozen_stages = hp.frozen_stages if hp.frozen_stages is not None else (1 if pretrained else -1)
        recipe_bn = RECIPES[hp.model]["frozen_bn"] if pretrained else False
        return frozen_stages, hp.frozen_bn if hp.frozen_bn is not None else recipe_bn

    def configure_models(self) -> None:
        """Build the trio of ``hparams.model`` once: ``self.model``, ``self.criterion``, ``self.postprocess``."""
        hp = self.hparams
        published = published_weights(hp, "DetectionTask", read_detection_weights) if hp.model != "detr" else None
        frozen_stages, frozen_bn = self.frozen()
        backbone = dict(backbone=hp.backbone, pretrained=hp.pretrained, frozen_stages=frozen_stages,
                        frozen_bn=frozen_bn)
        inference = dict(score_threshold=self.score_threshold, pre_nms_top_k=self.pre_nms_top_k,
                         nms_threshold=self.nms_threshold, max_detections=self.max_detections)
        ranges = FCOS_REGRESS_RANGES if hp.regress_ranges is None else tuple(map(tuple, hp.regress_ranges))
        head_convs = {} if hp.head_convs is None else {"head_convs": hp.head_convs}  # None: the model's default
        match hp.model:
            case "fcos":
                self.model, self.criterion, self.postprocess = build_fcos(
                    hp.num_classes, **backbone, fpn_channels=hp.fpn_channels, **head_convs,
                    box_loss=hp.box_loss, focal_alpha=hp.focal_alpha, focal_gamma=hp.focal_gamma,
                    regress_ranges=ranges, center_sampling_radius=self.recipe("center_sampling_radius"),
                    points=hp.points or "center", score_threshold_on=self.score_threshold_on, **inference)
            case "vfnet":
                self.model, self.criterion, self.postprocess = build_vfnet(
                    hp.num_classes, **backbone, fpn_channels=hp.fpn_channels, **head_convs, use_atss=hp.use_atss,
                    regress_ranges=ranges, center_sampling_radius=self.recipe("center_sampling_radius"),
                    vfl_alpha=hp.vfl_alpha, vfl_gamma=hp.vfl_gamma, **inference)
            case "detr":
                options = {name: hp[name] for name in DETR_OPTIONS}
                self.model, self.criterion, self.postprocess = build_detr(
                    hp.num_classes, **backbone, **options, max_detections=self.max_detections)
                if hp.pretrained_weights:
                    load_pretrained_detr(self.model, hp.pretrained_weights, hp.pretrained_class_rows,
                                         hp.reinit_class_head, build_args={"backbone": hp.backbone, **options})
        if published is not None:
            published.load_into(self.model, hp.pretrained_class_rows, hp.reinit_class_head)
            hint = published.eval_hint({**inference, "score_threshold_on": self.score_threshold_on})
            if hint:
                rank_zero_info(hint)
        if hp.channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint holds the weights ``pretrained_weights`` gave: it names no file (evaluating it needs none),
        and records the freezing the file implied, so the network it rebuilds has the same modules."""
        hp = checkpoint.get("hyper_parameters")
        if hp and hp.get("pretrained_weights"):
            frozen_stages, frozen_bn = self.frozen()
            checkpoint["hyper_parameters"] = {**hp, "pretrained_weights": None, "pretrained_class_rows": None,
                                              "reinit_class_head": False, "frozen_stages": frozen_stages,
                                              "frozen_bn": frozen_bn}
            checkpoint["pretrained_weights_file"] = hp["pretrained_weights"]  # where the start came from

    def configure_metrics(self) -> None:
        self.metrics = nn.ModuleDict({stage: coco_map_metric(class_metrics=True) for stage in STAGES})

    def configure_callbacks(self) -> list[pl.Callback]:
        return [DetectionImageLogger(num_images=self.num_log_images)] if self.num_log_images > 0 else []

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detect objects in [0, 1] images; boxes in input pixels.

        A list of (3, H_i, W_i) images is padded, each image evaluated as if alone (in ``eval()``: padded to its own
        multiple of 32, as mmdet tests); a (B, 3, H, W) tensor is run as given, every image filling it (as the
        exported network runs).
        """
        batch, sizes = stack_padded(images, size_divisor=32)
        as_given = torch.is_tensor(images) and images.ndim == 4
        return self.postprocess(self.model(batch, None if as_given else sizes), sizes)

    # -- steps -------------------------------------------------------------------------------------
    def compute_losses(self, batch: tuple[torch.Tensor, list[dict]], outputs: Any = None) -> dict[str, torch.Tensor]:
        """The criterion's weighted ``loss_*`` terms (entries not named ``loss_*`` are logged only)."""
        images, targets = batch
        if outputs is None:  # DETR's denoising queries are built from the targets (training only)
            ground_truth = {"targets": targets} if self.hparams.model == "detr" else {}
            outputs = self.model(images, sizes_of(targets), **ground_truth)
        return self.criterion(outputs, targets)

    def evaluation_step(self, batch: tuple[torch.Tensor, list[dict]], stage: str,
                        dataloader_idx: int = 0) -> list[dict]:
        """Loss on the training targets; mAP of the detections, mapped to original pixels, against the dataset's
        own annotations (``target["original"]``: boxes before any resize or clipping, with their ``area``), so a
        small object a downscale erased still counts as a miss; without them, the targets mapped back."""
        images, targets = batch
        sizes = sizes_of(targets)
        outputs = self.model(images, sizes)
        self.log_loss(stage, self.compute_losses(batch, outputs), len(targets))
        preds = self.postprocess(outputs, sizes)
        preds_orig = [{**p, "boxes": rescale_boxes(p["boxes"], t["size"], t["orig_size"])}
                      for p, t in zip(preds, targets)]
        self.metrics[stage].update(preds_orig, [evaluation_target(t) for t in targets])
        return preds

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        """Detections in original-image pixels, with each target's ``image_id`` when the batch has one."""
        images, targets = batch
        sizes = sizes_of(targets)
        preds = self.postprocess(self.model(images, sizes), sizes)
        return [
            {**p, "boxes": rescale_boxes(p["boxes"], t["size"], t["orig_size"]), "image_id": t["image_id"]}
            for p, t in zip(preds, targets)
        ]

    # -- epoch ends ---------------------------------------------------------------------------------
    def log_stage_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """COCO mAP (``LOGGED_MAP_KEYS``) and the AP of each class with ground truth (``AP/<class name>``)."""
        values = super().log_stage_metrics(stage)
        self.log_metrics(per_class_ap(values, self.hparams.class_names), stage)
        return values

    def test_table(self, values: dict[str, torch.Tensor]) -> str:
        """pycocotools' summary, then AP / AR per class."""
        return format_coco_table(values) + "\n" + format_class_ap_table(values, self.hparams.class_names)

    # -- optimisation --------------------------------------------------------------------------------
    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The recipe's optimizer: SGD with momentum (FCOS, VFNet), AdamW (DETR), at ``lr`` (None: the recipe's)."""
        hp = self.hparams
        if RECIPES[hp.model]["optimizer"] == "adamw":
            return torch.optim.AdamW(params, lr=self.recipe("lr"), weight_decay=hp.weight_decay)
        return torch.optim.SGD(params, lr=self.recipe("lr"), momentum=hp.momentum, weight_decay=hp.weight_decay)

    def warmup_steps(self) -> int:
        """``warmup_steps``, or the recipe's (500; DETR 0)."""
        return int(self.recipe("warmup_steps"))

    def default_scheduler(self, optimizer: torch.optim.Optimizer,
                          total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """Linear warm-up from ``warmup_ratio`` of the LR, then x ``lr_gamma`` at each of ``lr_drop_epochs`` (mmdet's
        step policy, DETR's StepLR), or cosine decay over the fit without them; stepped per optimizer step."""
        drops, start = self.hparams.lr_drop_epochs, self.recipe("warmup_ratio")
        if not drops:
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, warmup_cosine(self.warmup_steps(), total_steps, warmup_start=start))
        return self.step_decay(optimizer, drops, self.hparams.lr_gamma, warmup_start=start)

    def lr_scale(self) -> float:
        """``lr_base_batch_size``'s linear scaling rule (:func:`~lit_tasks.param_groups.linear_scaling`); 1 without it."""
        base = self.hparams.get("lr_base_batch_size")
        return 1.0 if base is None else linear_scaling(attached_trainer(self), base, "DetectionTask")

    def param_group_rules(self) -> ParamGroupRules:
        """The chosen model's recipe (``PARAM_GROUP_RULES``)."""
        return PARAM_GROUP_RULES[self.hparams.model]

    def param_groups(self) -> list[dict[str, Any]]:
        """BaseTask's groups (the recipe's rules), the backbone's parameters in groups of their own at
        ``backbone_lr_ratio`` times their rule's ratio, every group scaled by :meth:`lr_scale` (through ``lr_ratio``,
        so injected optimizers follow too)."""
        groups = scale_lr(super().param_groups(), float(self.recipe("backbone_lr_ratio")),
                          self.model.backbone.parameters())
        return scale_lr(groups, self.lr_scale())

    # -- export (tools/export.py) -------------------------------------------------------------------
    @property
    def export_output_names(self) -> tuple[str, ...]:
        """Names of the exported network's outputs (the model's raw outputs, see ``EXPORTERS``)."""
        return EXPORTERS[self.hparams.model].names

    @property
    def export_opset(self) -> int:
        """ONNX opset of the export (``EXPORTERS``: 19 for VFNet's ``DeformConv``, else 17)."""
        return EXPORTERS[self.hparams.model].opset

    def export_module(self) -> torch.nn.Module:
        """For ``tools/export.py``: unpadded images in [0, 1] -> the detector's raw outputs (FCOS: class logits,
        l/t/r/b distances in strides, centerness logits; VFNet: class logits, refined l/t/r/b in pixels; DETR: the last
        decoder layer's logits and relative boxes). Post-processing (decoding, thresholds, NMS, top queries) stays
        outside the exported file: :meth:`detections_from_export` applies it to the outputs of any runtime."""
        return RawDetectorOutputs(self.model, EXPORTERS[self.hparams.model].to_tensors).eval()

    def export_example(self, batch_size: int = 1, size: Sequence[int] | None = None) -> tuple[torch.Tensor]:
        """Example input: ``(batch_size, 3, H, W)`` uniform images in [0, 1]; the exported file is fixed to ``size``
        (512 x 512 by default)."""
        return self.random_images(batch_size, size or (512, 512))

    @torch.no_grad()
    def detections_from_export(self, outputs: Sequence[Any], image_size: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The exported network's post-processing: its raw outputs (tensors or arrays, from TorchScript, onnxruntime,
        ...) for ``(H, W)`` images -> per image ``{"boxes" (N, 4) xyxy pixels, "scores", "labels"}``, as ``forward``
        gives for the same images (with this task's score / NMS / max-detection settings)."""
        tensors = tuple(torch.as_tensor(o, device=self.device) for o in outputs)
        size = (int(image_size[0]), int(image_size[1]))
        decoded = EXPORTERS[self.hparams.model].from_tensors(tensors, size, self.model)
        return self.postprocess(decoded, [size] * tensors[0].shape[0])
