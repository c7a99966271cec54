"""tools/export.py: TorchScript and ONNX exports of the face embedder give PyTorch's embeddings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from datamodules.synthetic.identities import SyntheticFacesDataModule
from lit_tasks.face_recognition import FaceRecognitionTask

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_tool = _load_tool()


def tiny_task(**kwargs) -> FaceRecognitionTask:
    torch.manual_seed(0)
    return FaceRecognitionTask(num_identities=6, backbone="test_resnet", image_size=32, embedding_size=16, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-step-trained tiny task (BatchNorm statistics no longer at their initial values)."""
    out = tmp_path_factory.mktemp("export_ckpt")
    dm = SyntheticFacesDataModule(num_train_identities=6, samples_per_identity=4, num_val_identities=4,
                                  val_samples_per_identity=2, num_val_pairs=20, image_size=32, batch_size=8,
                                  num_workers=0)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny_task(), dm)
    path = out / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_export_round_trip_within_tolerance(tmp_path) -> None:
    task = tiny_task().eval()
    report = export_tool.export(task, tmp_path, atol=1e-4)
    assert set(report) == {"torchscript", "onnx"}
    images = task.export_example(5)[0]
    expected = task.embed(images).numpy()
    scripted = torch.jit.load(report["torchscript"]["path"])(images).detach().numpy()
    onnx_out = export_tool.run_exported("onnx", report["onnx"]["path"], (images,))
    np.testing.assert_allclose(scripted, expected, atol=1e-5)
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=1), 1.0, atol=1e-5)


def test_cli_exports_a_checkpoint(tmp_path, checkpoint: Path) -> None:
    report = export_tool.main(["--task", "lit_tasks.face_recognition.FaceRecognitionTask", "--ckpt", str(checkpoint),
                               "--out", str(tmp_path), "--formats", "torchscript"])
    assert Path(report["torchscript"]["path"]).is_file() and report["torchscript"]["max_abs_error"] <= 1e-4
    task = FaceRecognitionTask.load_from_checkpoint(checkpoint, map_location="cpu")
    images = task.export_example(2)[0]
    np.testing.assert_allclose(export_tool.run_exported("torchscript", report["torchscript"]["path"], (images,)),
                               task.embed(images).numpy(), atol=1e-5)


def test_export_errors() -> None:
    with pytest.raises(ValueError, match="unknown export format"):
        export_tool.export(tiny_task(), "unused", formats=["tflite"])
    with pytest.raises(TypeError, match="has no export_module"):
        export_tool.load_task("torch.nn.Linear", "unused.ckpt")


def test_a_mismatch_beyond_tolerance_is_reported(tmp_path, monkeypatch) -> None:
    task = tiny_task().eval()
    real = export_tool.run_exported
    monkeypatch.setattr(export_tool, "run_exported", lambda fmt, path, inputs: real(fmt, path, inputs) + 1e-3)
    with pytest.raises(ValueError, match="torchscript export .* differs from PyTorch by 0.001"):
        export_tool.export(task, tmp_path, formats=["torchscript"], atol=1e-4)
