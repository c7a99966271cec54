"""Frozen BatchNorms folded into their convolutions: the same outputs, gradients and state dict as unfolded.

Tolerances: the fold computes ``sum_i x_i (w_i s)`` where the BatchNorm computed ``(sum_i x_i w_i) s``; the two sums
of K = fan-in products round differently, by ~ sqrt(K) ulps (u = 2**-24) of the output's magnitude (random-walk
rounding of the partial sums). Over the network these differences add at most linearly: the bound is
``u * sum over folded convs of sqrt(K)`` relative to the largest output element (about 1.4e-5 for
``test_resnet``, 9e-5 for ``resnet50``; the measured differences are ~1e-6). A weight gradient also sums over the
N*H*W positions of its layer: ``sqrt(N*H*W) u`` more. A missing ``eps`` (1e-5 on variances of ~1) shifts each layer
by ~5e-6 in the same direction, a wrong shift or a BatchNorm applied twice by O(1): both beyond these bounds.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lit_tasks.models.backbone import build_backbone
from lit_tasks.models.conv_bn_fold import (FoldedConv2d, FoldedFrozenBatchNorm2d, fold_frozen_batch_norm,
                                           unfold_frozen_batch_norm)

U = 2.0**-24  # float32 unit roundoff
SIZE = 64


def _randomise_bn(module: nn.Module, seed: int) -> None:
    """Frozen-BN affine and statistics drawn at random (timm's zero-initialised last BNs would hide the fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _pair(name: str, frozen_stages: int = -1) -> tuple[nn.Module, nn.Module]:
    """(unfolded, folded) backbones with the same random weights and BN statistics (loaded *after* folding)."""
    torch.manual_seed(0)
    ref = build_backbone(name, frozen_bn=True, frozen_stages=frozen_stages, fold_frozen_bn=False)
    _randomise_bn(ref, seed=1)
    folded = build_backbone(name, frozen_bn=True, frozen_stages=frozen_stages)
    folded.load_state_dict(ref.state_dict())
    return ref, folded


def _bound(folded: nn.Module) -> float:
    """``u * sum sqrt(K)`` over the folded convolutions (see the module docstring)."""
    return U * sum(math.sqrt(m.weight[0].numel()) for m in folded.modules() if type(m) is FoldedConv2d)


def _run(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Feature maps and the input gradient of a seeded random projection of them (backward into the weights)."""
    x = x.clone().requires_grad_()
    features = model(x)
    g = torch.Generator().manual_seed(2)
    sum((f * torch.randn(f.shape, generator=g)).sum() for f in features).backward()
    return [f.detach() for f in features], x.grad


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=bound * expected.abs().max().item())


@pytest.mark.parametrize("name", ["test_resnet.r160_in1k", "resnet10t", "resnet50"])
def test_folded_outputs_and_gradients_equal_unfolded(name):
    """Deep stem (test_resnet, resnet10t), resnet-d pooled shortcut, BasicBlock and Bottleneck: every conv folds;
    features, input gradient and conv weight gradients equal the unfolded backbone's within the derived bound."""
    ref, folded = _pair(name)
    assert not any(type(m) is FrozenBatchNorm2d for m in folded.modules())  # a ResNet's BNs all follow a conv
    n_conv = sum(isinstance(m, nn.Conv2d) for m in folded.modules())
    assert sum(type(m) is FoldedConv2d for m in folded.modules()) == n_conv
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    (ref_out, ref_dx), (out, dx) = _run(ref, x), _run(folded, x)
    bound = _bound(folded)
    for a, b in zip(out, ref_out):
        _assert_close(a, b, bound)
    _assert_close(dx, ref_dx, bound)
    positions = math.sqrt(2 * (SIZE // 2) ** 2)  # the stem's N*H*W, the most a weight gradient sums over
    folded_params = dict(folded.named_parameters())
    for key, p in ref.named_parameters():
        _assert_close(folded_params[key].grad, p.grad, bound + positions * U)


def test_state_dict_keys_and_values_unchanged():
    torch.manual_seed(0)
    plain = build_backbone("test_resnet.r160_in1k", frozen_bn=True, fold_frozen_bn=False)
    torch.manual_seed(0)
    folded = build_backbone("test_resnet.r160_in1k", frozen_bn=True)
    assert list(folded.state_dict()) == list(plain.state_dict())
    assert "conv1.0.weight" in plain.state_dict() and "layer1.0.bn1.running_var" in plain.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(folded.state_dict().values(), plain.state_dict().values()))


def test_buffers_read_at_call_time():
    """Statistics loaded after folding, in place or by assignment, are the ones applied."""
    ref, folded = _pair("resnet10t")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    _randomise_bn(ref, seed=4)  # new statistics, different from those folded loaded
    with torch.no_grad():
        assert not torch.allclose(folded(x)[-1], ref(x)[-1])
        folded.load_state_dict(ref.state_dict())
        for a, b in zip(folded(x), ref(x)):
            _assert_close(a, b, _bound(folded))
        _randomise_bn(ref, seed=5)
        folded.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
        for a, b in zip(folded(x), ref(x)):
            _assert_close(a, b, _bound(folded))


def test_frozen_stage_conv_weights_get_no_gradient():
    """frozen_stages=1: the stem and layer1 convolutions (requires_grad False) still fold and get no gradient."""
    ref, folded = _pair("resnet10t", frozen_stages=1)
    assert type(folded.layer1[0].conv1) is FoldedConv2d and not folded.layer1[0].conv1.weight.requires_grad
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    (ref_out, _), (out, _) = _run(ref, x), _run(folded, x)
    for a, b in zip(out, ref_out):
        _assert_close(a, b, _bound(folded))
    grads = lambda m: [k for k, p in m.named_parameters() if p.grad is not None]  # noqa: E731
    assert grads(folded) == grads(ref) and not any(k.startswith(("conv1.", "layer1.")) for k in grads(folded))


def test_channels_last():
    ref, folded = _pair("test_resnet.r160_in1k")
    folded = folded.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = folded(x.to(memory_format=torch.channels_last))
        expected = ref(x)
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(out, expected):
        _assert_close(a, b, _bound(folded))


def test_autocast_bfloat16_no_less_accurate():
    """Under CPU bf16 autocast the folded backbone's error against float32 is no more than twice the unfolded one's
    (both round activations and weights to bf16 once per layer; the fold rounds ``w * scale`` instead of ``w``)."""
    ref, folded = _pair("resnet10t")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain, out = ref(x), folded(x)
    for e, p, o in zip(exact, plain, out):
        assert o.dtype == torch.bfloat16
        plain_err, folded_err = (p.float() - e).abs().max(), (o.float() - e).abs().max()
        assert 0 < folded_err <= 2 * plain_err


def test_trace_and_deepcopy():
    """torch.jit.trace (tools/export.py) and a deep copy (EMA) compute the same; the copy folds its own BNs."""
    _, folded = _pair("test_resnet.r160_in1k")
    folded.eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    copied = copy.deepcopy(folded)
    assert copied.layer1[0].conv1.frozen_bn is copied.layer1[0].bn1
    with torch.no_grad():
        traced = torch.jit.trace(folded, x)
        expected = folded(x)
        for out in (traced(x), copied(x)):
            assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_unfold_restores_modules_and_outputs():
    ref, folded = _pair("test_resnet.r160_in1k")
    weight = folded.layer1[0].conv1.weight
    unfold_frozen_batch_norm(folded)
    assert {type(m) for m in folded.modules()} == {type(m) for m in ref.modules()}
    assert folded.layer1[0].conv1.weight is weight  # the same Parameters: optimizer references stay valid
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(folded(x), ref(x)))


def test_only_known_pairs_fold():
    """A Sequential's conv -> BN folds; a BN after a ReLU, or after a non-Sequential container, stays as it is."""
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                        FrozenBatchNorm2d(4), nn.ModuleList([nn.Conv2d(4, 4, 1)]), FrozenBatchNorm2d(4))
    fold_frozen_batch_norm(seq)
    assert [type(m).__name__ for m in seq] == ["FoldedConv2d", "FoldedFrozenBatchNorm2d", "ReLU", "Conv2d", "ReLU",
                                               "FrozenBatchNorm2d", "ModuleList", "FrozenBatchNorm2d"]
    assert seq[0].frozen_bn is seq[1] and isinstance(seq[1], FrozenBatchNorm2d)
    fold_frozen_batch_norm(seq)  # idempotent
    assert type(seq[0]) is FoldedConv2d and type(seq[1]) is FoldedFrozenBatchNorm2d and seq[0].frozen_bn is seq[1]
