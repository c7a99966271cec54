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


# -- every task: export + check, and what the exported outputs mean ------------------------------------------------
def tiny_detector(model: str = "fcos", **kwargs):
    from lit_tasks.detection import DetectionTask

    torch.manual_seed(0)
    return DetectionTask(num_classes=3, model=model, backbone="resnet10t", fpn_channels=16, head_convs=1,
                         num_log_images=0, score_threshold=0.0, **kwargs).eval()  # untrained: scores near the prior


def tiny_segmenter():
    from lit_tasks.segmentation import SemanticSegmentationTask

    torch.manual_seed(0)
    return SemanticSegmentationTask(num_classes=4, backbone="test_resnet", head_channels=16, num_log_images=0).eval()


def check_detection(task, report, size) -> None:
    """The documented post-processing of the raw outputs gives ``task(images)``: exactly from PyTorch's own raw
    outputs, and from onnxruntime's the same best detection per image."""
    images = task.export_example(2, size=size)[0]
    expected = task(images)
    raw = task.export_module()(images)
    assert len(raw) == len(task.export_output_names) and all(o.shape[0] == 2 for o in raw)
    for got, want in zip(task.detections_from_export(raw, size), expected):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    onnx_raw = export_tool.run_exported("onnx", report["onnx"]["path"], (images,))
    for got, want in zip(task.detections_from_export(onnx_raw, size), expected):
        assert got["boxes"].shape == (len(got["scores"]), 4) and got["labels"].shape == got["scores"].shape
        # the best score survives every step (threshold 0, top-k, NMS) and is continuous in the outputs, unlike
        # which of two near-tied random-init boxes wins
        assert len(want["scores"]) > 0
        torch.testing.assert_close(got["scores"].max(), want["scores"].max(), atol=1e-4, rtol=0)
    n = raw[0].shape[1]
    if task.hparams.model == "fcos":  # dense detectors: outputs of another input size are refused
        assert [o.shape for o in raw] == [(2, n, 3), (2, n, 4), (2, n)]
        with pytest.raises(ValueError, match="locations for 64x64 images, but FCOS's grid has"):
            task.detections_from_export(raw, (64, 64))
    elif task.hparams.model == "vfnet":
        assert [o.shape for o in raw] == [(2, n, 3), (2, n, 4)]
        with pytest.raises(ValueError, match="locations for 64x64 images, but VFNet's grid has"):
            task.detections_from_export(raw, (64, 64))
    else:  # DETR: Q queries, C + 1 logits; the boxes are relative, so the image size only scales them
        assert [o.shape for o in raw] == [(2, 10, 4), (2, 10, 4)]


def check_segmentation(task, report, size) -> None:
    """onnxruntime's logits give the class map of ``task(images)`` wherever the top two logits are not tied."""
    images = task.export_example(2, size=size)[0]
    with torch.no_grad():
        logits = task(images)
    got = torch.from_numpy(export_tool.run_exported("onnx", report["onnx"]["path"], (images,)))
    assert got.shape == (2, 4, *size)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(got.argmax(1)[clear], logits.argmax(1)[clear]) and clear.float().mean() > 0.9


def check_face(task, report, size) -> None:
    images = task.export_example(2)[0]
    got = export_tool.run_exported("onnx", report["onnx"]["path"], (images,))
    np.testing.assert_allclose(got, task.embed(images).numpy(), atol=1e-4)


# A new task adds (factory, input size or None when the model fixes it, check of what its outputs mean).
EXPORT_CASES = {
    "face": (lambda: tiny_task().eval(), None, check_face),
    "detection_fcos": (tiny_detector, (70, 100), check_detection),  # sizes not multiples of 32: the grid rule holds
    "detection_fcos_frozen_bn": (lambda: tiny_detector(frozen_bn=True, frozen_stages=1), (70, 100),
                                 check_detection),  # the recipe's frozen BatchNorms, folded into their convolutions
    "detection_vfnet": (lambda: tiny_detector("vfnet"), (70, 100), check_detection),
    "detection_detr": (lambda: tiny_detector("detr", d_model=32, nheads=2, num_encoder_layers=1, num_decoder_layers=1,
                                             dim_feedforward=64, num_queries=10), (70, 100), check_detection),
    # the shapes demo's network: anchors and content queries chosen per image by the auxiliary head (top-k, gather)
    "detection_detr_query_selection": (lambda: tiny_detector(
        "detr", d_model=32, nheads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, num_queries=10,
        aux_dense_head=True, anchor_queries=True, query_selection=True, selection_content=True), (70, 100),
        check_detection),
    "segmentation_deeplabv3plus": (tiny_segmenter, (64, 48), check_segmentation),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_every_task_exports_with_a_dynamic_batch_within_tolerance(name: str, tmp_path) -> None:
    factory, size, check = EXPORT_CASES[name]
    task = factory()
    report = export_tool.export(task, tmp_path, size=size)  # traced at batch 2, checked at batch 3
    assert set(report) == {"torchscript", "onnx"}
    for fmt in report:
        assert set(report[fmt]["errors"]) == set(export_tool.output_names(task))
        assert report[fmt]["max_abs_error"] <= 1e-3
    check(task, report, size)


def test_an_input_size_for_a_fixed_size_model_is_refused() -> None:
    with pytest.raises(ValueError, match="FaceRecognitionTask's input size is fixed by the model"):
        export_tool.example_inputs(tiny_task(), 2, (64, 64))
