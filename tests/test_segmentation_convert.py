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
from reference_keys import bn_keys, resnet_stages_keys
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


# -- mmsegmentation PSPNet R50-D8: key names and shapes (mmseg does not install here) -------------------------------
def mmseg_pspnet_keys(depth: int = 50, num_classes: int = 21) -> list[tuple[str, tuple[int, ...]]]:
    """mmseg ``pspnet_r{50,101}-d8`` state dict, transcribed from ``ResNetV1c`` (deep stem ``stem.{0,1,3,4,6,7}``,
    Bottleneck ``conv1-3`` / ``bn1-3``, ``downsample.0/1``), ``PSPHead(channels=512)`` (``psp_modules.i.1`` and
    ``bottleneck`` ConvModules: ``.conv`` / ``.bn``; ``conv_seg``) and the auxiliary ``FCNHead(channels=256)``."""
    keys = [("backbone.stem.0.weight", (32, 3, 3, 3)), *bn_keys("backbone.stem.1", 32), ("backbone.stem.3.weight", (32, 32, 3, 3)),
            *bn_keys("backbone.stem.4", 32), ("backbone.stem.6.weight", (64, 32, 3, 3)), *bn_keys("backbone.stem.7", 64)]
    keys += resnet_stages_keys(depth)
    for i in range(4):
        keys += [(f"decode_head.psp_modules.{i}.1.conv.weight", (512, 2048, 1, 1)), *bn_keys(f"decode_head.psp_modules.{i}.1.bn", 512)]
    keys += [("decode_head.bottleneck.conv.weight", (512, 2048 + 4 * 512, 3, 3)), *bn_keys("decode_head.bottleneck.bn", 512),
             ("decode_head.conv_seg.weight", (num_classes, 512, 1, 1)), ("decode_head.conv_seg.bias", (num_classes,))]
    keys += [("auxiliary_head.convs.0.conv.weight", (256, 1024, 3, 3)), *bn_keys("auxiliary_head.convs.0.bn", 256),
             ("auxiliary_head.conv_seg.weight", (num_classes, 256, 1, 1)), ("auxiliary_head.conv_seg.bias", (num_classes,))]
    return keys


@pytest.mark.parametrize("depth", [50, 101])
def test_mmseg_pspnet_checkpoint_fills_every_tensor(depth, tmp_path):
    keys = mmseg_pspnet_keys(depth)
    generator = torch.Generator().manual_seed(0)
    sd = {k: torch.tensor(5) if k.endswith("num_batches_tracked") else torch.rand(s, generator=generator) + 0.5
          for k, s in keys}
    torch.save({"meta": {"CLASSES": ["background"] * 21, "PALETTE": [[0, 0, 0]] * 21}, "state_dict": sd},
               tmp_path / "pspnet_r50-d8_512x512_20k_voc12aug.pth")
    converted = read_segmentation_weights(str(tmp_path / "pspnet_r50-d8_512x512_20k_voc12aug.pth"))
    assert converted.options == dict(model="pspnet", backbone=f"resnet{depth}c", output_stride=8,
                                     pool_scales=[1, 2, 3, 6], head_channels=256, fcn_heads="mmseg")
    task = SemanticSegmentationTask(num_classes=21, model="pspnet", backbone=f"resnet{depth}c", output_stride=8,
                                    pretrained_weights=str(tmp_path / "pspnet_r50-d8_512x512_20k_voc12aug.pth"),
                                    num_log_images=0, channels_last=False)
    own = task.model.state_dict()
    assert len(own) == len(keys) == len(converted.state_dict)  # every key used, every tensor filled
    for theirs, ours in (("backbone.stem.7.running_var", "backbone.bn1.running_var"),
                         ("backbone.stem.3.weight", "backbone.conv1.3.weight"),
                         ("decode_head.psp_modules.3.1.bn.bias", "head.ppm.stages.3.1.1.bias"),
                         ("decode_head.bottleneck.conv.weight", "head.bottleneck.0.weight"),
                         ("auxiliary_head.convs.0.conv.weight", "aux_head.convs.0.0.weight")):
        assert torch.equal(own[ours], sd[theirs]), ours
    assert task.hparams.pool_scales == [1, 2, 3, 6]
    print(f"mmsegmentation pspnet_r{depth}-d8: {len(keys)} keys, {len(converted.state_dict)} mapped")


def test_mmseg_deeplab_heads_are_refused_with_the_reason():
    sd = {k: torch.zeros(s) for k, s in mmseg_pspnet_keys(50) if not k.startswith("decode_head.")}
    sd.update({"decode_head.image_pool.1.conv.weight": torch.zeros(512, 2048, 1, 1),
               "decode_head.conv_seg.weight": torch.zeros(21, 512, 1, 1)})
    with pytest.raises(ValueError, match="only PSPNet maps onto ours"):
        convert_segmentation_state_dict(sd)
