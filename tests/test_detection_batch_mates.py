"""FCOS and VFNet detections of an image do not depend on its batch-mates (issue 20, item 2).

The same image alone, batched with a larger one (before or after it) and batched with one of its own padded size
gives the same detections in ``DetectionTask.forward``, in validation and test (the predictions the COCO metric
collects, in original pixels) and in prediction. mmdetection tests one image per GPU, padded to a multiple of 32;
here each image is evaluated as padded to its own multiple of 32, and no location outside it is ever scored.

Each image runs in a call of its own on a CPU, and with the images of its padded size on an accelerator
(``lit_tasks.ops.images.group_same_sizes``): both ways run here.

Tolerance. An image in a call of its own runs the very same float32 operations as alone: equal bits. Two images of
one padded size in one batched call (the grouped way) may have a kernel sum in another order: each output of a
float32 reduction then moves by a few ulps (2^-23 ~ 1.2e-7 relative each), and the ~15 layers between pixels and
boxes (backbone, FPN, head; VFNet's exp turns a logit's absolute error into the box's relative one) add such errors
up, 1e-5 relative at the very most. Boxes lie in [0, 512] px (original pixels are twice the input's here):
1e-5 * 512 ~ 5e-3 px; scores are in [0, 1]: 1e-5. (Measured: 3e-5 px, one float32 ulp at 512.) Near-tied
candidates that such an error could reorder would swap whole boxes, not move them: the seeded case has none.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Sampler

from datamodules.detection.samples import detection_collate
from lit_tasks import DetectionTask
from lit_tasks.models.detection import fcos, vfnet

# Lightning cannot set drop_last on a custom batch sampler for prediction; these batches cover every sample.
pytestmark = pytest.mark.filterwarnings("ignore:You are using a custom batch sampler")

LARGE = (256, 256)
ORIGINAL_SCALE = 2  # orig_size = 2 x size: validation, test and prediction map boxes back to original pixels
# Each small size with a batch-mate of the same size padded to a multiple of 32 (one batched call for both).
SMALL_AND_SAME_PADDED = {(128, 128): (100, 120), (150, 97): (140, 110)}
BOX_ATOL_PX = 1e-5 * ORIGINAL_SCALE * max(LARGE)
SCORE_ATOL = 1e-5


def tiny_task(model: str) -> DetectionTask:
    """A seeded tiny detector keeping every candidate (threshold 0): ~100 detections per image to compare."""
    torch.manual_seed(0)
    task = DetectionTask(num_classes=3, model=model, backbone="test_resnet.r160_in1k", fpn_channels=16, head_convs=1,
                         score_threshold=0.0, num_log_images=0)
    return task.eval()


def sample(size: tuple[int, int], seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A uniform random image of ``size`` with one box, as a DataModule yields it."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    box = torch.tensor([[0.2 * w, 0.3 * h, 0.7 * w, 0.9 * h]])
    target = {"boxes": box, "labels": torch.tensor([1]), "size": torch.tensor([h, w]),
              "orig_size": torch.tensor([ORIGINAL_SCALE * h, ORIGINAL_SCALE * w]), "image_id": torch.tensor(seed)}
    return torch.rand(3, h, w, generator=g), target


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    # Threshold 0: dozens of detections (fewer for VFNet, whose NMS merges its initial boxes, all alike)
    assert len(want["scores"]) >= 20, where
    n = min(len(got["boxes"]), len(want["boxes"]))
    gap = (got["boxes"][:n] - want["boxes"][:n]).abs().max().item() if n else float("nan")
    assert got["labels"].tolist() == want["labels"].tolist(), f"{where}: labels differ (max box diff {gap:.1f} px)"
    torch.testing.assert_close(got["boxes"], want["boxes"], atol=BOX_ATOL_PX, rtol=0, msg=lambda m: f"{where}: {m}")
    torch.testing.assert_close(got["scores"], want["scores"], atol=SCORE_ATOL, rtol=0, msg=lambda m: f"{where}: {m}")


class FixedBatches(Sampler[list[int]]):
    """These batches of dataset indices, in this order."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class CollectMetricInputs(pl.Callback):
    """The predictions each evaluation batch hands the COCO metric (original pixels), per batch."""

    def __init__(self) -> None:
        self.batches: dict[str, list[list[dict[str, torch.Tensor]]]] = {"val": [], "test": []}

    def collect(self, metric, stage: str, n: int) -> None:
        self.batches[stage].append([
            {"boxes": box, "scores": score, "labels": label}
            for box, score, label in zip(metric.detection_box[-n:], metric.detection_scores[-n:],
                                         metric.detection_labels[-n:])])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.collect(pl_module.metrics["val"], "val", len(batch[1]))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.collect(pl_module.metrics["test"], "test", len(batch[1]))


@pytest.mark.parametrize("grouped", [False, True], ids=["per_image", "grouped"])
@pytest.mark.parametrize("small", list(SMALL_AND_SAME_PADDED))
@pytest.mark.parametrize("model", ["fcos", "vfnet"])
def test_an_image_gets_the_same_detections_alone_and_batched(model: str, small: tuple[int, int], grouped: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU runs one call per image; an accelerator one per padded size: run that way here too.
    for module in (fcos, vfnet):
        monkeypatch.setattr(module, "group_same_sizes", lambda device: grouped)
    task = tiny_task(model)
    dataset = [sample(small, 0), sample(LARGE, 1), sample(SMALL_AND_SAME_PADDED[small], 2)]
    # The small image alone, after and before a larger one, then with a batch-mate of its own padded size.
    batches = [[0], [1, 0], [0, 1], [0, 2]]
    where_small = [0, 1, 0, 0]

    with torch.no_grad():
        alone = task([dataset[0][0]])[0]
        for index, at in zip(batches[1:], where_small[1:]):
            assert_same(task([dataset[i][0] for i in index])[at], alone, f"{model} forward, batch {index}")

    collect = CollectMetricInputs()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[collect])
    loader = DataLoader(dataset, batch_sampler=FixedBatches(batches), collate_fn=detection_collate)
    trainer.validate(task, dataloaders=loader, verbose=False)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])  # padded locations' logits give no NaN loss
    trainer.test(task, dataloaders=loader, verbose=False)
    predicted = trainer.predict(task, dataloaders=loader)
    for stage, per_batch in (*collect.batches.items(), ("predict", predicted)):
        assert len(per_batch) == len(batches), stage
        alone = per_batch[0][0]
        for index, at, dets in zip(batches[1:], where_small[1:], per_batch[1:]):
            assert_same(dets[at], alone, f"{model} {stage}, batch {index}")
