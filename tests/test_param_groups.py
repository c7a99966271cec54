"""Each task's default optimizer: which parameters get which learning rate and weight decay, as its reference states.

The expectation for mmdet's recipes is :func:`mmcv_multipliers`, a re-statement of mmcv's
``DefaultOptimizerConstructor.add_params`` (mmcv/runner/optimizer/default_constructor.py): ``bias_lr_mult`` and
``bias_decay_mult`` act on the ``bias`` of every layer but a normalisation layer, ``norm_decay_mult`` on the weight and
bias of normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm). The other references build one
optimizer over ``model.parameters()`` (DETR: two, the backbone at its own LR): every parameter decays.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_tasks import ActionDetectionTask, DetectionTask, FaceRecognitionTask, PoseTask, SemanticSegmentationTask

NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def is_norm(module: nn.Module) -> bool:
    # The VFNet recipe's BatchNorm with frozen statistics and a trainable affine (mmdet norm_eval=True) is a norm layer.
    return isinstance(module, NORMS) or type(module).__name__ == "FrozenStatisticsBatchNorm2d"


def mmcv_multipliers(model: nn.Module, bias_lr_mult: float = 1.0, bias_decay_mult: float = 1.0,
                     norm_decay_mult: float = 1.0) -> dict[int, tuple[float, float]]:
    """``id(param) -> (lr multiplier, weight-decay multiplier)`` of every trainable parameter, as mmcv assigns them."""
    out = {}
    for module in model.modules():
        norm = is_norm(module)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            lr = bias_lr_mult if name == "bias" and not norm else 1.0
            decay = norm_decay_mult if norm else bias_decay_mult if name == "bias" else 1.0
            out[id(param)] = (lr, decay)
    return out


def optimizer_settings(task) -> tuple[torch.optim.Optimizer, dict[int, tuple[float, float]]]:
    """The default optimizer (no Trainer) and ``id(param) -> (lr, weight_decay)`` of each parameter it trains (the LR
    before the schedule's factor: ``initial_lr``)."""
    optimizer = task.configure_optimizers()["optimizer"]
    settings = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert id(param) not in settings, "a parameter in two groups"
            settings[id(param)] = (group["initial_lr"], group["weight_decay"])
    return optimizer, settings


def names_of(task, ids) -> list[str]:
    return [n for n, p in task.named_parameters() if id(p) in ids]


def assert_settings(task, settings, expected) -> None:
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert set(settings) == trainable, f"missing {names_of(task, trainable - set(settings))[:5]}"
    wrong = [(n, settings[id(p)], expected[id(p)]) for n, p in task.named_parameters()
             if id(p) in settings and settings[id(p)] != pytest.approx(expected[id(p)], rel=1e-12)]
    assert not wrong, f"{len(wrong)} parameters with other (lr, weight_decay) than the reference's, e.g. {wrong[:4]}"


# -- mmdet: FCOS and VFNet ---------------------------------------------------------------------------------------------


def tiny_detector(**kwargs) -> DetectionTask:
    torch.manual_seed(0)
    args = dict(num_classes=3, backbone="resnet10t", fpn_channels=16, head_convs=1, num_log_images=0)
    return DetectionTask(**{**args, **kwargs})


@pytest.fixture()
def no_hub(monkeypatch):
    """``pretrained=True`` builds the recipe's network without downloading (random weights)."""
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False}))


@pytest.mark.parametrize("model", ["fcos", "vfnet"])
def test_mmdet_recipes_bias_lr_x2_no_bias_decay(model, no_hub):
    """fcos_r50_caffe_fpn_gn-head_1x_coco.py and vfnet_r50_fpn_1x_coco.py: SGD lr 0.01, momentum 0.9, weight decay
    1e-4 (schedule_1x.py), ``paramwise_cfg=dict(bias_lr_mult=2., bias_decay_mult=0.)``: conv biases at 0.02 without
    decay; GroupNorm / BatchNorm weights and biases, the per-level scales and every conv weight at 0.01 with decay."""
    task = tiny_detector(model=model, pretrained=True)
    optimizer, settings = optimizer_settings(task)
    assert isinstance(optimizer, torch.optim.SGD) and all(g["momentum"] == 0.9 for g in optimizer.param_groups)
    expected = {k: (0.01 * lr, 1e-4 * wd) for k, (lr, wd) in mmcv_multipliers(task, 2.0, 0.0).items()}
    assert_settings(task, settings, expected)
    lrs = {n: settings[id(p)] for n, p in task.named_parameters() if id(p) in settings}
    assert lrs["model.head.cls_logits.bias"] == pytest.approx((0.02, 0.0))
    assert lrs["model.head.scales"] == pytest.approx((0.01, 1e-4))  # mmdet's Scale: not a bias


def test_vfnet_recipe_trains_batchnorm_affine_with_frozen_statistics(no_hub):
    """vfnet_r50_fpn_1x_coco.py: ``norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True``: the BatchNorms
    outside the frozen stem / stage 1 keep their running statistics but train their weight and bias (FCOS's caffe
    backbone: ``requires_grad=False``, everything frozen)."""
    task = tiny_detector(model="vfnet", pretrained=True)
    backbone = task.model.backbone
    stage2_bn = backbone.layer2[0].bn1
    assert stage2_bn.weight.requires_grad and stage2_bn.bias.requires_grad
    assert not backbone.layer1[0].bn1.weight.requires_grad  # frozen_stages=1: stem and stage 1 entirely
    statistics = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    task.train()
    task.model(torch.rand(2, 3, 64, 64), [(64, 64), (64, 64)])
    assert statistics and all(torch.equal(v, backbone.state_dict()[k]) for k, v in statistics.items())
    fcos = tiny_detector(model="fcos", pretrained=True)
    assert not any(p.requires_grad for n, p in fcos.model.backbone.named_parameters() if ".bn" in n)


@pytest.mark.parametrize("model, start", [("fcos", 1 / 3), ("vfnet", 0.1)])
def test_mmdet_linear_warmup_starts_at_the_configs_ratio(model, start):
    """mmcv's linear warm-up: lr x (ratio + (1 - ratio) * step / warmup_iters) for step < warmup_iters. VFNet:
    warmup_ratio=0.1; FCOS imprv (fcos_center-normbbox-centeronreg-giou_...): warmup='linear' over the base config's
    warmup_ratio=1/3; both 500 iterations."""
    task = tiny_detector(model=model)
    optimizer = task.configure_optimizers()["optimizer"]
    factor = task.default_scheduler(optimizer, 10_000).lr_lambdas[0]
    assert [factor(s) for s in (0, 250, 499, 500, 10_000)] == pytest.approx(
        [start, start + (1 - start) * 0.5, start + (1 - start) * 499 / 500, 1.0, 0.0], abs=1e-12)


# -- DETR: AdamW over every parameter, the backbone at 1e-5 -----------------------------------------------------------


def test_detr_decays_every_parameter_backbone_at_a_tenth():
    """detr main.py: ``param_dicts`` = the non-backbone parameters (lr 1e-4) and the backbone's (lr_backbone 1e-5),
    ``torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)``: weight decay 1e-4 on all of them,
    biases, LayerNorms and query embeddings included."""
    torch.manual_seed(0)
    task = DetectionTask(num_classes=3, model="detr", backbone="resnet18", d_model=32, nheads=2, num_encoder_layers=1,
                         num_decoder_layers=2, dim_feedforward=64, num_queries=6, num_log_images=0)
    optimizer, settings = optimizer_settings(task)
    assert isinstance(optimizer, torch.optim.AdamW)
    backbone = {id(p) for p in task.model.backbone.parameters()}
    expected = {id(p): (1e-5 if id(p) in backbone else 1e-4, 1e-4) for p in task.parameters() if p.requires_grad}
    assert_settings(task, settings, expected)
    assert len(optimizer.param_groups) == 2


# -- the others: one optimizer over every parameter -------------------------------------------------------------------


def test_arcface_decays_every_parameter_batchnorm_and_prelu_included():
    """arcface_torch train_v2.py: ``torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params":
    module_partial_fc.parameters()}], lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)``."""
    torch.manual_seed(0)
    task = FaceRecognitionTask(num_identities=6, backbone="mbf", image_size=32, embedding_size=16, scale=16.0)
    kinds = {type(m).__name__ for m in task.modules()}
    assert {"BatchNorm2d", "BatchNorm1d", "PReLU"} <= kinds
    optimizer, settings = optimizer_settings(task)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert_settings(task, settings, {id(p): (0.1, 5e-4) for p in task.parameters() if p.requires_grad})


def test_deeplab_decays_every_parameter():
    """mmseg's DeepLabV3+ VOC / Cityscapes configs take configs/_base_/schedules/schedule_20k.py (40k, 80k alike):
    ``optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005)`` with no ``paramwise_cfg``."""
    torch.manual_seed(0)
    task = SemanticSegmentationTask(num_classes=4, backbone="test_resnet", head_channels=16)
    optimizer, settings = optimizer_settings(task)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert_settings(task, settings, {id(p): (0.01, 5e-4) for p in task.parameters() if p.requires_grad})


def test_rle_adam_without_weight_decay():
    """Official RLE scripts/train.py: ``torch.optim.Adam(m.parameters(), lr=cfg.TRAIN.LR)`` (mmpose alike)."""
    torch.manual_seed(0)
    task = PoseTask(num_keypoints=4, backbone="test_resnet", input_size=[32, 24], flip_index=[0, 2, 1, 3],
                    oks_sigmas=[0.05] * 4, num_log_images=0)
    optimizer, settings = optimizer_settings(task)
    assert isinstance(optimizer, torch.optim.Adam)
    assert_settings(task, settings, {id(p): (1e-3, 0.0) for p in task.parameters() if p.requires_grad})


def test_oadtr_adam_with_l2_on_every_parameter():
    """OadTR main.py: ``torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)``."""
    torch.manual_seed(0)
    task = ActionDetectionTask(num_classes=6, feature_dim=12, window=8, num_future=4, embed_dim=32, enc_layers=1,
                               enc_heads=4, enc_mlp_dim=48, dec_layers=1, dec_heads=2, dec_ffn_dim=40,
                               background_index=0, ambiguous_index=5)
    optimizer, settings = optimizer_settings(task)
    assert type(optimizer) is torch.optim.Adam
    assert_settings(task, settings, {id(p): (1e-4, 1e-4) for p in task.parameters() if p.requires_grad})


# -- the rules themselves, and the BatchNorm of the VFNet recipe --------------------------------------------------------


def test_rules_group_parameters_as_mmcv():
    from lit_tasks.param_groups import ParamGroupRules, param_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.BatchNorm2d(4), nn.PReLU(4), nn.Conv2d(4, 4, 1),
                          nn.Flatten(), nn.LazyLinear(5), nn.LayerNorm(5))
    model(torch.rand(1, 3, 6, 6))
    model.register_parameter("scales", nn.Parameter(torch.ones(3)))  # a 1-D parameter that is no bias
    model[4].weight.requires_grad_(False)  # frozen: in no group
    rules = ParamGroupRules(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.5)
    groups = param_groups(model, rules)
    got = {id(p): (g.get("lr_ratio", 1.0), g.get("weight_decay_ratio", 1.0)) for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(got)  # no parameter twice
    assert got == mmcv_multipliers(model, 2.0, 0.0, 0.5)
    assert "lr_ratio" not in groups[0] and "weight_decay_ratio" not in groups[0]  # the plain group first
    assert id(model[4].weight) not in got and got[id(model.scales)] == (1.0, 1.0)
    plain = param_groups(model)  # the default: torch.optim.X(model.parameters())
    assert len(plain) == 1 and [id(p) for p in plain[0]["params"]] == [
        id(p) for p in model.parameters() if p.requires_grad]


def test_scale_lr_splits_groups_and_multiplies_their_ratio():
    from lit_tasks.param_groups import scale_lr

    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = [{"params": [a, b]}, {"params": [c], "lr_ratio": 2.0, "weight_decay_ratio": 0.0}]
    assert scale_lr(groups, 1.0, [b]) is groups
    split = scale_lr(groups, 0.1, [b, c])  # b leaves its group with 0.1x; c's group keeps its decay ratio
    assert [([id(p) for p in g["params"]], g.get("lr_ratio"), g.get("weight_decay_ratio")) for g in split] == [
        ([id(a)], None, None), ([id(b)], 0.1, None), ([id(c)], pytest.approx(0.2), 0.0)]
    assert [g.get("lr_ratio") for g in scale_lr(groups, 0.5)] == [0.5, 1.0]  # every parameter: no split


def test_injected_optimizer_follows_the_recipe_groups():
    """--model.optimizer=... takes the recipe's groups too: lr and weight decay times the group's ratios."""
    task = tiny_detector(optimizer=lambda params: torch.optim.AdamW(params, lr=1.0, weight_decay=0.5))
    _, settings = optimizer_settings(task)
    expected = {k: (lr, 0.5 * wd) for k, (lr, wd) in mmcv_multipliers(task, 2.0, 0.0).items()}
    assert_settings(task, settings, expected)


def test_statistics_frozen_batchnorm():
    """frozen_bn='statistics': the running statistics normalise in training too and never move; weight and bias get
    gradients; a BatchNorm2d state dict loads; SyncBatchNorm conversion leaves it alone."""
    from lit_tasks.models.backbone import FrozenStatisticsBatchNorm2d, freeze_batch_norm_statistics

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(bn.weight)
    model = freeze_batch_norm_statistics(nn.Sequential(nn.Conv2d(3, 3, 1), bn))
    frozen = model[1]
    assert isinstance(frozen, FrozenStatisticsBatchNorm2d) and frozen.weight.requires_grad
    x = torch.randn(4, 3, 5, 5)
    expected = bn.eval()(model[0](x))
    out = model.train()(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert frozen.weight.grad.abs().sum() > 0 and frozen.bias.grad.abs().sum() > 0
    torch.testing.assert_close(frozen.running_mean, bn.running_mean)
    fresh = FrozenStatisticsBatchNorm2d(3)
    fresh.load_state_dict(bn.state_dict())  # num_batches_tracked dropped
    torch.testing.assert_close(fresh.running_var, bn.running_var)
    assert isinstance(nn.SyncBatchNorm.convert_sync_batchnorm(model)[1], FrozenStatisticsBatchNorm2d)
    from timm.layers import BatchNormAct2d

    with pytest.raises(ValueError, match="'1' is a BatchNormAct2d"):
        freeze_batch_norm_statistics(nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3)))
