"""Long runs under mixed precision (slow): 1000 ``bf16-mixed`` steps per task on its synthetic data with no NaN or Inf
in any loss, gradient, weight, buffer or validation metric.

Each case is the task's synthetic demo config with a small model (a few minutes on 2 CPU cores). The figures (final
loss, the monitored metric, wall time) are printed and written to ``soak.json`` in the test's folder. A new task
joins by adding a ``SoakCase``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lit_tasks.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # 1000 bf16 steps: minutes, more on a busy machine


class FiniteCheck(pl.Callback):
    """Counts non-finite values: the loss of every step, every gradient before the optimizer step (after the
    GradScaler's unscale, so inf from fp16 overflow is seen before the scaler skips the step), every parameter and
    buffer after the step, and every scalar validation metric."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.last_loss = math.nan

    def _note(self, what: str, step: int) -> None:
        if len(self.problems) < 20:
            self.problems.append(f"step {step}: {what}")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        scaler = trainer.scaler  # public: the precision plugin's GradScaler, None without one
        if scaler is not None:
            return  # fp16: overflowing steps are expected and skipped by the scaler
        for name, p in pl_module.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                self._note(f"gradient of {name}", trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.last_loss = float(loss.detach())
        if not math.isfinite(self.last_loss):
            self._note(f"loss {self.last_loss}", trainer.global_step)
        for name, value in [*pl_module.named_parameters(), *pl_module.named_buffers()]:
            if value.is_floating_point() and not torch.isfinite(value).all():
                self._note(f"{name}", trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/") and value.numel() == 1 and not math.isfinite(float(value)):
                self._note(f"{key} = {float(value)}", trainer.global_step)


@dataclass
class SoakCase:
    config: str
    args: list[str]
    metric: str


STEPS = 1000
SOAK_CASES = {
    "face_partial_fc": SoakCase("configs/face/arcface_synthetic.yaml", [
        "--data.num_train_identities=100", "--data.samples_per_identity=16", "--data.num_val_identities=50",
        "--data.val_samples_per_identity=4", "--data.num_val_pairs=200", "--data.image_size=32", "--data.batch_size=32",
        "--model.image_size=32", "--model.partial_fc=true", "--model.sample_rate=0.5", "--model.num_log_images=0",
        "--trainer.check_val_every_n_epoch=5"], "val/verification_accuracy"),
    # CPUs without AVX-512 run bf16 convolutions on a slow reference path (~10x fp32): a batch of 2 keeps it minutes
    "detection_fcos": SoakCase("configs/detection/fcos_shapes.yaml", [
        "--data.num_train=2000", "--data.num_val=50", "--data.batch_size=2", "--model.fpn_channels=16",
        "--model.head_convs=1", "--model.num_log_images=0", "--trainer.val_check_interval=250",
        "--trainer.check_val_every_n_epoch=null"], "val/map_50"),
    "segmentation_deeplabv3plus": SoakCase("configs/segmentation/deeplabv3plus_shapes.yaml", [
        "--data.num_train=4000", "--data.num_val=50", "--data.image_size=32", "--data.batch_size=8",
        "--model.head_channels=16", "--model.num_log_images=0", "--trainer.val_check_interval=250",
        "--trainer.check_val_every_n_epoch=null"], "val/mIoU"),
    "detection_vfnet": SoakCase("configs/detection/vfnet_shapes.yaml", [
        "--data.num_train=2000", "--data.num_val=50", "--data.batch_size=2", "--model.fpn_channels=16",
        "--model.head_convs=1", "--model.num_log_images=0", "--trainer.val_check_interval=250",
        "--trainer.check_val_every_n_epoch=null"], "val/map_50"),
    "detection_detr": SoakCase("configs/detection/detr_shapes.yaml", [
        "--data.num_train=2000", "--data.num_val=50", "--data.batch_size=2", "--model.d_model=32",
        "--model.dim_feedforward=64", "--model.num_log_images=0", "--trainer.val_check_interval=250",
        "--trainer.check_val_every_n_epoch=null"], "val/map_50"),
    "pose_rle": SoakCase("configs/pose/rle_shapes.yaml", [
        "--data.num_train=8000", "--data.num_val=50", "--data.batch_size=8", "--model.num_log_images=0",
        "--trainer.val_check_interval=250", "--trainer.check_val_every_n_epoch=null"], "val/map"),
    "action_oadtr": SoakCase("configs/action/oadtr_synthetic.yaml", [
        "--data.batch_size=8", "--model.num_log_streams=0"], "val/mAP"),
}


@pytest.mark.parametrize("name", list(SOAK_CASES))
def test_1000_bf16_mixed_steps_stay_finite(name: str, tmp_path: Path) -> None:
    case, check = SOAK_CASES[name], FiniteCheck()
    start = time.perf_counter()
    cli = run_cli(["--config", str(ROOT / case.config), *case.args, "--trainer.precision=bf16-mixed",
                   f"--trainer.max_steps={STEPS}", "--trainer.max_epochs=-1", "--trainer.max_time=null", "--data.num_workers=0",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                   "--trainer.num_sanity_val_steps=0"], run=False)
    cli.trainer.callbacks.append(check)
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    metric = float(cli.trainer.callback_metrics[case.metric])
    figures = {"task": name, "steps": cli.trainer.global_step, "final_loss": check.last_loss, case.metric: metric,
               "wall_seconds": round(seconds, 1)}
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
    print("\nSOAK", json.dumps(figures))
    assert cli.trainer.global_step == STEPS
    assert not check.problems, check.problems
    assert math.isfinite(check.last_loss) and math.isfinite(metric)
