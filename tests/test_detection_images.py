"""The TensorBoard detection picture: boxes land where they should, in the right colours."""

import torch

from lit_tasks.callbacks.detection_images import draw_detections


def test_draw_detections_marks_box_edges():
    image = torch.zeros(3, 40, 60)
    pred = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0], [0, 0, 5, 5]]), "scores": torch.tensor([0.9, 0.1]),
            "labels": torch.tensor([1, 0])}
    target = {"boxes": torch.tensor([[40.0, 10.0, 55.0, 35.0]]), "labels": torch.tensor([0])}
    out = draw_detections(image, pred, target, ["a", "b"], min_score=0.3)
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 60)
    assert out[0, 15, 10] == 255 and out[1, 15, 10] == 0  # red prediction edge (left side, mid height)
    assert out[1, 20, 40] == 255 and out[0, 20, 40] == 0  # lime ground-truth edge
    assert out[:, 2, 2].sum() == 0  # the low-score prediction is not drawn
    assert out[:, 15, 20].sum() == 0  # inside a box stays untouched
