"""Export a trained task's inference network to TorchScript and ONNX, and check the exported numbers.

    python tools/export.py --task lit_tasks.face_recognition.FaceRecognitionTask \
        --ckpt path/to/best.ckpt --out exported/ [--formats torchscript onnx] [--atol 1e-4]

Any task plugs in by implementing two methods:

* ``export_module() -> nn.Module``: the inference network in eval mode, tensors in, one tensor out
  (for the face task: ``(B, 3, S, S)`` images in [0, 1] -> L2-normalised ``(B, D)`` embeddings,
  flip-fused as at validation, without the margin head);
* ``export_example(batch_size) -> tuple[Tensor, ...]``: example inputs of the right shape.

The batch dimension is exported as dynamic; the check runs the exported files with a *different* batch
size than the trace (so a hard-coded batch is caught) through ``torch.jit.load`` and onnxruntime, and
fails when any output differs from PyTorch by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

FORMATS = ("torchscript", "onnx")


def load_task(class_path: str, checkpoint: str) -> nn.Module:
    """``module.Class.load_from_checkpoint(checkpoint)`` on CPU, in eval mode."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"--task {class_path!r}: give a full class path such as lit_tasks.FaceRecognitionTask")
    cls = getattr(importlib.import_module(module_name), class_name)
    for method in ("export_module", "export_example"):
        if not hasattr(cls, method):
            raise TypeError(f"{class_path} cannot be exported: it has no {method}() method")
    return cls.load_from_checkpoint(checkpoint, map_location="cpu").eval()


def export_torchscript(module: nn.Module, example: tuple[torch.Tensor, ...], path: str | Path) -> Path:
    """Trace ``module`` on ``example`` and save it (``torch.jit.load`` reads it without lit_tasks)."""
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=True)
    path = Path(path)
    traced.save(str(path))
    return path


def export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: str | Path,
                input_names: Sequence[str] = ("images",), output_names: Sequence[str] = ("output",),
                opset: int = 17) -> Path:
    """ONNX export with a dynamic batch dimension (TorchScript-based exporter: no onnxscript needed)."""
    path = Path(path)
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with torch.no_grad():
        torch.onnx.export(module, example, str(path), input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return path


def run_exported(fmt: str, path: str | Path, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """Output of an exported file for ``inputs`` (first output for ONNX)."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(*inputs).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0]


def export(task: nn.Module, out_dir: str | Path, formats: Sequence[str] = FORMATS, atol: float = 1e-4,
           name: str = "model") -> dict[str, dict[str, object]]:
    """Export ``task.export_module()`` in each format to ``out_dir`` and check it; returns path and max error.

    Raises:
        ValueError: an unknown format, or an exported model differing by more than ``atol``.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from {FORMATS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = task.export_module().eval()
    example = task.export_example(2)
    check_inputs = task.export_example(3)  # another batch size than the trace
    with torch.no_grad():
        reference = module(*check_inputs).numpy()
    report: dict[str, dict[str, object]] = {}
    for fmt in formats:
        if fmt == "torchscript":
            path = export_torchscript(module, example, out_dir / f"{name}.pt")
        else:
            path = export_onnx(module, example, out_dir / f"{name}.onnx",
                               input_names=(getattr(task, "export_input_name", "images"),),
                               output_names=(getattr(task, "export_output_name", "output"),))
        error = float(np.abs(run_exported(fmt, path, check_inputs) - reference).max())
        if not error <= atol:
            raise ValueError(f"{fmt} export {path} differs from PyTorch by {error:.3g} > atol {atol:g}")
        report[fmt] = {"path": str(path), "max_abs_error": error}
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="task class path, e.g. lit_tasks.face_recognition.FaceRecognitionTask")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint to export")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |exported - PyTorch| output")
    args = parser.parse_args(argv)
    report = export(load_task(args.task, args.ckpt), args.out, args.formats, args.atol)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
