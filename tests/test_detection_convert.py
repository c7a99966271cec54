"""Published detector weights (lit_tasks/models/detection/convert.py, tools/convert_weights.py).

FCOS: numeric parity with torchvision's ``fcos_resnet50_fpn`` built with random weights (``weights=None``,
``weights_backbone=None``: nothing is downloaded), on two real-size images of different sizes in one batch. Its
state dict goes through the converter into ``DetectionTask(pretrained_weights=...)``; both networks see the same
normalised, zero-padded batch (torchvision's transform resizes first: we compare after it, as its ``FCOS.forward``
does after ``self.transform``). The padded batch is 480 x 640: 480 is not a multiple of 128, so torchvision's P6 / P7
locations lie at strides 60 / 120 vertically; ``points="torchvision"`` (set from the file) must reproduce that too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from reference_keys import bn_keys, resnet_stages_keys
import torch
from torchvision.models.detection import fcos_resnet50_fpn
from torchvision.models.detection.image_list import ImageList

from lit_tasks import DetectionTask
from lit_tasks.models.backbone import IMAGENET_MEAN, IMAGENET_STD
from lit_tasks.models.detection.convert import convert_detection_state_dict, read_detection_weights
from lit_tasks.models.published import save_converted

ROOT = Path(__file__).resolve().parents[1]
# (H, W): two sizes in one batch; the second runs alone at its own size (issue 20), where torchvision's P6 / P7 steps
# are 416 // 7 = 59 px, not the batch's 480 // 8 = 60. Multiples of 32: torchvision also scores the locations of an
# image's own padding strip (to a multiple of 32), which ours never do (issue 20), so other sizes differ by design.
SIZES = [(480, 640), (416, 608)]
# Both sides run the same float32 operations (convolutions, GroupNorm, BN in eval mode as affine maps) in possibly
# different kernel orders (channels_last, frozen BN as a precomputed scale); after ~70 layers of O(1) activations
# that leaves differences of ~1e-6 to 1e-5: 1e-4 is the bound. Boxes are pixels: 1e-4 of the image side.
ATOL = 1e-4


def _calibrated_torchvision_fcos(seed: int = 0) -> torch.nn.Module:
    """torchvision's FCOS with random weights whose BatchNorm statistics are those of real activations (one
    train-mode pass over noise images), so 50 layers keep O(1) values; norms' affine parameters and the class bias
    randomised (no identity can hide a misplaced norm; about one location in ten scores above 0.2)."""
    torch.manual_seed(seed)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative: the statistics of the calibration batch
        model.head.classification_head.cls_logits.bias.normal_(-2.5, 0.5)
        model.head.regression_head.bbox_reg.bias.uniform_(0.5, 3.0)  # boxes a few strides wide
        model.backbone.body.train()
        model.backbone.body(torch.randn(2, 3, 160, 192))
    return model.eval()


def _images(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in SIZES]


def _torchvision_batch(images: list[torch.Tensor]) -> ImageList:
    """torchvision's transform after its resize: normalise each image, zero-pad the batch to a multiple of 32."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    h, w = (max(i.shape[d] for i in images) for d in (1, 2))
    batch = torch.zeros(len(images), 3, -(-h // 32) * 32, -(-w // 32) * 32)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = (image - mean) / std
    return ImageList(batch, [tuple(i.shape[-2:]) for i in images])


@torch.no_grad()
def _torchvision_outputs(model: torch.nn.Module, images: ImageList) -> tuple[dict, torch.Tensor, list[dict]]:
    """``FCOS.forward`` in eval mode after ``self.transform``: head outputs, anchors (image 0) and detections."""
    features = list(model.backbone(images.tensors).values())
    head = model.head(features)
    anchors = model.anchor_generator(images, features)
    per_level = [x.size(2) * x.size(3) for x in features]
    split_head = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
    split_anchors = [list(a.split(per_level)) for a in anchors]
    return head, anchors[0], model.postprocess_detections(split_head, split_anchors, images.image_sizes)


@pytest.fixture(scope="module")
def fcos_pair(tmp_path_factory):
    """(torchvision's FCOS, its weights converted to a file, our task built from the file)."""
    reference = _calibrated_torchvision_fcos()
    converted = convert_detection_state_dict(reference.state_dict())
    path = save_converted(converted, "detection", tmp_path_factory.mktemp("fcos") / "fcos_tv.pt")
    task = DetectionTask(num_classes=91, model="fcos", pretrained_weights=str(path), score_threshold=0.2,
                         score_threshold_on="joint", num_log_images=0).eval()
    return reference, path, task


def test_fcos_conversion_uses_every_key_and_records_what_it_needs(fcos_pair):
    reference, path, task = fcos_pair
    converted = read_detection_weights(str(path))
    reference_keys = [k for k in reference.state_dict() if not k.endswith("num_batches_tracked")]
    ours = {k for k in task.model.state_dict()}
    assert len(converted.state_dict) == len(reference.state_dict()) + 1  # + head.scales (ones)
    assert set(converted.state_dict) - {k for k in converted.state_dict if k.endswith("num_batches_tracked")} <= ours
    assert len(reference_keys) == len(ours) - 1  # every parameter of ours but the scales comes from the file
    assert converted.options == dict(model="fcos", backbone="resnet50", fpn_channels=256, head_convs=4,
                                     points="torchvision")
    assert task.hparams.points == "torchvision" and task.hparams.head_convs == 4  # set from the file
    assert task.frozen() == (1, True)  # the pretrained recipe: frozen stem + stage 1, frozen BN
    torch.testing.assert_close(task.model.head.scales, torch.ones(5))
    own = task.model.state_dict()
    for ours_key, theirs_key in (("backbone.layer3.5.conv2.weight", "backbone.body.layer3.5.conv2.weight"),
                                 ("fpn.extra.1.weight", "backbone.fpn.extra_blocks.p7.weight"),
                                 ("head.reg_tower.10.bias", "head.regression_head.conv.10.bias"),
                                 ("head.centerness.weight", "head.regression_head.bbox_ctrness.weight")):
        assert torch.equal(own[ours_key], reference.state_dict()[theirs_key]), ours_key


def test_fcos_matches_torchvision_head_outputs_and_detections(fcos_pair):
    """Each image against torchvision's FCOS run on that image alone (torchvision pads a batch to its largest image, so
    its outputs for a small image depend on its batch-mates; ours evaluate every image as if alone, issue 20): raw head
    outputs of each image alone, and the detections of the two different sizes batched together."""
    reference, _, task = fcos_pair
    images = _images()
    with torch.no_grad():
        from lit_tasks.ops.images import stack_padded

        detections = task(images)  # the mixed-size batch
        diffs: dict[str, float] = {}
        expected = []
        for image in images:
            head, anchors, theirs = _torchvision_outputs(reference, _torchvision_batch([image]))
            expected += theirs
            batch, sizes = stack_padded([image], size_divisor=32)
            out = task.model(batch, sizes)
            for name, mine, ref in (("cls_logits", out.cls_logits, head["cls_logits"]),
                                    ("ltrb", out.ltrb, head["bbox_regression"]),
                                    ("centerness", out.centerness, head["bbox_ctrness"].squeeze(-1))):
                diffs[name] = max(diffs.get(name, 0.0), (mine - ref).abs().max().item())
            # The locations: torchvision's anchor centres (P6 / P7 rows follow the padded size: 480 // 8 = 60).
            torch.testing.assert_close(out.points, (anchors[:, :2] + anchors[:, 2:]) / 2, rtol=0, atol=0)
            torch.testing.assert_close(out.strides, anchors[:, 2] - anchors[:, 0], rtol=0, atol=0)
    scale = max(max(s) for s in SIZES)
    for mine, theirs in zip(detections, expected):
        assert len(theirs["scores"]) > 20  # enough detections to mean something
        assert torch.equal(mine["labels"], theirs["labels"])
        diffs["scores"] = max(diffs.get("scores", 0.0), (mine["scores"] - theirs["scores"]).abs().max().item())
        diffs["boxes/side"] = max(diffs.get("boxes/side", 0.0),
                                  (mine["boxes"] - theirs["boxes"]).abs().max().item() / scale)
    print("FCOS vs torchvision, largest differences:", diffs)
    assert max(diffs.values()) <= ATOL, diffs


def test_fcos_center_points_change_the_boxes(fcos_pair):
    """The option matters: the same weights with our default points move every box by half a stride."""
    _, path, task = fcos_pair
    with pytest.raises(ValueError, match="points='torchvision' \\(given 'center'\\)"):
        DetectionTask(num_classes=91, model="fcos", pretrained_weights=str(path), points="center")
    image = _images()[1:]
    with torch.no_grad():
        a = task.model(image[0][None])
        task.model.points = "center"
        task.model._grid_cache = {}
        b = task.model(image[0][None])
        task.model.points = "torchvision"
        task.model._grid_cache = {}
    assert torch.equal(a.cls_logits, b.cls_logits)
    assert (b.points[: 50 * 75] - a.points[: 50 * 75]).eq(4).all()  # P3: 8 // 2


def test_fcos_class_head_choices(fcos_pair):
    """91 torchvision rows (index = COCO category id): pick rows for a subset, or start a new head."""
    _, path, _ = fcos_pair
    saved = read_detection_weights(str(path)).state_dict
    with pytest.raises(ValueError, match="reinit_class_head"):
        DetectionTask(num_classes=3, model="fcos", pretrained_weights=str(path))
    rows = DetectionTask(num_classes=3, model="fcos", pretrained_weights=str(path), pretrained_class_rows=[1, 18, 90])
    assert torch.equal(rows.model.head.cls_logits.weight, saved["head.cls_logits.weight"][[1, 18, 90]])
    with pytest.raises(ValueError, match="outside the file's 91 classes"):
        DetectionTask(num_classes=1, model="fcos", pretrained_weights=str(path), pretrained_class_rows=[91])
    fresh = DetectionTask(num_classes=4, model="fcos", pretrained_weights=str(path), reinit_class_head=True)
    assert fresh.model.head.cls_logits.weight.shape[0] == 4
    assert torch.equal(fresh.model.head.centerness.weight, saved["head.centerness.weight"])


def test_unmatched_keys_are_listed_both_ways(fcos_pair, tmp_path):
    reference, _, _ = fcos_pair
    sd = dict(reference.state_dict())
    sd.pop("head.regression_head.bbox_ctrness.bias")
    converted = convert_detection_state_dict(sd)
    converted.state_dict["head.extra_thing.weight"] = torch.zeros(1)
    path = save_converted(converted, "detection", tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="not in the file: head.centerness.bias; 1 key\\(s\\) of the file the model "
                                         "does not use: head.extra_thing.weight"):
        DetectionTask(num_classes=91, model="fcos", pretrained_weights=str(path))
    with pytest.raises(ValueError, match="map to nothing of ours: backbone.fpn.strange.weight"):
        convert_detection_state_dict({**sd, "backbone.fpn.strange.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="backbone='resnet50' \\(given 'resnet18'\\)"):
        DetectionTask(num_classes=91, model="fcos", backbone="resnet18", pretrained_weights=str(path))
    with pytest.raises(ValueError, match="set pretrained false"):
        DetectionTask(num_classes=91, model="fcos", pretrained=True, pretrained_weights=str(path))


def test_convert_weights_tool(fcos_pair, tmp_path):
    """tools/convert_weights.py: the published file as downloaded (a bare state dict) -> a converted file; with
    ``--class_rows coco`` the head keeps the 80 COCO categories in id order."""
    reference, _, _ = fcos_pair
    torch.save(reference.state_dict(), tmp_path / "fcos_resnet50_fpn_coco.pth")
    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "tools" / "convert_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tool.main(["detection", str(tmp_path / "fcos_resnet50_fpn_coco.pth"), str(tmp_path / "fcos80.pt"),
                     "--class_rows", "coco"])
    converted = read_detection_weights(str(out))
    assert converted.state_dict["head.cls_logits.weight"].shape[0] == 80
    assert converted.options["points"] == "torchvision" and converted.reference_eval["score_threshold"] == 0.2
    task = DetectionTask(num_classes=80, model="fcos", pretrained_weights=str(out))
    assert torch.equal(task.model.head.cls_logits.bias[:2], reference.state_dict()["head.classification_head.cls_logits.bias"][[1, 2]])
    with pytest.raises(SystemExit, match="exists"):
        tool.main(["detection", str(tmp_path / "fcos_resnet50_fpn_coco.pth"), str(out)])


def test_fcos_export_rebuilds_torchvision_points(fcos_pair):
    """The exported network's post-processing rebuilds the same (torchvision) locations from the input size."""
    from lit_tasks.models.detection.fcos import fcos_export_tensors

    _, _, task = fcos_pair
    image = _images()[0][:, :416, :608]  # a multiple of 32 (no padding); P7 rows 416 // 4 = 104 apart, not 128
    with torch.no_grad():
        expected = task([image])[0]
        got = task.detections_from_export(fcos_export_tensors(task.model(image[None])), (416, 608))[0]
    assert len(expected["scores"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


# -- mmdetection VarifocalNet: key names and shapes (mmdet does not install here) ------------------------------------
def mmdet_vfnet_keys(depth: int = 50, num_classes: int = 80) -> list[tuple[str, tuple[int, ...]]]:
    """The state dict of mmdetection's ``vfnet_r{50,101}_fpn_*`` (names and shapes, in order), transcribed from
    mmdet's ``ResNet(style='pytorch')`` (Bottleneck, expansion 4), ``FPN(in_channels=[256, 512, 1024, 2048],
    out_channels=256, start_level=1, add_extra_convs='on_output', num_outs=5)`` (ConvModule: ``.conv``) and
    ``VFNetHead(stacked_convs=3, feat_channels=256)`` (GN ConvModules without conv bias: ``.conv``, ``.gn``; mmcv
    ``Scale``: ``.scale``; mmcv ``DeformConv2d``: a weight, no bias)."""
    keys = [("backbone.conv1.weight", (64, 3, 7, 7)), *bn_keys("backbone.bn1", 64)]
    keys += resnet_stages_keys(depth)
    for i, c in enumerate((512, 1024, 2048)):
        keys += [(f"neck.lateral_convs.{i}.conv.weight", (256, c, 1, 1)), (f"neck.lateral_convs.{i}.conv.bias", (256,))]
    for i in range(5):
        keys += [(f"neck.fpn_convs.{i}.conv.weight", (256, 256, 3, 3)), (f"neck.fpn_convs.{i}.conv.bias", (256,))]
    for tower in ("cls_convs", "reg_convs"):
        for i in range(3):
            keys += [(f"bbox_head.{tower}.{i}.conv.weight", (256, 256, 3, 3)), (f"bbox_head.{tower}.{i}.gn.weight", (256,)),
                     (f"bbox_head.{tower}.{i}.gn.bias", (256,))]
    keys += [("bbox_head.vfnet_reg_conv.conv.weight", (256, 256, 3, 3)), ("bbox_head.vfnet_reg_conv.gn.weight", (256,)),
             ("bbox_head.vfnet_reg_conv.gn.bias", (256,)), ("bbox_head.vfnet_reg.weight", (4, 256, 3, 3)),
             ("bbox_head.vfnet_reg.bias", (4,))]
    keys += [(f"bbox_head.scales.{i}.scale", ()) for i in range(5)]
    keys += [("bbox_head.vfnet_reg_refine_dconv.weight", (256, 256, 3, 3)),
             ("bbox_head.vfnet_reg_refine.weight", (4, 256, 3, 3)), ("bbox_head.vfnet_reg_refine.bias", (4,))]
    keys += [(f"bbox_head.scales_refine.{i}.scale", ()) for i in range(5)]
    keys += [("bbox_head.vfnet_cls_dconv.weight", (256, 256, 3, 3)),
             ("bbox_head.vfnet_cls.weight", (num_classes, 256, 3, 3)), ("bbox_head.vfnet_cls.bias", (num_classes,))]
    return keys


@pytest.mark.parametrize("depth", [50, 101])
def test_mmdet_vfnet_checkpoint_fills_every_parameter(depth, tmp_path):
    """A checkpoint with exactly mmdet's names and shapes (``{"meta", "state_dict"}`` as mmdet publishes) loads into
    ``DetectionTask(model="vfnet", pretrained_weights=...)``: every key used, every tensor of ours filled from it."""
    keys = mmdet_vfnet_keys(depth)
    generator = torch.Generator().manual_seed(depth)
    sd = {k: torch.tensor(3) if k.endswith("num_batches_tracked") else torch.rand(s, generator=generator) + 0.5
          for k, s in keys}
    torch.save({"meta": {"mmdet_version": "2.8.0", "CLASSES": ("person",) * 80, "epoch": 12}, "state_dict": sd},
               tmp_path / "vfnet.pth")
    converted = read_detection_weights(str(tmp_path / "vfnet.pth"))
    assert len(converted.state_dict) == len(keys) - 10 + 2  # 2 x 5 per-level scales stacked into 2 tensors
    assert converted.options["backbone"] == f"resnet{depth}" and converted.options["head_convs"] == 3
    task = DetectionTask(num_classes=80, model="vfnet", backbone=f"resnet{depth}", pretrained_weights=str(tmp_path / "vfnet.pth"),
                         num_log_images=0, channels_last=False)
    own = task.model.state_dict()
    rules = {"neck.fpn_convs.3.conv.weight": "fpn.extra.0.weight", "bbox_head.cls_convs.2.gn.bias": "head.cls_tower.7.bias",
             "bbox_head.vfnet_reg_conv.conv.weight": "head.reg_init_conv.0.weight",
             "bbox_head.vfnet_cls_dconv.weight": "head.cls_dconv.weight", "backbone.layer3.5.conv3.weight":
             "backbone.layer3.5.conv3.weight"}
    for theirs, ours in rules.items():
        assert torch.equal(own[ours], sd[theirs]), ours
    torch.testing.assert_close(own["head.scales_refine"], torch.stack([sd[f"bbox_head.scales_refine.{i}.scale"] for i in range(5)]))
    # every value of ours is one of the file's (frozen BN drops the counters: its statistics are buffers too)
    file_values = {(tuple(v.shape), float(v.flatten()[0])) for v in sd.values() if v.numel()}
    for name, value in own.items():
        if name.startswith("head.scales"):
            continue
        assert (tuple(value.shape), float(value.flatten()[0])) in file_values, name
    used = {k for k, _ in keys if not k.endswith("num_batches_tracked")}
    print(f"mmdetection vfnet_r{depth}: {len(keys)} keys ({len(used)} without BN counters), "
          f"{len(converted.state_dict)} after mapping, model {len(own)} tensors")


def test_mmdet_vfnet_with_dcn_backbone_names_the_keys_it_cannot_map(tmp_path):
    sd = {k: torch.zeros(s) for k, s in mmdet_vfnet_keys(50)}
    sd["backbone.layer3.0.conv2.conv_offset.weight"] = torch.zeros(27, 256, 3, 3)
    with pytest.raises(ValueError, match="1 key\\(s\\) of the file the model does not use: backbone.layer3.0.conv2"):
        DetectionTask(num_classes=80, model="vfnet", pretrained_weights=str(save_converted(
            convert_detection_state_dict(sd), "detection", tmp_path / "dcn.pt")))


def test_fcos_checkpoint_keeps_the_points_the_file_set(fcos_pair):
    """A fit's checkpoint names no file but keeps ``points="torchvision"`` and the freezing, so the rebuilt network
    is the same function (DetectionTask.on_save_checkpoint)."""
    _, path, task = fcos_pair
    checkpoint = {"hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    hp = checkpoint["hyper_parameters"]
    assert hp["pretrained_weights"] is None and hp["points"] == "torchvision" and hp["frozen_bn"] is True
    rebuilt = DetectionTask(**hp)
    assert rebuilt.model.points == "torchvision" and rebuilt.frozen() == (1, True)
