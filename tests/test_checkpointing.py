"""Crash-safe checkpoint files, last.ckpt at every way a fit can end, and ``--ckpt_path last``."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from datamodules.synthetic.identities import SyntheticFacesDataModule
from lit_tasks.run import checkpoint_io
from lit_tasks.run.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, temporary_name_pattern
from lit_tasks.run.callbacks import TaskCheckpoint, step_end_outlook
from lit_tasks.run.resume import ExactResume
from lit_tasks.cli import run_cli
from lit_tasks.face_recognition import FaceRecognitionTask
from resume_probe import read_losses, recorder_args

ROOT = Path(__file__).resolve().parents[1]


# -- atomic writes -----------------------------------------------------------------------------------------------
def _write_then_hang(path: str, writer: str, ready: str) -> None:
    """Child process: save a new checkpoint to ``path`` whose write stops half-way (then hang until killed)."""
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        Path(ready).write_text("half")
        time.sleep(600)

    new = {"step": 2, "weight": torch.full((256, 256), 2.0)}
    if writer == "atomic":
        checkpoint_io.torch.save = half_save
        atomic_torch_save(new, path)
    else:  # what a plain torch.save(obj, path) does when killed mid-write
        half_save(new, path)


@pytest.mark.parametrize("writer", ["atomic", "plain"])
def test_a_kill_in_the_middle_of_a_write_leaves_the_previous_checkpoint(tmp_path, writer) -> None:
    """SIGKILL while the new file is half written: the atomic writer leaves the old checkpoint loadable, where a plain
    ``torch.save`` to the path leaves a truncated, unloadable file. (The child is spawned, not forked:
    a fork of a test process that has run OpenMP regions can hang before it writes anything.)"""
    path, ready = tmp_path / "last.ckpt", tmp_path / "ready"
    old = {"step": 1, "weight": torch.full((256, 256), 1.0)}
    atomic_torch_save(old, path)
    child = multiprocessing.get_context("spawn").Process(target=_write_then_hang, args=(str(path), writer, str(ready)))
    child.start()
    deadline = time.monotonic() + 120
    while not ready.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the child never reached the middle of its write"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    if writer == "plain":
        with pytest.raises(Exception):
            torch.load(path, weights_only=True)
        return
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["weight"], old["weight"])
    leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written temporary file
    atomic_torch_save({"step": 3}, path)  # the next save replaces the file and clears the leftover
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert not list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_keeps_the_target_and_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "best.ckpt"
    atomic_torch_save({"v": 1}, path)

    def failing(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", failing)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert not list(tmp_path.glob(temporary_name_pattern(str(path)).rsplit("/", 1)[1]))


# -- last.ckpt at the end of every fit ------------------------------------------------------------------------------
def tiny_task() -> FaceRecognitionTask:
    torch.manual_seed(0)
    return FaceRecognitionTask(num_identities=6, backbone="test_resnet", image_size=32, embedding_size=16,
                               scale=16.0, num_log_images=0)


def tiny_data() -> SyntheticFacesDataModule:  # 24 training faces: 6 batches of 4 per epoch
    return SyntheticFacesDataModule(num_train_identities=6, samples_per_identity=4, num_val_identities=4,
                                    val_samples_per_identity=2, num_val_pairs=8, image_size=32, batch_size=4,
                                    num_workers=0)


class LastStepProbe(pl.Callback):
    """Records, at the start of every training batch, the global step last.ckpt holds and whether it was written
    after that step's validation (its checkpoint callback state then names a best checkpoint)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen, self.after_validation = folder, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = self.folder / "last.ckpt"
        if not last.exists():
            self.seen.append(None)
            return
        checkpoint = torch.load(last, weights_only=True)
        self.seen.append(checkpoint["global_step"])
        [state] = [v for k, v in checkpoint["callbacks"].items() if k.startswith("TaskCheckpoint")]
        self.after_validation.append(bool(state["best_model_path"]))


class RaiseAt(pl.Callback):
    """Raises KeyboardInterrupt at ``hook`` of step ``step`` (``on_train_batch_end``: at a step boundary;
    ``on_before_optimizer_step``: inside the step), or sends this process SIGINT (a real Ctrl-C) at its start."""

    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.hook == "sigint" and trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGINT)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.hook == "on_before_optimizer_step" and trainer.global_step == self.step - 1:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hook == "on_train_batch_end" and trainer.global_step == self.step:
            raise KeyboardInterrupt


def fit(folder: Path, max_steps: int, callbacks=(), **kwargs) -> tuple[pl.Trainer, FaceRecognitionTask, TaskCheckpoint]:
    """Validation every 2 steps, last.ckpt also every 2 steps; Lightning's KeyboardInterrupt exit is kept in."""
    task, checkpoint = tiny_task(), TaskCheckpoint(dirpath=str(folder), every_n_train_steps=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                         callbacks=[checkpoint, ExactResume(), *callbacks], **kwargs)
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(task, tiny_data())
    except SystemExit:  # Lightning exits with status 1 after a KeyboardInterrupt ...
        signal.signal(signal.SIGINT, handler)  # ... and ignores SIGINT from then on
    return trainer, task, checkpoint


def assert_last_holds(folder: Path, task: FaceRecognitionTask, step: int) -> None:
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == step
    state = task.state_dict()
    assert last["state_dict"].keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(last["state_dict"][key], value.cpu()), key


def test_max_steps_between_validations_leaves_the_final_weights_in_last_ckpt(tmp_path) -> None:
    probe, handler = LastStepProbe(tmp_path), signal.getsignal(signal.SIGINT)
    trainer, task, checkpoint = fit(tmp_path, max_steps=5, callbacks=[probe])
    assert signal.getsignal(signal.SIGINT) is handler  # the Ctrl-C handler of the fit is gone
    assert trainer.global_step == 5
    assert_last_holds(tmp_path, task, 5)
    # last.ckpt followed every 2nd step (periodic and validation saves) and the best checkpoint was still written
    # at the validations that share those steps
    assert probe.seen == [None, None, 2, 2, 4]
    # steps 2 and 4 are both periodic and validation steps: last.ckpt is written after the validation (a checkpoint
    # written before it would make Lightning skip that validation when the run resumes from it)
    assert probe.after_validation == [True, True, True]
    assert Path(checkpoint.best_model_path).is_file() and "step=" in checkpoint.best_model_path


class TrainerHolder(pl.Callback):
    def __init__(self, holder: dict) -> None:
        self.holder = holder

    def setup(self, trainer, pl_module, stage) -> None:
        self.holder["trainer"] = trainer


def test_max_time_between_validations_leaves_the_final_weights_in_last_ckpt(tmp_path, monkeypatch) -> None:
    holder: dict = {}  # the run's time is up after step 3 (Lightning's Timer checks after every step)
    monkeypatch.setattr(Timer, "time_elapsed",
                        lambda self, stage="train": 1e9 if holder["trainer"].global_step >= 3 else 0.0)
    trainer, task, _ = fit(tmp_path, max_steps=10, max_time={"hours": 1}, callbacks=[TrainerHolder(holder)])
    assert trainer.global_step == 3
    assert_last_holds(tmp_path, task, 3)


def test_the_loop_seam_names_the_lightning_version_when_its_members_are_gone() -> None:
    """What TaskCheckpoint asks Lightning's training loop (private members, no public API) fails loudly, naming the
    installed Lightning, when a Lightning release renames them: no silent guess. (The mid-epoch stop tests in
    test_resume.py fail when the members exist but mean something else.)"""
    trainer = type("OtherLightningTrainer", (), {"fit_loop": type("Loop", (), {"epoch_loop": object()})(),
                                                  "should_stop": False, "max_steps": -1, "global_step": 0})()
    with pytest.raises(RuntimeError, match=rf"installed Lightning {pl.__version__} lacks .*_should_check_val_fx"):
        step_end_outlook(trainer)


@pytest.mark.parametrize("hook", ["on_train_batch_end", "sigint"])
def test_an_interrupt_at_a_step_boundary_saves_last_ckpt(tmp_path, hook, capsys) -> None:
    trainer, task, _ = fit(tmp_path, max_steps=10, callbacks=[RaiseAt(3, hook)])
    assert trainer.global_step == 3 and trainer.interrupted
    assert_last_holds(tmp_path, task, 3)
    if hook == "sigint":
        assert "Ctrl-C: stopping at the end of this training step" in capsys.readouterr().err


def test_an_interrupt_inside_a_step_saves_nothing_and_says_so(tmp_path) -> None:
    with pytest.warns(UserWarning, match="KeyboardInterrupt at step 3: no checkpoint written .*middle of a training "
                                         "step.*last.ckpt holds step 2"):
        trainer, task, _ = fit(tmp_path, max_steps=10, callbacks=[RaiseAt(4, "on_before_optimizer_step")])
    assert trainer.global_step == 3  # stopped inside step 4, before its update
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2


# -- --ckpt_path last ----------------------------------------------------------------------------------------------
def cli_args(max_steps: int, records: Path) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/face/arcface_synthetic.yaml"), "--data.num_train_identities=6",
            "--data.samples_per_identity=4", "--data.num_val_identities=4", "--data.val_samples_per_identity=2",
            "--data.num_val_pairs=8", "--data.batch_size=4", "--data.num_workers=0", "--data.image_size=32",
            "--model.image_size=32", "--model.embedding_size=16", "--model.num_log_images=0",
            f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *recorder_args(records)]


def test_ckpt_path_last_starts_afresh_then_resumes_in_the_same_run_folder(tmp_path, monkeypatch) -> None:
    """A job script that always passes ``--ckpt_path last``: the first run finds nothing (says where it looked) and
    starts from step 0; the next continues the newest last.ckpt (written at the end of the first fit) in the same
    version folder, with the losses of a run that never stopped."""
    reference = run_cli(cli_args(4, tmp_path / "reference.jsonl"))
    work = tmp_path / "job"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.warns(UserWarning, match=r"--ckpt_path last: no last.ckpt in .*lightning_logs/arcface_synthetic/\*"
                                         r"/checkpoints .*training starts from the beginning"):
        first = run_cli([*cli_args(2, work / "run.jsonl"), "--ckpt_path", "last"])
    assert first.trainer.global_step == 2
    second = run_cli([*cli_args(4, work / "run.jsonl"), "--ckpt_path", "last"])
    assert second.trainer.global_step == 4
    run = work / "lightning_logs" / "arcface_synthetic"
    assert sorted(p.name for p in run.iterdir()) == ["version_0"]  # logs and checkpoints went on in version_0
    assert (run / "version_0" / "config.yaml").is_file() and (run / "version_0" / "config.resume1.yaml").is_file()
    assert torch.load(run / "version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    assert reference.trainer.global_step == 4
    assert read_losses(work / "run.jsonl") == read_losses(tmp_path / "reference.jsonl")


def test_evaluating_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path) -> None:
    args = cli_args(1, tmp_path / "unused.jsonl")
    with pytest.raises(FileNotFoundError, match="--ckpt_path last: no last.ckpt in .*pass the checkpoint file"):
        run_cli(["validate", *args[1:-1], "--ckpt_path", "last"])


def test_the_cli_installs_atomic_writes_and_exact_resume(tmp_path) -> None:
    cli = run_cli(cli_args(1, tmp_path / "r.jsonl")[1:], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert sum(isinstance(c, ExactResume) for c in cli.trainer.callbacks) == 1
