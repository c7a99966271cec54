"""FCOS inference decoding on a hand-built output: threshold on raw class score, decode, clip, NMS, top-k."""

import torch

from lit_tasks.models.detection.fcos import FCOSOutput, FCOSPostprocess
from lit_tasks.ops.assigners import grid_points


def _output(cls_prob, ctr_prob, ltrb):
    points, strides, levels = grid_points([(2, 2), (1, 1)], [8, 16])
    logit = lambda p: torch.logit(torch.tensor(p, dtype=torch.float32))  # noqa: E731
    return FCOSOutput(logit(cls_prob)[None], torch.tensor(ltrb, dtype=torch.float32)[None], logit(ctr_prob)[None],
                      points, strides, levels)


def test_decode_threshold_nms_and_scores():
    # 5 locations (4 at stride 8: (4,4) (12,4) (4,12) (12,12); 1 at stride 16: (8,8)), 2 classes.
    cls_prob = [[0.9, 0.01], [0.8, 0.04], [0.01, 0.6], [0.01, 0.01], [0.5, 0.3]]
    ctr_prob = [0.5, 0.5, 0.8, 0.5, 0.2]
    ltrb = [[0.5, 0.5, 1, 1], [1.5, 0.5, 0, 1], [0.5, 0.5, 0.5, 0.5], [1, 1, 1, 1], [0.5, 0.5, 2, 2]]
    (pred,) = FCOSPostprocess(score_threshold=0.05, nms_threshold=0.6)(_output(cls_prob, ctr_prob, ltrb), [(20, 30)])
    got = sorted(zip(pred["scores"].tolist(), pred["labels"].tolist(), pred["boxes"].tolist()), reverse=True)
    expected = sorted([
        ((0.9 * 0.5) ** 0.5, 0, [0, 0, 12, 12]),      # (4,4) +- stride 8 * ltrb, clipped at 0
        # (12,4) decodes to the same box and class with a lower score: suppressed by NMS
        ((0.6 * 0.8) ** 0.5, 1, [0, 8, 8, 16]),       # (4,12)
        ((0.5 * 0.2) ** 0.5, 0, [0, 0, 30, 20]),      # (8,8) stride 16: (0,0,40,40) clipped to 30 x 20
        ((0.3 * 0.2) ** 0.5, 1, [0, 0, 30, 20]),      # same box, other class: class-wise NMS keeps it
    ], reverse=True)
    assert len(got) == len(expected)
    for (s, c, b), (es, ec, eb) in zip(got, expected):
        assert abs(s - es) < 1e-6 and c == ec and torch.allclose(torch.tensor(b), torch.tensor(eb, dtype=torch.float32))


def test_max_detections_and_top_k():
    cls_prob = [[0.9, 0.9]] * 5
    ltrb = [[float(i), 0.1, 0.1 + i, 0.1] for i in range(5)]
    out = _output(cls_prob, [0.9] * 5, ltrb)
    (pred,) = FCOSPostprocess(nms_threshold=1.0, max_detections=3)(out, [(100, 100)])
    assert len(pred["scores"]) == 3
    (pred,) = FCOSPostprocess(nms_threshold=1.0, pre_nms_top_k=1)(out, [(100, 100)])
    assert len(pred["scores"]) == 2  # one candidate per level
