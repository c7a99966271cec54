"""Two machines, simulated on localhost: two ``torchrun`` launches (``--nnodes 2 --node-rank 0/1``, one process each,
gloo on CPU) run ``lit-tasks fit --trainer.num_nodes 2``; both nodes train, ``last.ckpt`` holds the whole model (for
Partial FC the centre matrix gathered from both nodes' shards), and the validation metric of the two-node fit equals
a one-process ``lit-tasks validate`` of that checkpoint (evaluation loaders give each sample to one process only and
metrics sync whole). A new task joins by adding a ``NodeCase``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ddp_helpers import free_port
from lit_tasks.cli import run_cli
from resume_probe import read_losses, read_validations, recorder_args

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class NodeCase:
    """A synthetic config shrunk for CPU; ``metrics``: validation keys compared with the one-process evaluation."""

    config: str
    args: list[str]
    max_steps: int
    metrics: tuple[str, ...]
    marks: list = field(default_factory=list)


NODE_CASES = {
    # 12 training faces of 6 identities, 3 per batch per node: 2 steps per epoch; 8 verification pairs, 4 per node
    "face_partial_fc": NodeCase("configs/face/arcface_synthetic.yaml", [
        "--data.num_train_identities=6", "--data.samples_per_identity=2", "--data.num_val_identities=4",
        "--data.val_samples_per_identity=2", "--data.num_val_pairs=8", "--data.batch_size=3", "--data.num_workers=0",
        "--data.image_size=32", "--model.image_size=32", "--model.embedding_size=16", "--model.num_log_images=0",
        "--model.partial_fc=true", "--model.sample_rate=0.5"], max_steps=4,
        metrics=("val/verification_accuracy", "val/auc", "val/tar_at_far_1e-2")),
    # 30 steps (15 epochs of 2 steps, validated once at the end) make mAP > 0 on the 5 validation images (3 + 2)
    "detection_fcos": NodeCase("configs/detection/fcos_shapes.yaml", [
        "--data.num_train=8", "--data.num_val=5", "--data.batch_size=2", "--data.num_workers=0", "--data.augment=false",
        "--model.fpn_channels=16", "--model.head_convs=1", "--model.num_log_images=0", "--model.score_threshold=0.0",
        "--model.warmup_steps=0", "--model.optimizer.init_args.lr=0.01", "--trainer.check_val_every_n_epoch=15",
        "--trainer.max_epochs=15"],  # the demo config stops at 4 epochs
        max_steps=30, metrics=("val/map", "val/map_50", "val/mar_100"), marks=[pytest.mark.slow]),
}
COMMON = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"]


def torchrun_two_nodes(args: list[str], cwd: Path, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --node-rank R --nproc-per-node 1`` for R = 0, 1 on 127.0.0.1, run together."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    launches = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                          "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                          str(ROOT / "tests" / "resume_probe.py"), *args],
                         cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    results = []
    try:
        for launch in launches:
            out, _ = launch.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, ""))
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
                launch.wait()
    return results


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in NODE_CASES.items()])
def test_two_torchrun_nodes_fit_and_match_a_one_process_evaluation(name: str, tmp_path: Path) -> None:
    case = NODE_CASES[name]
    data = ["--config", str(ROOT / case.config), *case.args, *COMMON]
    records = tmp_path / "records.jsonl"
    nodes = torchrun_two_nodes(["fit", *data, f"--trainer.max_steps={case.max_steps}", "--trainer.num_nodes=2",
                                "--trainer.devices=1", "--trainer.accelerator=cpu", "--trainer.strategy=ddp",
                                *recorder_args(records)], cwd=tmp_path)
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}:\n{node.stdout[-4000:]}"
    # both nodes trained every step (each process records its own losses)
    assert [sorted(read_losses(records, rank)) for rank in (0, 1)] == [list(range(1, case.max_steps + 1))] * 2

    [last] = tmp_path.glob("lightning_logs/*/version_0/checkpoints/last.ckpt")
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == case.max_steps
    if name == "face_partial_fc":
        state, hp = checkpoint["state_dict"], checkpoint["hyper_parameters"]
        num_identities, size = hp["num_identities"], hp["embedding_size"]
        # the config's AdamW: the centres' optimizer state is Adam's first moment (SGD's would be momentum_buffer)
        assert state["criterion.weight"].shape == state["criterion.exp_avg"].shape == (num_identities, size)
        # rows [0, 3) lived on node 0 and [3, 6) on node 1: both shards trained (moments) and came back whole
        trained = state["criterion.exp_avg"].abs().sum(dim=1) > 0
        assert trained[:3].any() and trained[3:].any()
        assert read_losses(records, 0) == read_losses(records, 1)  # Partial FC's loss is the global batch's

    # the last validation ran at the final step, on the weights last.ckpt holds; both nodes report the same values
    (step, two_nodes), (step_1, on_node_1) = read_validations(records, 0)[-1], read_validations(records, 1)[-1]
    assert step == step_1 == case.max_steps and two_nodes == on_node_1
    single = run_cli(["validate", *data, "--ckpt_path", str(last), "--trainer.devices=1", "--trainer.accelerator=cpu",
                      "--trainer.logger=false"])
    for key in case.metrics:
        assert single.trainer.callback_metrics[key].item() == pytest.approx(two_nodes[key], abs=1e-6), key
    assert any(two_nodes[key] > 0 for key in case.metrics)  # not a comparison of zeros
