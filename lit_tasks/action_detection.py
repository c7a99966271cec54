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
from typing import Any, Iterable, Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lit_tasks.base import STAGES, BaseTask
from lit_tasks.callbacks.action_timelines import ActionTimelineLogger
from lit_tasks.losses.soft_cross_entropy import OadTRCriterion
from lit_tasks.metrics.action import FrameLevelMAP, format_ap_table
from lit_tasks.models.action.convert import read_action_weights
from lit_tasks.models.action.oadtr import (PAD_MODES, OadTR, OadTROutput, StreamingOadTR, WindowProbabilities,
                                    class_probabilities)
from lit_tasks.models.published import published_weights
from lit_tasks.run.lightning_seams import attached_trainer


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
        lr_drop_epochs: epochs at which the LR is multiplied by ``lr_gamma``; None = after every epoch, as released
            (StepLR with step_size 1).
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
    logged_metric_keys = ("mAP", "mcAP")
    export_input_names = ("features",)
    export_output_names = ("probabilities",)

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
        lr_drop_epochs: list[int] | None = None,
        lr_gamma: float = 0.1,
        warmup_steps: int = 0,
        num_log_streams: int = 3,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    def argument_problems(self, args: dict[str, Any]) -> list[str]:
        """An unknown model, class names or background / ambiguous columns that disagree with ``num_classes``."""
        n, names = args["num_classes"], args["class_names"]
        checks = [
            (args["model"] == "oadtr", f"unknown model {args['model']!r}; implemented: 'oadtr'"),
            (names is None or len(names) == n, f"class_names has {len(names or ())} entries for num_classes={n}"),
            *((args[k] is None or 0 <= args[k] < n, f"{k}={args[k]} outside [0, num_classes={n})")
              for k in ("background_index", "ambiguous_index")),
        ]
        return super().argument_problems(args) + [message for ok, message in checks if not ok]

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
        """Per stage: the current frame's mAP and, test only, that of each anticipation step j (frame t + 1 + j from
        the window ending at t), as the released log reports for the decoder."""
        h = self.hparams

        def frame_map() -> FrameLevelMAP:
            return FrameLevelMAP(h.num_classes, h.background_index, h.ambiguous_index)

        self.metrics = nn.ModuleDict({stage: nn.ModuleDict({
            "current": frame_map(),
            "anticipation": nn.ModuleList(frame_map() for _ in range(h.num_future if stage == "test" else 0)),
        }) for stage in STAGES})

    def configure_callbacks(self) -> list[pl.Callback]:
        return [ActionTimelineLogger(num_streams=self.num_log_streams)] if self.num_log_streams > 0 else []

    def setup(self, stage: str) -> None:
        """Say which frames this run evaluates or predicts (the DataModule's ``frames`` rule)."""
        trainer = attached_trainer(self)
        rule = getattr(trainer.datamodule, "frame_rule", None) if trainer is not None else None
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

    # -- steps -------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Tensor], outputs: OadTROutput | None = None) -> dict[str, Tensor]:
        """``{"loss_current", "loss_anticipation"}`` (weighted) of ``outputs`` (else the model's on the features)."""
        out = self.model(batch["features"]) if outputs is None else outputs
        return self.criterion(out.current, out.anticipation, batch["target"], batch["future_target"])

    def evaluation_step(self, batch: dict[str, Tensor], stage: str, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Current-frame probabilities into the stage's mAP (test: each anticipated frame's too); validation loss."""
        out = self.model(batch["features"])
        current, anticipation = self.probabilities(out)
        metrics = self.metrics[stage]
        # (session, frame) keys: a padding DistributedSampler repeats windows, the metric counts each frame once.
        metrics["current"].update(current, batch["target"], batch["session"], batch["frame"])
        for j, step_metric in enumerate(metrics["anticipation"]):
            step_metric.update(anticipation[:, j], batch["future_target"][:, j], batch["session"],
                               batch["frame"] + 1 + j)
        if stage == "val":  # in eval mode the criterion makes no collective call
            self.log_loss(stage, self.compute_losses(batch, out), batch["features"].shape[0])
        return {"probs": current, "anticipation": anticipation, "target": batch["target"],
                "session": batch["session"], "frame": batch["frame"]}

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

    def log_stage_metrics(self, stage: str) -> dict[str, Any]:
        """mAP and mcAP; test: also the AP of each class (``AP/<class name>``) and the mean anticipation mAP, with
        each step's mAP as ``anticipation_steps`` in the result (for the table)."""
        metrics = self.metrics[stage]
        result = self.log_epoch_metric(metrics["current"], stage, self.logged_metric_keys)
        if stage != "test":
            return result
        skip = (self.hparams.background_index, self.hparams.ambiguous_index)
        names = self.class_names()
        self.log_metrics({f"AP/{names[c]}": result["AP"][c] for c in range(len(names))
                          if c not in skip and not torch.isnan(result["AP"][c])}, stage)
        steps = [float(self.log_epoch_metric(m, f"{stage}/anticipation_t+{j + 1}", keys=())["mAP"])
                 for j, m in enumerate(metrics["anticipation"])]
        anticipation = float(np.nanmean(steps)) if steps and not np.isnan(steps).all() else float("nan")
        self.log_metrics({"anticipation_mAP": torch.tensor(anticipation)}, stage)
        return {**result, "anticipation_mAP": anticipation, "anticipation_steps": steps}

    def test_table(self, values: dict[str, Any]) -> str:
        """Per-class AP / cAP over the evaluated frames, mAP / mcAP, then the anticipation mAP per step."""
        trainer = attached_trainer(self)
        rule = getattr(trainer.datamodule, "frame_rule", None) if trainer is not None else None
        title = f"Per-frame AP / calibrated AP (%) over {rule('test')}" if callable(rule) else None
        skip = (self.hparams.background_index, self.hparams.ambiguous_index)
        table = format_ap_table(self.class_names(), values, skip, title)
        steps = values["anticipation_steps"]
        per_step = " ".join(f"{100 * v:.2f}" for v in steps)
        return (f"{table}\nanticipation mAP per step t+1..t+{len(steps)}: {per_step} "
                f"(mean {100 * values['anticipation_mAP']:.2f})")

    # -- optimisation ---------------------------------------------------------------------------------
    def default_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """Adam(lr 1e-4, weight_decay 1e-4) over every parameter in one group (BaseTask's default rules): OadTR
        main.py L96-98, ``torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)`` (L2
        weight decay, not AdamW's)."""
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def default_scheduler(self, optimizer: torch.optim.Optimizer,
                          total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """StepLR as released: lr x ``lr_gamma`` at each of ``lr_drop_epochs`` (None: after every epoch of the fit),
        stepped per optimizer step."""
        drops = self.hparams.lr_drop_epochs
        if drops is None:  # every epoch boundary before the fit's last step
            drops = range(1, math.ceil(total_steps / self.steps_per_epoch()))
        return self.step_decay(optimizer, drops, self.hparams.lr_gamma)

    # -- export (tools/export.py) -------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        """For ``tools/export.py``: windows ``(B, T, D)`` -> probabilities ``(B, 1 + Q, C)`` (row 0 current)."""
        return WindowProbabilities(self.model, self.hparams.ambiguous_index).eval()

    def export_example(self, batch_size: int = 1, size: Sequence[int] | None = None) -> tuple[Tensor]:
        """Example input for export: ``(batch_size, T, D)`` standard-normal features (T, D fixed by the model)."""
        h = self.hparams
        if size is not None:
            raise ValueError(f"{type(self).__name__}'s input size is fixed by the model (T={h.window}, "
                             f"D={h.feature_dim}); give no size")
        generator = torch.Generator().manual_seed(batch_size)
        return (torch.randn(batch_size, h.window, h.feature_dim, generator=generator),)
