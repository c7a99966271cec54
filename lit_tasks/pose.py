"""Top-down human pose regression with Residual Log-likelihood Estimation (RLE; Li et al., ICCV 2021).

Method (REFERENCE.md §8):

1. A person crop ``(B, 3, H, W)`` in [0, 1] goes through a timm backbone, global average pooling and two
   linear heads (:class:`~lit_tasks.models.pose.rle.RLERegressor`, the official ``RegressFlow``): per keypoint a
   location ``mu_hat`` normalised to the crop (``x / W - 0.5``, ``y / H - 0.5``) and a scale ``sigma_hat`` in
   (0, 1) (sigmoid).
2. Training maximises the likelihood of the ground truth under ``1 / sigma * G_phi(mu_bar) * Q(mu_bar)``, ``mu_bar
   = (mu_hat - mu_gt) / sigma_hat``, with a RealNVP flow ``G_phi`` learned jointly (:class:`~lit_tasks.losses.rle.
   RLELoss`, paper eq. 9-11); ``loss="l1"`` is the plain-regression baseline of the paper's Table 1 on the same
   network. Only labelled keypoints (v > 0) count. The loss is a negative log-*density* and goes below zero
   as the model gets confident: that is expected (jeffffffli/res-loglikelihood-regression#5), not a bug.
3. Inference is the network alone -- the flow exists only in the loss -- with the flip test: the mirrored
   crop's prediction, swapped left/right, is averaged with the plain one. Keypoint score = ``mean(1 - sigma)``.
4. Evaluation (validation and test): predictions go back to original-image pixels through the crop's
   inverse affine map; OKS AP / AR by pycocotools' keypoint ``COCOeval`` (faster-coco-eval backend) with the
   dataset's sigmas on the whole ground truth, after OKS NMS for poses from detector boxes; PCK@0.05 with
   box normalisation (``max(w, h)`` of the ground-truth box), its AUC over thresholds 0..0.95 and EPE, as
   mmpose computes them, on crops cut from ground-truth boxes. PCK and AUC are the same in crop and image
   pixels (the crop is a similarity of the image: distances and the box scale together), EPE is in image
   pixels as mmpose's ``EPE`` metric (and therefore weighted towards large people).

Instance score (COCO results and AP ranking): ``box_score + mean_k(score_k) + max_k(score_k)``, the official RLE
``validate`` and mmpose's ``score_mode="bbox_rle"`` (``box_score`` = detector score, 1 for ground-truth boxes;
the official GT-box validation leaves it out, a constant that does not change the ranking). mmpose's default
``bbox_keypoint`` mode (box score x mean of the scores above 0.2) is *not* what RLE's configs use.

Batches: see :mod:`datamodules.keypoints.coco` (``image``, ``keypoints`` crop pixels, ``keypoints_image``,
``matrix_inv``, ``box``, ``box_score``, ``image_id``, ``id``, ``category_id``, ``area``, ``crop_area``,
``from_detector``, ``gt``); training reads ``image`` and ``keypoints`` only.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_tasks.base import STAGES, BaseTask
from lit_tasks.callbacks.pose_images import PoseImageLogger
from lit_tasks.losses.rle import Q_DISTRIBUTIONS, CoordinateL1Loss, RLELoss
from lit_tasks.metrics.pose import EPE, PCK, PCKAUC, KeypointAP, format_keypoint_table
from lit_tasks.models.pose.convert import read_pose_weights
from lit_tasks.models.pose.rle import (
    KeypointPredictor,
    RLERegressor,
    keypoint_scores,
    merge_flipped,
    normalized_to_pixels,
    pixels_to_normalized,
)
from lit_tasks.models.published import published_weights
from lit_tasks.ops.keypoints import COCO_FLIP_INDEX, affine_points, crop_to_image
from lit_tasks.ops.oks import COCO_KEYPOINT_SIGMAS

LOGGED_AP_KEYS = ("map", "map_50", "map_75", "map_medium", "map_large", "mar")


class PoseTask(BaseTask):
    """Top-down keypoint regression (RLE or plain L1), evaluated with OKS AP and PCK.

    Args:
        num_keypoints: K; linked from the DataModule.
        model: ``"rle"`` (the regression network of the paper; the loss picks RLE or its baseline).
        backbone: timm model name (``resnet50`` in the paper); its last stage is pooled.
        pretrained: timm ImageNet weights (downloads; False keeps everything offline).
        frozen_stages, frozen_bn: as :func:`~lit_tasks.models.backbone.build_backbone`.
        loss: ``"rle"`` (residual log-likelihood with the flow) or ``"l1"`` (direct regression baseline).
        q_distribution: the RLE residual term: ``"official"`` (default), mmpose's ``"laplace"`` or ``"gaussian"``.
        flow_xavier_gain: ``None`` = the official flow initialisation (PyTorch default), ``0.01`` = mmpose's.
        input_size: ``[H, W]`` of the crops (``[256, 192]``); linked from the DataModule.
        keypoint_names, skeleton: linked from the DataModule (pictures, logs).
        flip_index: keypoint permutation under a mirror, for the flip test; linked from the DataModule
            (None: COCO's when K = 17).
        oks_sigmas: per-keypoint OKS sigmas; linked from the DataModule (None: COCO's 17).
        channels_last: channels-last backbone (faster convolutions on CPU and tensor cores).
        lr: Adam learning rate of the default optimizer (1e-3, official and mmpose).
        lr_drop_epochs: epochs at which the default schedule multiplies the LR by ``lr_gamma``; None = the
            references' [170, 200] (of 270 / 210 epochs).
        lr_gamma: the decay factor (0.1).
        warmup_steps: linear warm-up of the default schedule (0 official; mmpose 500).
        coord_norm: the coordinate head divides by the feature's L2 norm (official RLE); False: plain linear
            (mmpose). None = True, or what ``pretrained_weights`` needs.
        input_normalization: ``"imagenet"`` mean / std, or ``"rle"`` (the official code's mean-only). None =
            ``"imagenet"``, or what ``pretrained_weights`` needs.
        pretrained_weights: a local RLE weights file loaded when the task is built (the official release's
            ``RegressFlow`` file, mmpose's RLE checkpoints, or a ``tools/convert_weights.py`` output): the regressor,
            and the loss's flow with ``loss="rle"`` (with ``"l1"`` the flow is left out). ``backbone`` must be the
            file's; every key is matched both ways. Checkpoints of a fit do not name the file.

        Evaluation-time (not saved in checkpoints: ``test --ckpt_path`` takes them from its own config):
        flip_test: average with the prediction on the mirrored crop (validation, test, predict, forward, export).
        oks_nms_threshold: OKS NMS among poses from detector boxes of one image (0.9, as the references).
        pck_threshold: PCK threshold as a fraction of ``max(box w, box h)`` (0.05).
        num_log_images: validation crops drawn with skeletons to TensorBoard each epoch (0 disables).

        optimizer, lr_scheduler, lr_scheduler_interval: injected callables (see ``BaseTask``).
    """

    monitor = "val/map"
    mode = "max"
    eval_options = ("flip_test", "oks_nms_threshold", "pck_threshold", "num_log_images")
    logged_metric_keys = ("PCK", "AUC", "EPE", *LOGGED_AP_KEYS)
    export_output_names = ("keypoints",)

    def __init__(
        self,
        num_keypoints: int = 17,
        model: Literal["rle"] = "rle",
        backbone: str = "resnet50",
        pretrained: bool = False,
        frozen_stages: int = -1,
        frozen_bn: bool = False,
        loss: Literal["rle", "l1"] = "rle",
        coord_norm: bool | None = None,
        input_normalization: Literal["imagenet", "rle"] | None = None,
        pretrained_weights: str | None = None,
        q_distribution: Literal["official", "laplace", "gaussian"] = "official",
        flow_xavier_gain: float | None = None,
        input_size: list[int] | None = None,
        keypoint_names: list[str] | None = None,
        skeleton: list[list[int]] | None = None,
        flip_index: list[int] | None = None,
        oks_sigmas: list[float] | None = None,
        channels_last: bool = True,
        lr: float = 1e-3,
        lr_drop_epochs: list[int] | None = None,
        lr_gamma: float = 0.1,
        warmup_steps: int = 0,
        flip_test: bool = True,
        oks_nms_threshold: float = 0.9,
        pck_threshold: float = 0.05,
        num_log_images: int = 4,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    def argument_problems(self, args: dict[str, Any]) -> list[str]:
        """Unknown choices, an ``input_size`` that is not ``[H, W]``, per-keypoint lists that disagree with K."""
        k, size, flip, sigmas = args["num_keypoints"], args["input_size"], args["flip_index"], args["oks_sigmas"]
        checks = [
            (args["model"] == "rle", f"unknown model {args['model']!r}; choose 'rle'"),
            (args["loss"] in ("rle", "l1"), f"loss must be 'rle' or 'l1', got {args['loss']!r}"),
            (args["q_distribution"] in Q_DISTRIBUTIONS,
             f"q_distribution must be one of {Q_DISTRIBUTIONS}, got {args['q_distribution']!r}"),
            (size is None or (len(size) == 2 and min(size) >= 1), f"input_size must be [height, width], got {size}"),
            *((args[name] is None or len(args[name]) == k,
               f"{name} has {len(args[name] or ())} entries for num_keypoints={k}")
              for name in ("keypoint_names", "flip_index", "oks_sigmas")),
            (flip is None or sorted(flip) == list(range(k)), f"flip_index {flip} is not a permutation of 0..{k - 1}"),
            (flip is not None or k == 17, f"flip_index is needed for {k} keypoints (COCO's is used only for 17); it is "
                                          "linked from the DataModule, from the left_/right_ keypoint names"),
            (sigmas is not None or k == 17, f"oks_sigmas are needed for {k} keypoints (COCO's are used only for 17); "
                                            "give them with --data.oks_sigmas"),
        ]
        return super().argument_problems(args) + [message for ok, message in checks if not ok]

    # -- parts -----------------------------------------------------------------------------------
    @property
    def input_size(self) -> list[int]:
        """``[H, W]`` of the crops."""
        return list(self.hparams.input_size or (256, 192))

    @property
    def keypoint_flip_index(self) -> list[int]:
        """The mirror permutation (the linked one, else COCO's)."""
        return list(self.hparams.flip_index or COCO_FLIP_INDEX)

    @property
    def sigmas(self) -> list[float]:
        """OKS sigmas (the linked ones, else COCO's)."""
        return [float(s) for s in (self.hparams.oks_sigmas or COCO_KEYPOINT_SIGMAS)]

    def configure_models(self) -> None:
        hp = self.hparams
        self._published = published_weights(hp, "PoseTask", read_pose_weights)  # loaded with the flow, below
        self.model = RLERegressor(backbone=hp.backbone, num_keypoints=hp.num_keypoints, pretrained=hp.pretrained,
                                  frozen_stages=hp.frozen_stages, frozen_bn=hp.frozen_bn,
                                  coord_norm=hp.coord_norm is not False,
                                  input_normalization=hp.input_normalization or "imagenet")
        if hp.channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)

    def configure_losses(self) -> None:
        hp = self.hparams
        # The flow is a submodule of the task, so BaseTask.param_groups hands its parameters to the optimizer.
        self.criterion = (RLELoss(q_distribution=hp.q_distribution, flow_xavier_gain=hp.flow_xavier_gain)
                          if hp.loss == "rle" else CoordinateL1Loss())
        if self._published is not None:  # the regressor and, for the RLE loss, its learned flow
            parts = {"model": self.model, **({"flow": self.criterion.flow} if hp.loss == "rle" else {})}
            self._published.load_into(nn.ModuleDict(parts), drop=() if hp.loss == "rle" else ("flow.",))
            self._published = None

    def configure_metrics(self) -> None:
        """PCK, its AUC and EPE on ground-truth-box crops, OKS AP over every instance; per stage."""
        k = self.hparams.num_keypoints
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleDict({
                "PCK": PCK(k, self.pck_threshold),
                "AUC": PCKAUC(k),
                "EPE": EPE(),
                "ap": KeypointAP(self.sigmas, oks_nms_threshold=self.oks_nms_threshold),
            }) for stage in STAGES
        })

    def configure_callbacks(self) -> list[pl.Callback]:
        return [PoseImageLogger(num_images=self.num_log_images)] if self.num_log_images > 0 else []

    # -- inference ---------------------------------------------------------------------------------
    def predictor(self, flip: bool | None = None) -> KeypointPredictor:
        """The inference graph (crops -> ``(B, K, 3)`` crop-pixel x, y, score), flip-tested per ``flip_test``."""
        flip = self.flip_test if flip is None else flip
        return KeypointPredictor(self.model, self.keypoint_flip_index if flip else None)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(keypoints (B, K, 2) in crop pixels, scores (B, K))`` for crops ``(B, 3, H, W)`` in [0, 1].

        Map the keypoints to the original image with :meth:`crop_to_image` (or the crop's inverse matrix).
        """
        out = self.predictor()(images)
        return out[..., :2], out[..., 2]

    def crop_to_image(self, keypoints: Tensor, boxes_xywh: Tensor, padding: float = 1.25) -> Tensor:
        """Crop-pixel keypoints ``(B, K, 2|3)`` -> image pixels, for crops cut from ``boxes_xywh`` ``(B, 4)`` with the
        standard rule (box widened to the input aspect ratio, times ``padding``; :func:`~lit_tasks.ops.keypoints.
        crop_to_image`)."""
        return crop_to_image(keypoints, boxes_xywh, self.input_size, padding)

    # -- steps -------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any], outputs: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{"loss_rle"}`` or ``{"loss_l1"}`` of the network's ``coords`` and ``sigma`` (``outputs``, else run on the
        crops) for the ``(B, K, 3)`` crop-pixel ground truth (v > 0 counts)."""
        images, keypoints = batch["image"], batch["keypoints"]
        out = self.model(images) if outputs is None else outputs
        target = pixels_to_normalized(keypoints[..., :2].float(), images.shape[-2:])
        return {f"loss_{self.hparams.loss}": self.criterion(out["coords"], out["sigma"], target, keypoints[..., 2] > 0)}

    def evaluation_step(self, batch: dict[str, Any], stage: str, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Loss; flip-tested keypoints in image pixels into PCK / AUC / EPE (ground-truth boxes) and OKS AP."""
        images = batch["image"]
        h, w = images.shape[-2:]
        out = self.model(images)
        self.log_loss(stage, self.compute_losses(batch, out), images.shape[0])
        coords, sigma = out["coords"], out["sigma"]
        if self.flip_test:
            coords, sigma = merge_flipped(out, self.model(images.flip(-1)), self.keypoint_flip_index, w)
        keypoints = normalized_to_pixels(coords, (h, w))
        scores = keypoint_scores(sigma)
        in_image = affine_points(keypoints, batch["matrix_inv"])
        metrics = self.metrics[stage]
        gt_box = ~batch["from_detector"]  # PCK and EPE need the person's ground truth: GT-box crops only
        truth = batch["keypoints_image"][gt_box]
        visible = truth[..., 2] > 0
        for name in ("PCK", "AUC"):
            metrics[name].update(in_image[gt_box], truth, visible, batch["box"][gt_box])
        metrics["EPE"].update(in_image[gt_box], truth, visible)
        metrics["ap"].update(self._instances(batch, in_image, scores), batch["gt"])
        return {"keypoints": keypoints, "scores": scores, "sigma": sigma}

    @staticmethod
    def _instances(batch: dict[str, Any], in_image: Tensor, scores: Tensor) -> dict[str, Tensor]:
        """COCO result rows: keypoints with scores, ``box_score + mean + max`` (``bbox_rle``), NMS areas."""
        score = batch["box_score"].to(scores.dtype) + scores.mean(dim=1) + scores.max(dim=1).values
        areas = torch.where(batch["from_detector"], batch["crop_area"], torch.zeros_like(batch["crop_area"]))
        return {"keypoints": torch.cat([in_image, scores[..., None]], dim=-1), "scores": score,
                "image_id": batch["image_id"], "nms_areas": areas}

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """COCO keypoint results of a batch, on the CPU: ``keypoints`` ``(B, K, 3)`` image pixels + score,
        ``scores``, ``image_id``, ``category_id``, ``nms_areas`` (> 0 for poses from detector boxes) ``(B,)``."""
        images = batch["image"]
        out = self.predictor()(images)
        rows = self._instances(batch, affine_points(out[..., :2], batch["matrix_inv"]), out[..., 2])
        rows["category_id"] = batch["category_id"]
        return {k: v.detach().cpu() for k, v in rows.items()}

    # -- epoch ends ---------------------------------------------------------------------------------
    def test_table(self, values: dict[str, Tensor]) -> str:
        """pycocotools' keypoint summary, then PCK, AUC and EPE."""
        return (format_keypoint_table(values) + "\n" + f"PCK@{self.pck_threshold:g} {float(values['PCK']):.4f}   "
                f"AUC {float(values['AUC']):.4f}   EPE {float(values['EPE']):.2f} px (ground-truth boxes only)")

    # -- optimisation ---------------------------------------------------------------------------------
    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """Adam, lr 1e-3, no weight decay, every parameter in one group: the official RLE recipe (scripts/train.py
        L86-87, ``torch.optim.Adam(m.parameters(), lr=cfg.TRAIN.LR)``) and mmpose's (REFERENCE.md §8.4)."""
        return torch.optim.Adam(params, lr=self.hparams.lr)

    def default_scheduler(self, optimizer: torch.optim.Optimizer,
                          total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """Step decay: x ``lr_gamma`` at each of ``lr_drop_epochs`` (170, 200), after the optional warm-up; stepped
        per optimizer step (the epochs converted with the fit's steps per epoch)."""
        drops = self.hparams.lr_drop_epochs
        return self.step_decay(optimizer, [170, 200] if drops is None else drops, self.hparams.lr_gamma)

    # -- export (tools/export.py) -------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        """For ``tools/export.py``: crops in [0, 1] -> ``(B, K, 3)`` crop-pixel x, y, score (flip per ``flip_test``)."""
        return self.predictor().eval()

    def export_example(self, batch_size: int = 1, size: Sequence[int] | None = None) -> tuple[Tensor]:
        """Example input: ``(batch_size, 3, H, W)`` uniform crops in [0, 1] (H, W fixed: ``input_size``)."""
        return self.random_images(batch_size, size, fixed=self.input_size)
