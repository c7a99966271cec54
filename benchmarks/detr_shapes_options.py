"""Effect of each DETR convergence option on the shapes demo at equal steps (issue 23).

Runs ``configs/detection/detr_shapes.yaml`` through the real ``lit-tasks`` CLI (in-process, its own TensorBoard
logger in a temporary folder) once per variant, each for the same ``--steps`` optimizer steps with no time cap and
the same seed, then prints the validation COCO mAP / mAP@0.5 and the wall time of each. A variant is the config
with one or more options switched (``--variants`` names them; ``config`` is the file as it is).

    python benchmarks/detr_shapes_options.py [--steps 1500] [--variants config,paper,no_content,no_selection,dn,backbone_lr_1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lit_tasks.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "detection" / "detr_shapes.yaml"

# Each variant: the overrides applied to the config (the config's own values are what "config" runs).
VARIANTS: dict[str, list[str]] = {
    "config": [],
    "paper": ["--model.aux_dense_head=false", "--model.anchor_queries=false",
              "--model.query_selection=false", "--model.selection_content=false", "--model.backbone_lr_ratio=1.0"],
    "no_content": ["--model.selection_content=false"],
    "no_selection": ["--model.query_selection=false", "--model.selection_content=false"],
    "dn": ["--model.dn_groups=5"],
    "backbone_lr_1": ["--model.backbone_lr_ratio=1.0"],
    "groups_no_selection": ["--model.query_selection=false", "--model.selection_content=false",
                            "--model.anchor_queries=false", "--model.query_groups=4"],
}


def run(name: str, steps: int, extra: list[str], folder: Path) -> dict[str, float]:
    """One fit of ``steps`` steps; the last validation's mAP figures and the wall time."""
    start = time.perf_counter()
    cli = run_cli(["fit", "--config", str(CONFIG), *VARIANTS[name], *extra, f"--trainer.max_steps={steps}",
                   "--trainer.max_epochs=-1", "--trainer.max_time=null", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={folder}",
                   f"--trainer.logger.init_args.name={name}", f"--trainer.default_root_dir={folder}"])
    metrics = cli.trainer.callback_metrics
    return {"steps": cli.trainer.global_step, "map": float(metrics["val/map"]),
            "map_50": float(metrics["val/map_50"]), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per variant (the config: 1500)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--extra", default="", help="more CLI overrides for every variant, space-separated")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    print(f"load average before: {os.getloadavg()}, torch threads: {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append((name, run(name, args.steps, args.extra.split(), Path(tmp))))
            print(f"{name}: {rows[-1][1]}", flush=True)
    print(f"\nDETR shapes demo, {args.steps} steps each, seed 0 (validation: 200 images)")
    print(f"{'variant':12} {'steps':>6} {'mAP':>7} {'mAP@0.5':>8} {'wall s':>8}")
    for name, r in rows:
        print(f"{name:12} {r['steps']:6d} {r['map']:7.3f} {r['map_50']:8.3f} {r['seconds']:8.0f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
