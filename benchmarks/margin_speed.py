"""One training step of a margin-softmax head: full softmax vs Partial FC vs pytorch-metric-learning.

A step is forward, backward and the SGD update (lr 0.1, momentum 0.9, weight decay 5e-4) of the
class centres, for a batch of 256 512-d embeddings (a leaf tensor standing in for the backbone):

* ``full``: :class:`lit_tasks.losses.margin.MarginSoftmaxLoss` (ArcFace s=64 m=0.5) + ``torch.optim.SGD``;
* ``pfc``: :class:`lit_tasks.losses.partial_fc.PartialFC` with ``sample_rate=0.1`` and its lazy SGD;
* ``pml``: ``pytorch_metric_learning.losses.ArcFaceLoss`` (m=28.6 deg = 0.5 rad, s=64) + ``torch.optim.SGD``,
  the external reference (``pip install pytorch-metric-learning``, the ``bench`` extra);
* ``pfc x2``: Partial FC over 2 processes (gloo), 128 embeddings each, every process holding half the centres.

Every configuration runs in a fresh process; time is the mean of ``--steps`` steps after one warm-up
(the fastest of ``--repeats`` interleaved runs),
memory the process's peak resident set above its resident set before the centres were allocated
(on CUDA: ``torch.cuda.max_memory_allocated``). Configurations whose estimated memory exceeds what
the machine has available are skipped and reported as such.

    python benchmarks/margin_speed.py [--classes 10000 100000 1000000] [--device cpu] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import Stopwatch  # noqa: E402  (benchmarks/ is on the path when a script runs)

BATCH, DIM = 256, 512
KINDS = ("full", "pfc", "pml", "pfc_x2")


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def estimate_mb(kind: str, classes: int) -> float:
    """Rough peak: centre-sized buffers (weight, grad, momentum, normalised copy and its grad) + logits."""
    centre_bytes, logit_bytes = classes * DIM * 4, BATCH * classes * 4
    if kind in ("full", "pml"):
        return (5 * centre_bytes + 4 * logit_bytes) / 2**20
    share = 0.5 if kind == "pfc_x2" else 1.0
    return (2 * share * centre_bytes + 0.5 * centre_bytes * share + 0.4 * logit_bytes) / 2**20


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024


def build(kind: str, classes: int, device: str, rank: int = 0, world: int = 1):
    """The step function of one configuration (centres allocated here)."""
    import torch

    from lit_tasks.losses.margin import ArcFace, MarginSoftmaxLoss
    from lit_tasks.losses.partial_fc import PartialFC

    batch = BATCH // world
    emb = torch.randn(batch, DIM, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)
    if kind.startswith("pfc"):
        head = PartialFC(num_classes=classes, embedding_size=DIM, margin=ArcFace(64.0, 0.5), sample_rate=0.1,
                         rank=rank, world_size=world).to(device)

        sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}  # the full-softmax runs' SGD, applied lazily

        def step():
            head(emb, labels).backward()
            head.step(sgd)
            emb.grad = None

        return step
    if kind == "full":
        head = MarginSoftmaxLoss(classes, DIM, ArcFace(64.0, 0.5)).to(device)
        loss_fn = head
    else:
        from pytorch_metric_learning.losses import ArcFaceLoss

        head = ArcFaceLoss(classes, DIM, margin=28.6, scale=64).to(device)
        loss_fn = head
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step():
        loss_fn(emb, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        emb.grad = None

    return step


def measure(kind: str, classes: int, device: str, steps: int, rank: int = 0, world: int = 1) -> dict:
    import torch

    import lit_tasks.losses.partial_fc  # noqa: F401  (imports are not part of the measured memory)

    if kind == "pml":
        import pytorch_metric_learning.losses  # noqa: F401
    torch.manual_seed(rank)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_mb()
    step = build(kind, classes, device, rank, world)
    step()  # warm-up (allocates optimizer state)
    with Stopwatch(sync=device == "cuda") as watch:  # one clock around the steps: the mean, without a sync per step
        for _ in range(steps):
            step()
    seconds = watch.wall / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb() - base
    return {"kind": kind, "classes": classes, "step_s": seconds, "peak_mb": peak}


def _ddp_worker(rank: int, world: int, port: int, classes: int, device: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = measure("pfc_x2", classes, device, steps, rank, world)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def worker(kind: str, classes: int, device: str, steps: int) -> dict:
    if kind != "pfc_x2":
        return measure(kind, classes, device, steps)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(2, port, classes, device, steps, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    return {"kind": kind, "classes": classes, "step_s": max(r["step_s"] for r in ranks),
            "peak_mb": max(r["peak_mb"] for r in ranks)}


def run_one(kind: str, classes: int, device: str, steps: int) -> dict:
    """Runs one configuration in a fresh interpreter (so peak memory is its own)."""
    need, have = estimate_mb(kind, classes), available_mb()
    if device == "cpu" and need > 0.8 * have:
        return {"kind": kind, "classes": classes, "skipped": f"needs ~{need:.0f} MiB, {have:.0f} MiB available"}
    cmd = [sys.executable, __file__, "--worker", kind, "--classes", str(classes), "--device", device,
           "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if proc.returncode != 0:
        return {"kind": kind, "classes": classes, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--repeats", type=int, default=2,
                        help="run every configuration this many times, interleaved; report the fastest")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.classes[0], args.device, args.steps)))
        return
    rows = []
    for classes in args.classes:
        kinds = [k for k in args.kinds if not (k == "pml" and classes > 100_000)]  # pml: 10k and 100k only
        # Interleaved repeats, fastest kept: other processes on a shared machine only ever slow a run down.
        runs = [[run_one(kind, classes, args.device, args.steps) for kind in kinds] for _ in range(args.repeats)]
        for i, kind in enumerate(kinds):
            done = [r[i] for r in runs if "skipped" not in r[i]]
            row = min(done, key=lambda r: r["step_s"]) if done else runs[0][i]
            rows.append(row)
            if "skipped" in row:
                print(f"{kind:7s} {classes:>9,d} classes: skipped ({row['skipped']})", flush=True)
            else:
                print(f"{kind:7s} {classes:>9,d} classes: {row['step_s'] * 1000:9.1f} ms/step  "
                      f"peak {row['peak_mb']:8.0f} MiB", flush=True)
    by = {(r["kind"], r["classes"]): r for r in rows if "skipped" not in r}
    print("\nratios (targets: pfc/full time <= 1/3 and memory <= 1/2 at 1M; pfc x2 / pfc memory <= 0.6; "
          "full/pml time <= 1 at 100k)")
    for classes in args.classes:
        full, pfc, x2, pml = (by.get((k, classes)) for k in ("full", "pfc", "pfc_x2", "pml"))
        parts = []
        if full and pfc:
            parts.append(f"full/pfc time {full['step_s'] / pfc['step_s']:.2f}x, pfc/full memory "
                         f"{pfc['peak_mb'] / full['peak_mb']:.2f}")
        if pfc and x2:
            parts.append(f"pfc x2 per-process / pfc memory {x2['peak_mb'] / pfc['peak_mb']:.2f}")
        if full and pml:
            parts.append(f"full/pml time {full['step_s'] / pml['step_s']:.2f}")
        print(f"{classes:>9,d}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
