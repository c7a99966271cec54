"""Frozen BatchNorms folded into the convolution before them: one pass over the activations instead of two.

A ``FrozenBatchNorm2d`` after a convolution is an affine map per output channel, ``y * scale + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale`` (torchvision's formula), so
``bn(conv(x, w)) == conv(x, w * scale, shift)``. :class:`FoldedConv2d` computes the right-hand side and the
BatchNorm becomes a :class:`FoldedFrozenBatchNorm2d` whose forward is the identity: the BatchNorm's elementwise pass
over the full activation map (forward and backward) disappears. The convolution weight still trains (its gradient
flows through the product) and the scale and shift are computed from the BatchNorm's buffers at every call, so
loading a state dict, ``.to()`` or ``load_state_dict(assign=True)`` afterwards act as before. Both modules keep their
names and tensors: the state dict (keys and values) is unchanged.

Only pairs whose data flow is known are folded (anything else stays as it is): consecutive children of an
``nn.Sequential`` or of timm's ``FeatureListNet`` (whose forward runs its children in order; a child whose output
is returned as a feature is left alone), including a Sequential ending in a convolution (timm's deep stem,
``conv1`` then ``bn1``) and the ``convK`` -> ``bnK`` pairs of timm's ResNet ``BasicBlock`` / ``Bottleneck``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import FeatureListNet
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A ``FrozenBatchNorm2d`` that the :class:`FoldedConv2d` before it applies; its own forward is the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedConv2d(nn.Conv2d):
    """``bn(conv(x))`` as one convolution with weight ``w * scale`` and bias ``shift`` read from ``bn`` at each call.

    ``bn`` is held without registering it (it stays a child of its own parent, so state dict keys do not change).
    """

    frozen_bn: FoldedFrozenBatchNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.frozen_bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # as FrozenBatchNorm2d.forward computes them
        shift = bn.bias - bn.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        return F.conv2d(x, self.weight * scale.reshape(-1, 1, 1, 1), shift, self.stride, self.padding, self.dilation,
                        self.groups)


def _conv_like(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    """A ``cls`` with ``conv``'s settings holding ``conv``'s own Parameters (optimizer references stay valid)."""
    out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
              dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
              device="meta")  # no allocation or init: the tensors are conv's
    out.weight = conv.weight
    if conv.bias is not None:
        out.bias = conv.bias
    out.train(conv.training)
    return out


def _bn_like(bn: FrozenBatchNorm2d, cls: type[FrozenBatchNorm2d]) -> FrozenBatchNorm2d:
    """A ``cls`` holding ``bn``'s own buffers and eps."""
    out = cls(bn.weight.shape[0], bn.eps)
    for name in ("weight", "bias", "running_mean", "running_var"):
        setattr(out, name, getattr(bn, name))
    out.train(bn.training)
    return out


def _foldable(module: nn.Module | None) -> bool:
    """A plain ``nn.Conv2d`` with zero padding (what :class:`FoldedConv2d`'s ``F.conv2d`` call computes)."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros"


def _last_conv(module: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, name) of the ``nn.Conv2d`` whose output ``module``'s output is: ``module`` itself, or the last child of
    a plain Sequential (recursively); None otherwise. ``module`` itself is returned with parent None."""
    if _foldable(module):
        return None, ""
    if type(module) is nn.Sequential and len(module):
        name = str(len(module) - 1)
        found = _last_conv(module[-1])
        if found is not None:
            return (module, name) if found[0] is None else found
    return None


def _pairs(parent: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(conv parent, conv name, bn name) of the conv -> frozen BN pairs among ``parent``'s children (the BN is a
    child of ``parent``; the conv is a child of ``parent`` or the last conv of a Sequential child)."""
    out = []
    if type(parent) is nn.Sequential or type(parent) is FeatureListNet:
        returned = getattr(parent, "return_layers", {})
        children = list(parent.named_children())
        for (name, child), (bn_name, bn) in zip(children, children[1:]):
            if type(bn) is not FrozenBatchNorm2d or name in returned:
                continue
            found = _last_conv(child)
            if found is not None:
                out.append((parent, name, bn_name) if found[0] is None else (*found, bn_name))
    elif type(parent) in (BasicBlock, Bottleneck):  # forward: convK -> bnK directly, K = 1, 2(, 3)
        for k in (1, 2, 3):
            conv, bn = getattr(parent, f"conv{k}", None), getattr(parent, f"bn{k}", None)
            if _foldable(conv) and type(bn) is FrozenBatchNorm2d:
                out.append((parent, f"conv{k}", f"bn{k}"))
    return out


def fold_frozen_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every pairable ``FrozenBatchNorm2d`` under ``module`` into its convolution (in place; idempotent).

    Undo with :func:`unfold_frozen_batch_norm` before replacing or unfreezing the BatchNorms (e.g. timm's
    ``unfreeze_batch_norm_2d``): a folded convolution keeps applying the BatchNorm it was paired with.
    """
    for parent in list(module.modules()):
        for conv_parent, conv_name, bn_name in _pairs(parent):
            bn = _bn_like(getattr(parent, bn_name), FoldedFrozenBatchNorm2d)
            conv = _conv_like(getattr(conv_parent, conv_name), FoldedConv2d)
            object.__setattr__(conv, "frozen_bn", bn)  # not registered: the BN's state stays under its own name
            setattr(parent, bn_name, bn)
            setattr(conv_parent, conv_name, conv)
    return module


def unfold_frozen_batch_norm(module: nn.Module) -> nn.Module:
    """Back to ``nn.Conv2d`` followed by ``FrozenBatchNorm2d`` (in place; the same tensors)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is FoldedConv2d:
                setattr(parent, name, _conv_like(child, nn.Conv2d))
            elif type(child) is FoldedFrozenBatchNorm2d:
                setattr(parent, name, _bn_like(child, FrozenBatchNorm2d))
    return module
