"""benchmarks/gpu_check.py runs on CPU with tiny sizes, so the GPU check script cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = sys.modules.get(spec.name)
    if module is None:
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
        spec.loader.exec_module(module)
    return module


def run(tmp_path: Path, benchmarks: list[str]) -> dict:
    out = tmp_path / "check.json"
    report = load_script().main(["--device", "cpu", "--tiny", "--out", str(out), "--compile-backend", "eager",
                                 "--benchmarks", *benchmarks])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # every figure is in the file
    return report


def test_the_gpu_check_runs_every_task_and_compile_on_cpu(tmp_path) -> None:
    report = run(tmp_path, [])
    assert not report["errors"], report["errors"]
    assert set(report["training"]) == set(load_script().TASKS)
    for name, figures in report["training"].items():
        unit = load_script().TASKS[name].unit  # images, or windows for online action detection
        assert figures["steps_timed"] == 2 and figures[f"{unit}_per_second"] > 0, name
    assert report["compile"]["ok"] and report["compile"]["backend"] == "eager"
    # dropout off and the same weights: the compiled graph computes the eager loss (bf16 rounding apart)
    assert report["compile"]["first_loss_relative_difference"] < 1e-2


@pytest.mark.slow
def test_the_gpu_check_runs_its_benchmarks_on_cpu(tmp_path) -> None:
    report = run(tmp_path, ["detection", "margin"])
    assert not report["errors"], report["errors"]
    detection, margin = report["benchmarks"]["detection_speed"], report["benchmarks"]["margin_speed"]
    assert any(line.startswith("train step") for line in detection["lines"])
    assert any("pfc" in line and "ms/step" in line for line in margin["lines"])
