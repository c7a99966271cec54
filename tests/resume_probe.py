"""Helpers of the kill / resume / multi-node tests: a loss recorder that can SIGKILL its own process, and a driver.

``python tests/resume_probe.py ARGS...`` runs ``lit-tasks ARGS`` (``lit_tasks.cli.run_cli``) in this process with
one thread, so that a test can start it as a subprocess, kill it, and compare it with runs made in the test process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import timer as timer_module


class LossRecorder(pl.Callback):
    """Appends ``{"step", "loss", "rank"}`` after every optimizer step to ``path`` (flushed and fsynced at once:
    the process may be killed right after); with ``kill_at_step`` it SIGKILLs its own process after that step."""

    def __init__(self, path: str, kill_at_step: int | None = None) -> None:
        self.path, self.kill_at_step = path, kill_at_step

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write({"step": trainer.global_step, "loss": float(loss.detach()), "rank": trainer.global_rank})
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Also records ``{"step", "rank", "val": {name: value}}`` after every validation (not the sanity check)."""
        if not trainer.sanity_checking:
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
            self._write({"step": trainer.global_step, "rank": trainer.global_rank, "val": values})


class StepClock(pl.Callback):
    """A fake clock for Lightning's own Timer (``--trainer.max_time``): ``seconds_per_step`` pass per optimizer step.

    From ``setup`` to ``teardown`` of the run the Timer's ``time.monotonic()`` reads ``seconds_per_step *
    trainer.global_step``, so a ``max_time`` stop comes after a known step whatever the machine's speed, through the
    real Timer (its checks after every step, its broadcast, its saved elapsed time). With 60 s per step and
    ``max_time`` 5 min 30 s, the Timer stops the fit after step 6.
    """

    def __init__(self, seconds_per_step: float = 60.0) -> None:
        self.seconds_per_step = seconds_per_step
        self._real_time: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._real_time = timer_module.time
        timer_module.time = type("StepTime", (), {"monotonic": staticmethod(
            lambda: self.seconds_per_step * trainer.global_step)})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._real_time is not None:
            timer_module.time, self._real_time = self._real_time, None


def step_clock_args(seconds_per_step: float = 60.0) -> list[str]:
    """Command-line arguments that add a :class:`StepClock` to ``trainer.callbacks``."""
    return ["--trainer.callbacks+=" + json.dumps({"class_path": "resume_probe.StepClock",
                                                  "init_args": {"seconds_per_step": seconds_per_step}})]


def recorder_args(path: str | Path, kill_at_step: int | None = None) -> list[str]:
    """Command-line arguments that add a :class:`LossRecorder` to ``trainer.callbacks``."""
    init_args: dict[str, Any] = {"path": str(path)}
    if kill_at_step is not None:
        init_args["kill_at_step"] = kill_at_step
    return ["--trainer.callbacks+=" + json.dumps({"class_path": "resume_probe.LossRecorder", "init_args": init_args})]


def read_losses(path: str | Path, rank: int = 0) -> dict[int, float]:
    """``{step: loss}`` of one rank (a later record of the same step, from a resumed run, replaces an earlier one)."""
    losses: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if record["rank"] == rank and "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def read_validations(path: str | Path, rank: int = 0) -> list[tuple[int, dict[str, float]]]:
    """``(step, {metric: value})`` of every validation one rank recorded, in order."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [(r["step"], r["val"]) for r in records if r["rank"] == rank and "val" in r]


def steps_in_order(path: str | Path, rank: int = 0) -> list[int]:
    """Every recorded step of one rank in the order written (a resumed run repeats steps after its checkpoint)."""
    return [r["step"] for r in map(json.loads, Path(path).read_text().splitlines()) if r["rank"] == rank and "loss" in r]


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lit_tasks.cli import run_cli

    run_cli()  # LightningCLI reads sys.argv[1:]
