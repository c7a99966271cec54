"""Published segmentation weights (lit_tasks/models/segmentation/convert.py).

torchvision's ``deeplabv3_resnet50`` and ``fcn_resnet50`` with their auxiliary heads, built with random weights
(``weights=None, weights_backbone=None``: nothing is downloaded), go through the converter into
``SemanticSegmentationTask(pretrained_weights=...)``; both networks see the same images (torchvision's normalised by
hand, ours in [0, 1], normalised inside), a batch of two 240 x 320 images and one 201 x 283 (not a multiple of the
stride 8: the rounding of every strided layer and of the final upsampling shows). Main and auxiliary logits at the
input size are compared. R101: the key mapping alone (slow-marked parity).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from lit_tasks import SemanticSegmentationTask
from lit_tasks.models.backbone import IMAGENET_MEAN, IMAGENET_STD
from lit_tasks.models.published import save_converted
from lit_tasks.models.segmentation.convert import convert_segmentation_state_dict, read_segmentation_weights

# float32 throughout, the same operations with the same kernels (both NCHW: ours in channels_last sums in another
# order, which alone moves these logits by ~1e-4 after 50 dilated layers); O(1) logits; 1e-4 is the bound.
ATOL = 1e-4
SIZES = [(2, 240, 320), (1, 201, 283)]


def _calibrated(name: str, seed: int = 0) -> torch.nn.Module:
    """torchvision's model with random weights, BatchNorm statistics of a train-mode pass over noise images (O(1)
    activations through 50 dilated layers), BN affine parameters randomised (no identity hides a misplaced norm)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=21,
                                                            aux_loss=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.reset_running_stats()
                m.momentum = None
        model.train()
        model(_normalise(torch.rand(2, 3, 240, 320)))  # the test's size: the dilated ASPP branches see what they will
        if name.startswith("deeplabv3"):  # image pooling's BN saw 2 values per channel: give it 16
            pooling_bn = model.classifier[0].convs[4][2]
            pooling_bn.reset_running_stats()
            model.eval()
            pooling_bn.train()
            model(_normalise(torch.rand(16, 3, 64, 80)))
    return model.eval()


def _images(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, h, w, generator=generator) for b, h, w in SIZES]


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _parity(name: str, tmp_path) -> dict[str, float]:
    reference = _calibrated(name)
    converted = convert_segmentation_state_dict(reference.state_dict())
    path = save_converted(converted, "segmentation", tmp_path / f"{name}.pt")
    task = SemanticSegmentationTask(num_classes=21, model=name.split("_")[0], backbone=f"resnet{name.split('resnet')[1]}",
                                    output_stride=8, pretrained_weights=str(path), num_log_images=0,
                                    channels_last=False).eval()
    assert task.hparams.model == name.split("_")[0] and task.hparams.fcn_heads == "torchvision"
    diffs = {"out": 0.0, "aux": 0.0}
    with torch.no_grad():
        for images in _images():
            expected = reference(_normalise(images))
            logits, aux = task.model.forward_with_aux(images)
            assert logits.shape == expected["out"].shape and aux.shape == expected["aux"].shape
            diffs["out"] = max(diffs["out"], (logits - expected["out"]).abs().max().item())
            diffs["aux"] = max(diffs["aux"], (aux - expected["aux"]).abs().max().item())
            assert 1.0 < expected["out"].abs().max() < 100.0  # O(1..10) logits: 1e-4 is float32 rounding there
            assert torch.equal(task(images), logits)
    print(f"{name} vs torchvision, largest differences:", diffs)
    return diffs


def test_deeplabv3_resnet50_matches_torchvision(tmp_path):
    diffs = _parity("deeplabv3_resnet50", tmp_path)
    assert max(diffs.values()) <= ATOL, diffs


def test_fcn_resnet50_matches_torchvision(tmp_path):
    diffs = _parity("fcn_resnet50", tmp_path)
    assert max(diffs.values()) <= ATOL, diffs


@pytest.mark.parametrize("name", ["deeplabv3_resnet101", "fcn_resnet101"])
def test_resnet101_files_map_every_key(name, tmp_path):
    reference = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=21,
                                                               aux_loss=True)
    theirs = reference.state_dict()
    converted = convert_segmentation_state_dict(theirs)
    assert converted.options["backbone"] == "resnet101" and converted.options["output_stride"] == 8
    path = save_converted(converted, "segmentation", tmp_path / "r101.pt")
    task = SemanticSegmentationTask(num_classes=21, model=name.split("_")[0], backbone="resnet101", output_stride=8,
                                    pretrained_weights=str(path), num_log_images=0, channels_last=False)
    own = task.model.state_dict()
    assert len(converted.state_dict) == len(theirs) == len(own)  # every key used, every tensor filled
    for (_, value), (key, mine) in zip(theirs.items(), converted.state_dict.items()):
        assert torch.equal(own[key], value) and torch.equal(mine, value), key


@pytest.mark.slow
def test_deeplabv3_resnet101_matches_torchvision(tmp_path):
    diffs = _parity("deeplabv3_resnet101", tmp_path)
    assert max(diffs.values()) <= ATOL, diffs


def test_class_heads_and_option_mismatches(tmp_path):
    reference = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21,
                                                              aux_loss=True)
    path = save_converted(convert_segmentation_state_dict(reference.state_dict()), "segmentation", tmp_path / "f.pt")
    saved = read_segmentation_weights(str(path)).state_dict
    fcn = dict(model="fcn", output_stride=8, pretrained_weights=str(path))
    with pytest.raises(ValueError, match="reinit_class_head"):
        SemanticSegmentationTask(num_classes=3, **fcn)
    rows = SemanticSegmentationTask(num_classes=3, **fcn, pretrained_class_rows=[0, 15, 7])
    assert torch.equal(rows.model.head.classifier.weight, saved["head.classifier.weight"][[0, 15, 7]])
    assert torch.equal(rows.model.aux_head.classifier.bias, saved["aux_head.classifier.bias"][[0, 15, 7]])
    fresh = SemanticSegmentationTask(num_classes=5, **fcn, reinit_class_head=True)
    assert fresh.model.head.classifier.weight.shape[0] == 5
    assert torch.equal(fresh.model.head.convs[0][0].weight, saved["head.convs.0.0.weight"])
    with pytest.raises(ValueError, match="set model='fcn' \\(given 'deeplabv3plus'\\), output_stride=8 \\(given 16\\)"):
        SemanticSegmentationTask(num_classes=21, pretrained_weights=str(path))
    with pytest.raises(ValueError, match="of the file the model does not use: aux_head"):
        SemanticSegmentationTask(num_classes=21, **fcn, aux_weight=0.0)
    with pytest.raises(ValueError, match="fcn_heads='torchvision' \\(given 'mmseg'\\)"):
        SemanticSegmentationTask(num_classes=21, **fcn, fcn_heads="mmseg")
    with pytest.raises(ValueError, match="choose the class head of pretrained_weights"):
        SemanticSegmentationTask(num_classes=21, reinit_class_head=True)
