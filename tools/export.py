"""Export a trained task's inference network to TorchScript and ONNX, and check the exported numbers.

    python tools/export.py --task lit_tasks.SemanticSegmentationTask --ckpt path/to/best.ckpt --out exported/ \
        [--formats torchscript onnx] [--input-size 512 512] [--atol 1e-4] [--rtol 1e-4]

Every lit-tasks task states the export contract of :class:`lit_tasks.base.BaseTask`:

* ``export_module() -> nn.Module``: the inference network in eval mode, tensors in, a tensor or a tuple of
  tensors out, every one with the batch first (face: images -> L2-normalised embeddings; segmentation: images ->
  logits; detection: images -> the detector's raw outputs, whose post-processing ``detections_from_export``
  documents and applies);
* ``export_example(batch_size=1, size=None) -> tuple[Tensor, ...]``: example inputs (tasks whose input size is free
  take ``size=(H, W)``, given by ``--input-size``, and the exported files are fixed to it; the others refuse one);
* ``export_input_names``, ``export_output_names`` (tuples) and ``export_opset`` (17; VFNet's deformable convolution
  needs 19, where ONNX has ``DeformConv``).

The batch dimension is exported as dynamic; the check runs the exported files with a *different* batch size than
the trace (so a hard-coded batch is caught) through ``torch.jit.load`` and onnxruntime, and fails when any output
element differs from PyTorch's by more than ``atol + rtol * |PyTorch's value|`` (numpy's ``allclose`` rule). The
defaults, 1e-4 and 1e-4, allow for float32 runtimes summing in another order (differences ~1e-6 relative to the
magnitudes summed) over outputs from unit-norm embeddings to box distances of tens of strides.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

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


def input_names(task: nn.Module) -> tuple[str, ...]:
    """The names of the exported network's inputs: ``task.export_input_names``."""
    return tuple(task.export_input_names)


def output_names(task: nn.Module) -> tuple[str, ...]:
    """The names of the exported network's outputs: ``task.export_output_names``."""
    return tuple(task.export_output_names)


def example_inputs(task: nn.Module, batch_size: int, size: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
    """``task.export_example(batch_size, size)``; ``size`` (H, W) only for tasks whose input size is free (the others
    raise ValueError)."""
    return tuple(task.export_example(batch_size, size=None if size is None else tuple(int(v) for v in size)))


def as_arrays(outputs: Any) -> tuple[np.ndarray, ...]:
    """A tensor / array or a tuple / list of them as a tuple of numpy arrays."""
    items = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return tuple(o.detach().cpu().numpy() if torch.is_tensor(o) else np.asarray(o) for o in items)


def export_torchscript(module: nn.Module, example: tuple[torch.Tensor, ...], path: str | Path) -> Path:
    """Trace ``module`` on ``example`` and save it (``torch.jit.load`` reads it without lit_tasks)."""
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=True)
    path = Path(path)
    traced.save(str(path))
    return path


def deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
                           dilation_w, groups, offset_groups, use_mask):
    """``torchvision::deform_conv2d`` as ONNX ``DeformConv`` (opset 19; the same offset layout as torchvision's)."""
    from torch.onnx import symbolic_helper

    kernel = symbolic_helper._get_tensor_sizes(weight)[2:]
    inputs = [input, weight, offset, bias] + ([mask] if use_mask else [])
    return g.op("DeformConv", *inputs, dilations_i=[dilation_h, dilation_w], group_i=groups,
                offset_group_i=offset_groups, kernel_shape_i=kernel, pads_i=[pad_h, pad_w, pad_h, pad_w],
                strides_i=[stride_h, stride_w])


def register_onnx_ops() -> None:
    """Symbolics torchvision does not register: ``deform_conv2d`` (VFNet's star-shaped convolution), opset >= 19."""
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    symbolic = parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")(deform_conv2d_symbolic)
    register_custom_op_symbolic("torchvision::deform_conv2d", symbolic, 19)


def export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: str | Path,
                input_names: Sequence[str] = ("images",), output_names: Sequence[str] = ("output",),
                opset: int = 17) -> Path:
    """ONNX export with a dynamic batch dimension (TorchScript-based exporter: no onnxscript needed)."""
    register_onnx_ops()
    path = Path(path)
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with torch.no_grad():
        torch.onnx.export(module, example, str(path), input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return path


def run_exported(fmt: str, path: str | Path, inputs: tuple[torch.Tensor, ...]) -> np.ndarray | tuple[np.ndarray, ...]:
    """Outputs of an exported file for ``inputs``: one array, or a tuple of them for several outputs."""
    if fmt == "torchscript":
        with torch.no_grad():
            outputs = as_arrays(torch.jit.load(str(path), map_location="cpu")(*inputs))
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        outputs = tuple(session.run(None, feeds))
    return outputs[0] if len(outputs) == 1 else outputs


def compare(got: tuple[np.ndarray, ...], expected: tuple[np.ndarray, ...], names: Sequence[str], atol: float,
            rtol: float) -> tuple[dict[str, float], str | None]:
    """Largest ``|got - expected|`` per output, and a description of the first output beyond the tolerance."""
    if len(got) != len(expected):
        return {}, f"{len(got)} outputs instead of {len(expected)}"
    errors, failure = {}, None
    for name, a, b in zip(names, got, expected):
        if a.shape != b.shape:
            return errors, f"output {name!r} has shape {a.shape} instead of {b.shape}"
        difference = np.abs(a.astype(np.float64) - b.astype(np.float64))
        errors[name] = float(difference.max()) if difference.size else 0.0
        excess = difference - rtol * np.abs(b.astype(np.float64))
        if failure is None and difference.size and not (excess.max() <= atol):
            failure = (f"by {errors[name]:.3g} in output {name!r} > atol {atol:g} + rtol {rtol:g} x |value| "
                       f"(at {np.unravel_index(int(np.argmax(excess)), excess.shape)})")
    return errors, failure


def export(task: nn.Module, out_dir: str | Path, formats: Sequence[str] = FORMATS, atol: float = 1e-4,
           rtol: float = 1e-4, name: str = "model", size: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Export ``task.export_module()`` in each format to ``out_dir`` and check it against PyTorch.

    Returns per format ``{"path", "max_abs_error", "errors": {output: max |difference|}}``.

    Raises:
        ValueError: an unknown format, or an exported model differing beyond ``atol + rtol * |value|``.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from {FORMATS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = task.export_module().eval()
    example = example_inputs(task, 2, size)
    check_inputs = example_inputs(task, 3, size)  # another batch size than the trace
    names = output_names(task)
    with torch.no_grad():
        reference = as_arrays(module(*check_inputs))
    if len(reference) != len(names):
        raise ValueError(f"{type(task).__name__} names {len(names)} outputs {names} but its network returns "
                         f"{len(reference)}")
    report: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        if fmt == "torchscript":
            path = export_torchscript(module, example, out_dir / f"{name}.pt")
        else:
            path = export_onnx(module, example, out_dir / f"{name}.onnx", input_names=input_names(task),
                               output_names=names, opset=task.export_opset)
        errors, failure = compare(as_arrays(run_exported(fmt, path, check_inputs)), reference, names, atol, rtol)
        if failure:
            raise ValueError(f"{fmt} export {path} differs from PyTorch {failure}")
        report[fmt] = {"path": str(path), "max_abs_error": max(errors.values()), "errors": errors}
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="task class path, e.g. lit_tasks.face_recognition.FaceRecognitionTask")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint to export")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="input height and width of the exported files (tasks whose input size is free; "
                             "default: the task's, 512 x 512 for detection and segmentation)")
    parser.add_argument("--atol", type=float, default=1e-4, help="allowed |exported - PyTorch| beyond rtol x |value|")
    parser.add_argument("--rtol", type=float, default=1e-4, help="allowed |exported - PyTorch| relative to |value|")
    args = parser.parse_args(argv)
    report = export(load_task(args.task, args.ckpt), args.out, args.formats, args.atol, args.rtol,
                    size=args.input_size)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
