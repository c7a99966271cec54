"""One short check of a GPU (about 6 minutes on one modern GPU, no downloads), with every figure in one JSON file.

    python benchmarks/gpu_check.py                                  # on the GPU, realistic sizes
    python benchmarks/gpu_check.py --device cpu --tiny --out x.json # the CPU smoke run (tests/test_gpu_check.py)

1. For each task: a few hundred Lightning training steps (``bf16-mixed``, channels_last) of a realistic-size model on
   its synthetic data (rendered once and cycled from memory, so the renderer does not limit the GPU): images (or
   windows) per second after warm-up and peak GPU memory. Realistic sizes: face ResNet-50 at 112 px, batch 128,
   512-d embeddings, Partial FC over 100k identities at sample rate 0.1; FCOS, VFNet and DETR ResNet-50 at 512 px,
   batch 8; DeepLabV3+ ResNet-50 (output stride 16) at 512 px, batch 8; RLE ResNet-50 at 256x192, batch 32; OadTR
   at THUMOS size (3072-d features, window 64), batch 128.
2. ``torch.compile`` on the segmentation network (dropout off): compile time, eager vs compiled training-step time,
   and the first step's loss difference from the same weights (bf16 autocast: allowed 5e-2 relative).
3. The benchmarks against their references on the same device: ``benchmarks/detection_speed.py --device cuda``
   (FCOS vs torchvision) and ``benchmarks/margin_speed.py --device cuda`` (full softmax vs Partial FC vs
   pytorch-metric-learning); their printed tables go into the JSON as lines.

A task joins by adding a ``TaskSpec`` to ``TASKS`` (a builder of the task and its synthetic DataModule at both
sizes). Failures of one part are recorded in the JSON and the script exits with status 1 after the other parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import traceback
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # timing.py, also when a test loads this file by its path

from datamodules.synthetic.figures_keypoints import FiguresKeypointDataModule  # noqa: E402
from datamodules.synthetic.identities import SyntheticFacesDataModule  # noqa: E402
from datamodules.synthetic.shapes_detection import ShapesDetectionDataModule  # noqa: E402
from datamodules.synthetic.shapes_segmentation import ShapesSegmentationDataModule  # noqa: E402
from datamodules.synthetic.streams import SyntheticStreamsDataModule  # noqa: E402
from lit_tasks import (  # noqa: E402
    ActionDetectionTask,
    DetectionTask,
    FaceRecognitionTask,
    PoseTask,
    SemanticSegmentationTask,
)
from lit_tasks.cli import LINKED_SIZES  # noqa: E402
from timing import Stopwatch  # noqa: E402


@dataclass
class TaskSpec:
    """``build(tiny) -> (task, datamodule)``; ``unit``: what a sample is (images, windows)."""

    build: Callable[[bool], tuple[pl.LightningModule, pl.LightningDataModule]]
    unit: str = "images"


def face(tiny: bool):
    if tiny:
        data = SyntheticFacesDataModule(num_train_identities=20, samples_per_identity=2, image_size=32, batch_size=4,
                                        num_workers=0)
        return FaceRecognitionTask(num_identities=20, backbone="test_resnet", image_size=32, embedding_size=16,
                                   partial_fc=True, sample_rate=0.5, num_log_images=0), data
    data = SyntheticFacesDataModule(num_train_identities=1000, samples_per_identity=2, image_size=112, batch_size=128,
                                    num_workers=0)
    return FaceRecognitionTask(num_identities=100_000, backbone="resnet50", image_size=112, embedding_size=512,
                               partial_fc=True, sample_rate=0.1, num_log_images=0), data


def detection(tiny: bool):
    size, batch = (64, 2) if tiny else (512, 8)
    data = ShapesDetectionDataModule(num_train=4 * batch, image_size=size, augment=False, batch_size=batch, num_workers=0)
    if tiny:
        return DetectionTask(num_classes=data.num_classes, backbone="resnet10t", fpn_channels=16, head_convs=1,
                             num_log_images=0), data
    return DetectionTask(num_classes=80, backbone="resnet50", num_log_images=0), data


def linked(task_class: type, data: pl.LightningDataModule) -> dict[str, Any]:
    """The sizes the CLI links from the DataModule into the task (those the task takes)."""
    import inspect

    takes = inspect.signature(task_class.__init__).parameters
    return {name: getattr(data, name) for name in LINKED_SIZES if name in takes and hasattr(data, name)}


def detector(model: str) -> Callable[[bool], tuple[pl.LightningModule, pl.LightningDataModule]]:
    """VFNet / DETR as the FCOS case: R-50 at 512 px, batch 8 (tiny: ResNet-10-T at 64 px)."""

    def build(tiny: bool):
        size, batch = (64, 2) if tiny else (512, 8)
        data = ShapesDetectionDataModule(num_train=4 * batch, image_size=size, augment=False, batch_size=batch,
                                         num_workers=0)
        if not tiny:
            return DetectionTask(num_classes=80, model=model, backbone="resnet50", num_log_images=0), data
        small = (dict(d_model=32, nheads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                      num_queries=10) if model == "detr" else dict(fpn_channels=16, head_convs=1))
        return DetectionTask(num_classes=data.num_classes, model=model, backbone="resnet10t", num_log_images=0,
                             **small), data

    return build


def pose(tiny: bool):
    """RLE: ResNet-50 at 256x192, batch 32 (the COCO recipe's input; tiny: test_resnet at 32x24)."""
    size, crop, batch = (64, [32, 24], 2) if tiny else (256, [256, 192], 32)
    data = FiguresKeypointDataModule(num_train=4 * batch, num_val=2, image_size=size, input_size=crop,
                                     batch_size=batch, num_workers=0)
    return PoseTask(backbone="test_resnet" if tiny else "resnet50", num_log_images=0, **linked(PoseTask, data)), data


def action(tiny: bool):
    """OadTR at its THUMOS size (3072-d features, window 64, 8 anticipated frames), batch 128; tiny: 16-d, 8."""
    if tiny:
        data = SyntheticStreamsDataModule(num_train=4, num_val=2, num_test=2, min_frames=30, max_frames=50, window=8,
                                          num_future=4, batch_size=4, num_workers=0)
        small = dict(embed_dim=32, enc_layers=1, enc_heads=4, enc_mlp_dim=48, dec_layers=1, dec_heads=2,
                     dec_ffn_dim=40)
        return ActionDetectionTask(num_log_streams=0, **small, **linked(ActionDetectionTask, data)), data
    data = SyntheticStreamsDataModule(num_train=64, num_val=2, num_test=2, feature_dim=3072, window=64, num_future=8,
                                      batch_size=128, num_workers=0)
    return ActionDetectionTask(num_log_streams=0, **linked(ActionDetectionTask, data)), data


def segmentation(tiny: bool, dropout: float = 0.1):
    size, batch = (32, 2) if tiny else (512, 8)
    data = ShapesSegmentationDataModule(num_train=4 * batch, image_size=size, augment=False, batch_size=batch,
                                        num_workers=0)
    if tiny:
        return SemanticSegmentationTask(num_classes=data.num_classes, backbone="test_resnet", head_channels=16,
                                        dropout=dropout, num_log_images=0), data
    return SemanticSegmentationTask(num_classes=21, backbone="resnet50", output_stride=16, dropout=dropout,
                                    num_log_images=0), data


TASKS: dict[str, TaskSpec] = {
    "face_recognition": TaskSpec(face),
    "detection_fcos": TaskSpec(detection),
    "segmentation_deeplabv3plus": TaskSpec(segmentation),
    "detection_vfnet": TaskSpec(detector("vfnet")),
    "detection_detr": TaskSpec(detector("detr")),
    "pose_rle": TaskSpec(pose),
    "action_oadtr": TaskSpec(action, unit="windows"),
}


class Cycled(Dataset):
    """``length`` samples cycling through a few samples rendered once (kept in memory)."""

    def __init__(self, samples: list[Any], length: int) -> None:
        self.samples, self.length = samples, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.samples[index % len(self.samples)]


class StepTimer(pl.Callback):
    """Wall time of the training steps after ``warmup`` (synchronised with the device): ``seconds`` of ``steps``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps = warmup, 0
        self.watch: Stopwatch | None = None

    @property
    def seconds(self) -> float:
        """Wall seconds from the first timed step's start to the last step's end."""
        return self.watch.wall

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.watch is None:
            self.watch = Stopwatch(sync=trainer.strategy.root_device.type == "cuda").start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.watch is not None:
            self.watch.stop()
            self.steps = trainer.global_step - self.warmup
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {trainer.global_step}")


def train_speed(name: str, spec: TaskSpec, device: str, tiny: bool, steps: int, warmup: int) -> dict[str, Any]:
    """Images (or windows) per second of ``steps`` bf16-mixed training steps after ``warmup``, and peak memory."""
    torch.manual_seed(0)
    task, data = spec.build(tiny)
    data.setup("fit")
    batch = data.batch_size
    samples = [data.train_set[i] for i in range(min(len(data.train_set), 4 * batch))]
    loader = DataLoader(Cycled(samples, (steps + warmup) * batch), batch_size=batch, collate_fn=data.collate_fn,
                        num_workers=2 if device == "cuda" else 0, pin_memory=device == "cuda", drop_last=True)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(accelerator=device, devices=1, precision="bf16-mixed", max_steps=steps + warmup,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=loader)
    seconds = timer.seconds
    result = {"batch_size": batch, "steps_timed": timer.steps, "seconds": round(seconds, 3),
              f"{spec.unit}_per_second": round(timer.steps * batch / seconds, 2),
              "final_loss": float(trainer.callback_metrics["train/loss"])}
    if device == "cuda":
        result["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def compile_check(device: str, tiny: bool, steps: int, backend: str) -> dict[str, Any]:
    """Eager vs ``torch.compile`` training steps of the segmentation network on one fixed batch (bf16 autocast)."""
    torch.manual_seed(0)
    task, data = segmentation(tiny, dropout=0.0)  # no random masks: eager and compiled see the same computation
    data.setup("fit")
    batch = data.collate_fn([data.train_set[i] for i in range(data.batch_size)])
    images, masks = batch["image"].to(device), batch["mask"].to(device)
    eager = task.to(device).train()
    twin = deepcopy(eager)  # the same weights, compiled
    nets = {"eager": (eager.model, eager), "compiled": (torch.compile(twin.model, backend=backend), twin)}
    optimizers = {k: torch.optim.SGD(owner.parameters(), lr=1e-3, momentum=0.9) for k, (_, owner) in nets.items()}

    def step(kind: str) -> tuple[float, float]:
        net, owner = nets[kind]
        with Stopwatch(sync=device == "cuda") as watch:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = owner.total_loss(owner.criterion(net(images), None, masks), "train")
            optimizers[kind].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[kind].step()
        return loss.item(), watch.wall

    eager_loss, _ = step("eager")
    compiled_loss, compile_seconds = step("compiled")  # the first call compiles
    eager_ms = 1e3 * min(step("eager")[1] for _ in range(steps))
    compiled_ms = 1e3 * min(step("compiled")[1] for _ in range(steps))
    relative = abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-12)
    return {"task": "segmentation_deeplabv3plus", "backend": backend, "compile_seconds": round(compile_seconds, 2),
            "eager_step_ms": round(eager_ms, 2), "compiled_step_ms": round(compiled_ms, 2),
            "speedup": round(eager_ms / compiled_ms, 3), "first_loss_eager": eager_loss,
            "first_loss_compiled": compiled_loss, "first_loss_relative_difference": relative,
            "ok": relative <= 5e-2}


def run_benchmark(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` in a subprocess; its printed lines, status and wall time."""
    with Stopwatch() as watch:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    result = {"args": args, "returncode": done.returncode, "seconds": round(watch.wall, 1), "lines": lines}
    if done.returncode:
        result["stderr_tail"] = done.stderr[-3000:]
    return result


def environment(device: str) -> dict[str, Any]:
    info = {"torch": torch.__version__, "lightning": pl.__version__, "python": platform.python_version(),
            "device": device, "host": platform.node()}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    bf16_supported=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny models and images (the CPU smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per task (default 200; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 20; tiny 1)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the CPU test: eager)")
    parser.add_argument("--benchmarks", nargs="*", default=["detection", "margin"], choices=["detection", "margin"])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON of every figure")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu --tiny for the CPU smoke run")
    steps = args.steps if args.steps is not None else (2 if args.tiny else 200)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 20)
    torch.set_float32_matmul_precision("high")
    report: dict[str, Any] = {"environment": environment(args.device), "tiny": args.tiny, "training": {},
                              "compile": None, "benchmarks": {}, "errors": {}}
    total = Stopwatch().start()

    def attempt(key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:  # noqa: BLE001  (recorded; the other parts still run)
            report["errors"][key] = traceback.format_exc(limit=8)
            print(f"!! {key} failed:\n{report['errors'][key]}", flush=True)
            return None

    for name in args.tasks:
        result = attempt(f"training/{name}", lambda: train_speed(name, TASKS[name], args.device, args.tiny, steps, warmup))
        if result is not None:
            report["training"][name] = result
            print(f"{name:28s} {json.dumps(result)}", flush=True)
    report["compile"] = attempt("compile", lambda: compile_check(args.device, args.tiny, max(steps // 20, 2),
                                                                 args.compile_backend))
    print(f"torch.compile {json.dumps(report['compile'])}", flush=True)
    if "detection" in args.benchmarks:
        report["benchmarks"]["detection_speed"] = attempt("benchmarks/detection_speed", lambda: run_benchmark(
            "detection_speed.py", ["--device", args.device, "--steps", "1" if args.tiny else "10"], timeout=900))
    if "margin" in args.benchmarks:
        margin = (["--classes", "1000", "--kinds", "full", "pfc", "--steps", "1", "--repeats", "1"] if args.tiny else
                  ["--classes", "100000", "1000000", "--steps", "10", "--repeats", "1"])
        report["benchmarks"]["margin_speed"] = attempt("benchmarks/margin_speed", lambda: run_benchmark(
            "margin_speed.py", ["--device", args.device, *margin], timeout=900))
    for name, result in report["benchmarks"].items():
        if result is not None:
            print(f"\n== {name} (exit {result['returncode']}, {result['seconds']} s)\n" + "\n".join(result["lines"]))
            if result["returncode"]:
                report["errors"][f"benchmarks/{name}"] = result.get("stderr_tail", "")
    report["total_seconds"] = round(total.stop().wall, 1)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({report['total_seconds']} s){'; ERRORS in ' + ', '.join(report['errors']) if report['errors'] else ''}")
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
