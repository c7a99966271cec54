"""Online action detection: classify the current frame of a video from its past, and anticipate the next ones.

Method (OadTR, Wang et al. ICCV 2021, REFERENCE §9), on pre-extracted per-frame features:

1. The window of the last T = 64 frame features (the current frame last) goes through OadTR
   (:mod:`lit_tasks.models.action.oadtr`): an encoder over the window and a task token, and a decoder whose
   Q = 8 causal queries anticipate frames t + 1 .. t + Q.
2. Loss (§9.3, :class:`~lit_tasks.losses.soft_cross_entropy.OadTRCriterion`): soft-target cross entropy
   over the non-ambiguous classes, current frame weight 1.0, anticipated frames 0.5; rows whose frame is
   ambiguous (or unlabelled, past the end of a video) are left out.
3. Optimisation (§9.4): Adam, lr 1e-4, L2 weight decay 1e-4 on every parameter, the LR times 0.1 after
   every epoch; gradient clipping at 1.0 is the Trainer's (``gradient_clip_val: 1.0`` in the configs).
4. Evaluation (§9.5, :class:`~lit_tasks.metrics.action.FrameLevelMAP`): per-frame AP and calibrated AP
   of each action class (background and ambiguous excluded) over all frames of all sessions, mAP and
   mcAP. Which frames are evaluated is the DataModule's ``frames`` rule (default every frame, early
   windows start-padded; the released code never evaluates the first 64 frames): it is printed when a
   run starts and heads the test table.

Model selection: the checkpoint callback follows ``val/mAP`` on VALIDATION sessions, which the feature
DataModules take out of the training sessions (a seeded split unless ``val_sessions`` names them). The
released OadTR evaluates on the test set after every epoch, so its reported checkpoint is chosen on test.

Batches (``datamodules.features.samples.FeatureWindowDataset``): dicts with ``features`` ``(B, T, D)`` float32,
``target`` ``(B, C)``, ``future_target`` ``(B, Q, C)`` (all-zero rows past the end of a video), ``session``
``(B,)`` and ``frame`` ``(B,)`` int64 (the current frame's session index and frame number).

Online use: :meth:`ActionDetectionTask.streaming` gives a frame-by-frame detector equal to the windowed
model on the same stream.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lit_tasks.base import BaseTask
from lit_tasks.callbacks.action_timelines import ActionTimelineLogger
from lit_tasks.losses.soft_cross_entropy import OadTRCriterion
from lit_tasks.metrics.action import FrameLevelMAP, format_ap_table
from lit_tasks.models.action.convert import read_action_weights
from lit_tasks.models.action.oadtr import (PAD_MODES, OadTR, OadTROutput, StreamingOadTR, WindowProbabilities,
                                    class_probabilities)
from lit_tasks.models.published import published_weights
from lit_tasks.schedules import warmup_multistep


class ActionDetectionTask(BaseTask):
    """Train, evaluate (per-frame mAP / mcAP) and run an online action detector on per-frame features.

    Args:
        num_classes: C, target columns including background and ambiguous (THUMOS: 22); linked from the data.
        feature_dim: width of a frame's feature vector (THUMOS TSN rgb + flow: 3072); linked from the data.
        class_names: a name per column; linked from the data.
        background_index: background column (not evaluated), or None; linked from the data.
        ambiguous_index: ambiguous column (not trained on, not evaluated, left out of the softmax), or None;
            linked from the data.
        window: T, frames per window (64); linked from the DataModule, which cuts the windows.
        num_future: Q, anticipated frames = decoder queries (8); linked from the DataModule.
        model: ``"oadtr"``.

        OadTR (defaults as the paper, REFERENCE §9.2):
        embed_dim: token width (1024).
        enc_layers, enc_heads, enc_mlp_dim: encoder depth (3), heads (8), MLP width (1024).
        dec_layers, dec_heads, dec_ffn_dim: decoder depth (5), heads (4), FFN width (1024).
        dropout, attn_dropout: dropout (0.1) and encoder attention dropout (0.1).

        pretrained_weights: a local official OadTR checkpoint (``checkpoint*.pth`` of its ``main.py``) or a
            ``tools/convert_weights.py`` output, loaded when the task is built; the sizes it fixes (feature_dim,
            window, num_future, embed_dim, layer counts and widths) must be the task's (a difference is an error
            naming it), every key is matched both ways. The numbers of heads are not in the file.

        Loss: current_weight (1.0), anticipation_weight (0.5).

        Optimisation (used when no ``optimizer`` / ``lr_scheduler`` is injected):
        lr, weight_decay: Adam with L2 weight decay on every parameter, as released (1e-4, 1e-4).
        lr_drop_epochs: the LR is multiplied by ``lr_gamma`` every this many epochs (StepLR, 1).
        lr_gamma: 0.1.
        warmup_steps: linear warm-up (0: none, as the paper).

        Evaluation-time (not saved in checkpoints):
        num_log_streams: validation sessions drawn to TensorBoard each epoch as a ground-truth timeline
            above the predicted class probabilities (0 disables).

        optimizer, lr_scheduler, lr_scheduler_interval: injected callables (see ``BaseTask``).
    """

    monitor = "val/mAP"
    mode = "max"
    eval_options = ("num_log_streams",)
    export_input_name = "features"
    export_output_name = "probabilities"

    def __init__(
        self,
        num_classes: int = 22,
        feature_dim: int = 3072,
        class_names: list[str] | None = None,
        background_index: int | None = 0,
        ambiguous_index: int | None = 21,
        window: int = 64,
        num_future: int = 8,
        model: Literal["oadtr"] = "oadtr",
        embed_dim: int = 1024,
        enc_layers: int = 3,
        enc_heads: int = 8,
        enc_mlp_dim: int = 1024,
        dec_layers: int = 5,
        dec_heads: int = 4,
        dec_ffn_dim: int = 1024,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        pretrained_weights: str | None = None,
        current_weight: float = 1.0,
        anticipation_weight: float = 0.5,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_drop_epochs: int = 1,
        lr_gamma: float = 0.1,
        warmup_steps: int = 0,
        num_log_streams: int = 3,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        if model != "oadtr":
            raise ValueError(f"ActionDetectionTask: unknown model {model!r}; implemented: 'oadtr'")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries for num_classes={num_classes}")
        for name, index in (("background_index", background_index), ("ambiguous_index", ambiguous_index)):
            if index is not None and not 0 <= index < num_classes:
                raise ValueError(f"{name}={index} outside [0, num_classes={num_classes})")
        if lr_drop_epochs < 1:
            raise ValueError(f"lr_drop_epochs must be >= 1, got {lr_drop_epochs}")
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    # -- parts -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h = self.hparams
        published = published_weights(h, "ActionDetectionTask", read_action_weights)
        self.model = OadTR(in_dim=h.feature_dim, num_classes=h.num_classes, window=h.window, embed_dim=h.embed_dim,
                           enc_layers=h.enc_layers, enc_heads=h.enc_heads, enc_mlp_dim=h.enc_mlp_dim,
                           dec_layers=h.dec_layers, dec_heads=h.dec_heads, dec_ffn_dim=h.dec_ffn_dim,
                           num_queries=h.num_future, dropout=h.dropout, attn_dropout=h.attn_dropout)
        if published is not None:
            published.load_into(self.model)

    def configure_losses(self) -> None:
        h = self.hparams
        self.criterion = OadTRCriterion(ambiguous_index=h.ambiguous_index, current_weight=h.current_weight,
                                        anticipation_weight=h.anticipation_weight)

    def configure_metrics(self) -> None:
        h = self.hparams
        self.val_metric = FrameLevelMAP(h.num_classes, h.background_index, h.ambiguous_index)
        self.test_metric = FrameLevelMAP(h.num_classes, h.background_index, h.ambiguous_index)
        # Test only: the mAP of each anticipation step j (frame t + 1 + j from the window ending at t), as the
        # released log reports for the decoder.
        self.test_anticipation = nn.ModuleList(FrameLevelMAP(h.num_classes, h.background_index, h.ambiguous_index)
                                               for _ in range(h.num_future))

    def configure_callbacks(self) -> list[pl.Callback]:
        return [ActionTimelineLogger(num_streams=self.num_log_streams)] if self.num_log_streams > 0 else []

    def setup(self, stage: str) -> None:
        rule = getattr(self.trainer.datamodule, "frame_rule", None) if self._trainer else None
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn (a str Enum)
        if callable(rule) and stage in ("fit", "validate", "test", "predict"):
            split = {"fit": "val", "validate": "val"}.get(stage, stage)
            rank_zero_info(f"ActionDetectionTask: {stage} evaluates / predicts {rule(split)}")

    # -- inference -------------------------------------------------------------------------------
    def forward(self, features: Tensor) -> OadTROutput:
        """``features (B, T, D)`` -> ``OadTROutput(current (B, C), anticipation (B, Q, C))`` logits."""
        return self.model(features)

    def probabilities(self, out: OadTROutput) -> tuple[Tensor, Tensor]:
        """Current ``(B, C)`` and anticipated ``(B, Q, C)`` probabilities (ambiguous column 0, §9.5)."""
        amb = self.hparams.ambiguous_index
        return class_probabilities(out.current, amb), class_probabilities(out.anticipation, amb)

    def streaming(self, pad: str = "replicate") -> StreamingOadTR:
        """A frame-by-frame detector: ``detector.step(feature)`` -> the current frame's probabilities.

        Equal (to float rounding) to this model on the window ending at that frame, early windows padded
        as ``pad`` says (use the DataModule's ``pad``, ``"replicate"`` by default). Puts the model in eval
        mode; call ``detector.reset()`` between videos.
        """
        if pad not in PAD_MODES:
            raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
        return self.model.streaming(pad=pad, ambiguous_index=self.hparams.ambiguous_index)

    def export_module(self) -> nn.Module:
        """For ``tools/export.py``: windows ``(B, T, D)`` -> probabilities ``(B, 1 + Q, C)`` (row 0 current)."""
        return WindowProbabilities(self.model, self.hparams.ambiguous_index).eval()

    def export_example(self, batch_size: int = 1) -> tuple[Tensor]:
        """Example input for export: ``(batch_size, T, D)`` standard-normal features."""
        generator = torch.Generator().manual_seed(batch_size)
        h = self.hparams
        return (torch.randn(batch_size, h.window, h.feature_dim, generator=generator),)

    # -- steps -------------------------------------------------------------------------------------
    def losses(self, out: OadTROutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss_current", "loss_anticipation", "loss"}`` (weighted; ``loss`` their sum)."""
        parts = self.criterion(out.current, out.anticipation, batch["target"], batch["future_target"])
        return {**parts, "loss": parts["loss_current"] + parts["loss_anticipation"]}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.losses(self.model(batch["features"]), batch)
        n = batch["features"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=n)
        self.log("train/loss", losses["loss"].detach(), batch_size=n, prog_bar=True)
        return losses["loss"]

    def _evaluate(self, batch: dict[str, Tensor], metric: FrameLevelMAP, stage: str) -> dict[str, Tensor]:
        out = self.model(batch["features"])
        current, anticipation = self.probabilities(out)
        # (session, frame) keys: a padding DistributedSampler repeats windows, the metric counts each frame once.
        metric.update(current, batch["target"], batch["session"], batch["frame"])
        if stage == "test":
            for j, step_metric in enumerate(self.test_anticipation):
                step_metric.update(anticipation[:, j], batch["future_target"][:, j], batch["session"],
                                   batch["frame"] + 1 + j)
        if stage == "val":  # in eval mode the criterion makes no collective call
            n = batch["features"].shape[0]
            self.log("val/loss", self.losses(out, batch)["loss"], batch_size=n, sync_dist=True)
        return {"probs": current, "anticipation": anticipation, "target": batch["target"],
                "session": batch["session"], "frame": batch["frame"]}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.val_metric, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.test_metric, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{"probs": (B, C), "anticipation": (B, Q, C), "session": (B,), "frame": (B,)}`` on the CPU."""
        current, anticipation = self.probabilities(self.model(batch["features"]))
        return {"probs": current.cpu(), "anticipation": anticipation.cpu(), "session": batch["session"].cpu(),
                "frame": batch["frame"].cpu()}

    # -- epoch ends ---------------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        """Class names for logs (column numbers when the DataModule gave none); spaces become underscores."""
        names = self.hparams.class_names or [str(c) for c in range(self.hparams.num_classes)]
        return [str(n).replace(" ", "_") for n in names]

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metric(self.val_metric, "val", keys=("mAP", "mcAP"))

    def on_test_epoch_end(self) -> None:
        result = self.log_epoch_metric(self.test_metric, "test", keys=("mAP", "mcAP"))
        skip = (self.hparams.background_index, self.hparams.ambiguous_index)
        names = self.class_names()
        self.log_metrics({f"AP/{names[c]}": result["AP"][c] for c in range(len(names))
                          if c not in skip and not torch.isnan(result["AP"][c])}, "test")
        steps = []
        for step_metric in self.test_anticipation:
            steps.append(float(step_metric.compute()["mAP"]))
            step_metric.reset()
        anticipation = float(np.nanmean(steps)) if steps and not np.isnan(steps).all() else float("nan")
        self.log_metrics({"anticipation_mAP": torch.tensor(anticipation)}, "test")
        rule = getattr(self.trainer.datamodule, "frame_rule", None) if self._trainer else None
        title = f"Per-frame AP / calibrated AP (%) over {rule('test')}" if callable(rule) else None
        table = format_ap_table(names, result, skip, title)
        per_step = " ".join(f"{100 * v:.2f}" for v in steps)
        rank_zero_info(f"{table}\nanticipation mAP per step t+1..t+{len(steps)}: {per_step} "
                       f"(mean {100 * anticipation:.2f})")

    # -- optimisation ---------------------------------------------------------------------------------
    def default_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """Adam(lr 1e-4, weight_decay 1e-4) over every parameter in one group (BaseTask's default rules): OadTR
        main.py L96-98, ``torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)`` (L2
        weight decay, not AdamW's)."""
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per training epoch, None when unknown (no Trainer, or a loader without a length)."""
        if not self._trainer:
            return None
        if not math.isfinite(self.trainer.num_training_batches):
            self.trainer.fit_loop.setup_data()  # what estimated_stepping_batches does, unless max_steps is set
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            return None
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def default_scheduler(self, optimizer: torch.optim.Optimizer,
                          total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """StepLR as released (lr x ``lr_gamma`` every ``lr_drop_epochs`` epochs), stepped per optimizer step."""
        per_epoch = self.steps_per_epoch()
        if per_epoch is None:
            rank_zero_warn("ActionDetectionTask: steps per epoch unknown, the default schedule keeps the LR constant")
            milestones: list[int] = []
        else:
            step = per_epoch * self.hparams.lr_drop_epochs
            milestones = list(range(step, total_steps, step))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_multistep(self.warmup_steps(), milestones, self.hparams.lr_gamma))
