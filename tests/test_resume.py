"""Kill -9 and resume, per task: ``lit-tasks fit`` killed with SIGKILL mid-epoch and restarted with ``--ckpt_path last``
computes, step for step, the same losses as a run that never stopped, and ends with the same weights, optimizer,
scheduler, AMP scaler and (Partial FC) centre and momentum state.

Each case runs the reference in this process, the killed run as a subprocess (``tests/resume_probe.py``, one thread)
and the resumed run in this process again, all with one thread and ``deterministic``. The checkpoint the resumed run
starts from is a mid-epoch ``last.ckpt`` of ``--checkpoint.every_n_train_steps`` in the second epoch, so the epoch's
data order (``ResumableDataLoader``), the random generators (dropout, Partial FC's sampling, the face flip) and the
schedule must all come back. A new task joins by adding a ``ResumeCase`` (its synthetic config, shrunk).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lit_tasks.cli import run_cli
from resume_probe import read_losses, read_validations, recorder_args, step_clock_args, steps_in_order

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ResumeCase:
    """A synthetic config shrunk so an epoch is ``batches_per_epoch`` batches; checkpoints every 3 steps."""

    config: str
    args: list[str]
    batches_per_epoch: int = 4
    every_n: int = 3
    kill_at: int = 7  # killed after step 7: the last checkpoint is step 6, in the second epoch
    max_steps: int = 10
    marks: list = field(default_factory=list)


COMMON = ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          "--trainer.deterministic=true", "--trainer.log_every_n_steps=1"]
FACE = ["--data.num_train_identities=6", "--data.samples_per_identity=4", "--data.num_val_identities=4",
        "--data.val_samples_per_identity=2", "--data.num_val_pairs=8", "--data.batch_size=6", "--data.num_workers=0",
        "--data.image_size=32", "--model.image_size=32", "--model.embedding_size=16", "--model.num_log_images=0",
        "--model.dropout=0.2"]
# float16 autocast with a GradScaler on CPU (Lightning turns --trainer.precision=16-mixed into bf16 on CPU): the
# scale starts at 65536 and halves on the first overflowing steps, so the resumed run must restore it.
FP16_WITH_SCALER = ["--trainer.precision=null", "--trainer.plugins=" + json.dumps({
    "class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
    "init_args": {"precision": "16-mixed", "device": "cpu",
                  "scaler": {"class_path": "torch.amp.GradScaler", "init_args": {"device": "cpu"}}}})]
RESUME_CASES = {
    # Partial FC with half the centres sampled per step, float16 + GradScaler, dropout, random flips
    "face_partial_fc": ResumeCase("configs/face/arcface_synthetic.yaml", [
        *FACE, "--model.partial_fc=true", "--model.sample_rate=0.5", *FP16_WITH_SCALER]),
    "detection_fcos": ResumeCase("configs/detection/fcos_shapes.yaml", [
        "--data.num_train=16", "--data.num_val=2", "--data.batch_size=4", "--data.num_workers=0", "--data.augment=false",
        "--model.fpn_channels=16", "--model.head_convs=1", "--model.num_log_images=0"], marks=[pytest.mark.slow]),
    "segmentation_deeplabv3plus": ResumeCase("configs/segmentation/deeplabv3plus_shapes.yaml", [
        "--data.num_train=16", "--data.num_val=2", "--data.batch_size=4", "--data.num_workers=0",
        "--data.image_size=32", "--model.head_channels=16", "--model.num_log_images=0"], marks=[pytest.mark.slow]),
    "detection_vfnet": ResumeCase("configs/detection/vfnet_shapes.yaml", [
        "--data.num_train=16", "--data.num_val=2", "--data.batch_size=4", "--data.num_workers=0", "--data.augment=false",
        "--model.fpn_channels=16", "--model.head_convs=1", "--model.num_log_images=0"], marks=[pytest.mark.slow]),
    "detection_detr": ResumeCase("configs/detection/detr_shapes.yaml", [
        "--data.num_train=16", "--data.num_val=2", "--data.batch_size=4", "--data.num_workers=0", "--data.augment=false",
        "--model.d_model=32", "--model.dim_feedforward=64", "--model.dropout=0.1", "--model.num_log_images=0"],
        marks=[pytest.mark.slow]),
    # the number of figures per image varies: the epoch is cut at 4 batches; the top-down augmentation stays on (it
    # draws from torch's generator, which the resume restores)
    "pose_rle": ResumeCase("configs/pose/rle_shapes.yaml", [
        "--data.num_train=16", "--data.num_val=2", "--data.batch_size=4", "--data.num_workers=0",
        "--model.num_log_images=0", "--trainer.limit_train_batches=4"], marks=[pytest.mark.slow]),
    "action_oadtr": ResumeCase("configs/action/oadtr_synthetic.yaml", [
        "--data.batch_size=8", "--data.num_workers=0", "--model.num_log_streams=0", "--trainer.limit_train_batches=4"],
        marks=[pytest.mark.slow]),
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # Lightning's deterministic=True sets it for the whole process


def case_args(case: ResumeCase, records: Path, kill_at: int | None = None) -> list[str]:
    return ["fit", "--config", str(ROOT / case.config), *case.args, *COMMON, f"--trainer.max_steps={case.max_steps}",
            f"--checkpoint.every_n_train_steps={case.every_n}", *recorder_args(records, kill_at)]


def load_last(folder: Path) -> dict:
    [path] = folder.glob("lightning_logs/*/version_0/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, where: str = "") -> None:
    """Equal nested checkpoint content: tensors bit for bit, everything else by value."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in RESUME_CASES.items()])
def test_sigkill_mid_epoch_then_ckpt_path_last_continues_exactly(name: str, tmp_path, monkeypatch, one_thread) -> None:
    case = RESUME_CASES[name]
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference_dir.mkdir(), run_dir.mkdir()
    monkeypatch.chdir(reference_dir)
    reference_cli = run_cli(case_args(case, reference_dir / "losses.jsonl"))
    assert reference_cli.trainer.num_training_batches == case.batches_per_epoch
    reference = read_losses(reference_dir / "losses.jsonl")
    assert sorted(reference) == list(range(1, case.max_steps + 1))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "resume_probe.py"),
                             *case_args(case, run_dir / "losses.jsonl", kill_at=case.kill_at)],
                            cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    saved = (case.kill_at // case.every_n) * case.every_n
    assert load_last(run_dir)["global_step"] == saved  # the kill lost the steps after the last periodic checkpoint

    monkeypatch.chdir(run_dir)
    run_cli([*case_args(case, run_dir / "losses.jsonl"), "--ckpt_path", "last"])
    steps = steps_in_order(run_dir / "losses.jsonl")
    assert steps == [*range(1, case.kill_at + 1), *range(saved + 1, case.max_steps + 1)]  # resumed after step 6
    assert read_losses(run_dir / "losses.jsonl") == reference  # every step's loss, bit for bit

    final, expected = load_last(run_dir), load_last(reference_dir)
    assert final["global_step"] == expected["global_step"] == case.max_steps
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "epoch"):
        assert_same_state(final[key], expected[key], key)
    precision_keys = [k for k in expected if k in ("MixedPrecision", "native_amp_scaling_state")]
    for key in precision_keys:  # the GradScaler's scale and growth tracker
        assert_same_state(final[key], expected[key], key)
    if name == "face_partial_fc":
        assert final["MixedPrecision"]["scale"] < 65536.0  # the scale the resumed run had to restore had moved
        # the centres' own AdamW state (the config's optimizer) was restored: moments and per-row step counts
        state = final["state_dict"]
        assert state["criterion.exp_avg"].abs().sum() > 0 and state["criterion.row_steps"].sum() > 0


# -- a fit stopped in the middle of an epoch (max_time, max_steps), then resumed without the limit -------------------
# Lightning's own Timer on a fake clock of 60 s per step (resume_probe.StepClock): time is up after step 6
MAX_TIME_AFTER_STEP_6 = [*step_clock_args(60.0), '--trainer.max_time={"minutes": 5, "seconds": 30}']
MID_EPOCH_STOPS = {  # (arguments of every run, arguments of the stopped run only)
    "max_time": ([], MAX_TIME_AFTER_STEP_6),
    "max_steps": ([], ["--trainer.max_steps=6"]),
    # a validation after every step (one is due at step 6 itself; last.ckpt follows it), which also makes Lightning's
    # ModelCheckpoint save at epoch ends (val_check_interval == 1), where the cut epoch counts as finished
    "max_time_at_a_validation": (["--trainer.val_check_interval=1"], MAX_TIME_AFTER_STEP_6),
}


@pytest.mark.parametrize("stop", list(MID_EPOCH_STOPS))
def test_a_fit_stopped_mid_epoch_then_ckpt_path_last_finishes_that_epoch_exactly(stop: str, tmp_path, monkeypatch,
                                                                                 one_thread) -> None:
    """Two epochs of 4 steps; the first fit stops after step 6, in the middle of the last epoch, and ``fit
    --ckpt_path last`` without the limit trains steps 7 and 8 and ends where a fit that never stopped ends: the
    same losses, validations, weights, optimizer and schedule, bit for bit. Lightning marks an epoch cut by a stop
    as finished, so before the fix the resumed fit ended at once (``max_epochs=2`` reached).

    The stop's own validation (Lightning validates when a fit is stopped) draws from the random generators (the
    validation loader's seed): the checkpoint must hold the state of the step boundary, not of after that validation,
    or the resumed dropout masks differ; a validation that is due at that step anyway comes first. No periodic
    checkpoints: the end of the stopped fit writes last.ckpt."""
    every_run, stop_args = MID_EPOCH_STOPS[stop]
    args = ["fit", "--config", str(ROOT / "configs/face/arcface_synthetic.yaml"), *FACE, *COMMON, *every_run,
            "--trainer.max_epochs=2", "--trainer.max_steps=-1", "--trainer.max_time=null"]
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference_dir.mkdir(), run_dir.mkdir()
    monkeypatch.chdir(reference_dir)
    reference_cli = run_cli([*args, *recorder_args(reference_dir / "losses.jsonl")])
    assert reference_cli.trainer.num_training_batches == 4 and reference_cli.trainer.global_step == 8

    monkeypatch.chdir(run_dir)
    records = run_dir / "losses.jsonl"
    stopped = run_cli([*args, *recorder_args(records), *stop_args])
    assert stopped.trainer.global_step == 6 and load_last(run_dir)["global_step"] == 6
    resumed = run_cli([*args, *recorder_args(records), "--ckpt_path", "last"])
    assert steps_in_order(records) == list(range(1, 9))
    assert resumed.trainer.global_step == 8 and resumed.trainer.current_epoch == 2
    assert read_losses(records) == read_losses(reference_dir / "losses.jsonl")
    # the validations after step 6 equal the uninterrupted run's (the one at step 6 came before the stop)
    expected_validations = [v for v in read_validations(reference_dir / "losses.jsonl") if v[0] > 6]
    assert expected_validations and read_validations(records)[-len(expected_validations):] == expected_validations

    final, expected = load_last(run_dir), load_last(reference_dir)
    assert final["global_step"] == expected["global_step"] == 8
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "epoch"):
        assert_same_state(final[key], expected[key], key)
