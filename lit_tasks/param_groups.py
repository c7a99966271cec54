"""The recipes' parameter groups: which parameters decay and at what learning rate, as declarative rules.

:class:`ParamGroupRules` is the part of mmcv's ``paramwise_cfg`` (``DefaultOptimizerConstructor.add_params``,
mmcv/runner/optimizer/default_constructor.py) the recipes here use:

* ``bias_lr_mult``, ``bias_decay_mult``: multiply the LR / weight decay of the ``bias`` of every layer but a
  normalisation layer (mmdet's FCOS and VFNet: ``bias_lr_mult=2., bias_decay_mult=0.``);
* ``norm_decay_mult``: multiplies the weight decay of the weight and bias of normalisation layers (BatchNorm,
  GroupNorm, LayerNorm, InstanceNorm and the VFNet recipe's statistics-frozen BatchNorm); their LR is the base one.

Everything else (weights, 1-D parameters such as FCOS's per-level scales, PReLU slopes, embeddings) keeps the base LR
and weight decay. The default rules (all 1) are ``torch.optim.X(model.parameters(), ...)``: every parameter decays,
which is what DETR, arcface_torch, mmseg's DeepLab, RLE and OadTR do.

:func:`param_groups` returns groups carrying ``lr_ratio`` / ``weight_decay_ratio``, multipliers that
:meth:`lit_tasks.base.BaseTask.configure_optimizers` applies to whatever optimizer is built (the recipe's or an injected
one), so the rules hold for both; :func:`scale_lr` scales the LR of some of them (a backbone) or all (the linear
scaling rule) through the same ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_tasks.models.backbone import FrozenStatisticsBatchNorm2d

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
               FrozenStatisticsBatchNorm2d)


@dataclass(frozen=True)
class ParamGroupRules:
    """LR and weight-decay multipliers by kind of parameter (mmcv ``paramwise_cfg`` names); all 1: one group."""

    bias_lr_mult: float = 1.0
    bias_decay_mult: float = 1.0
    norm_decay_mult: float = 1.0

    def multipliers(self, module: nn.Module, name: str) -> tuple[float, float]:
        """``(lr multiplier, weight-decay multiplier)`` of ``module``'s own parameter ``name``."""
        if isinstance(module, NORM_LAYERS):
            return 1.0, self.norm_decay_mult
        if name == "bias":
            return self.bias_lr_mult, self.bias_decay_mult
        return 1.0, 1.0


def param_groups(model: nn.Module, rules: ParamGroupRules = ParamGroupRules()) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in one group per distinct multiplier pair, in the order they first
    appear; the group of base LR and decay (no ratio keys) first. Frozen parameters are left out."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {(1.0, 1.0): []}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # a shared parameter goes where it was first met
                continue
            seen.add(id(param))
            groups.setdefault(rules.multipliers(module, name), []).append(param)
    out = []
    for (lr, decay), params in groups.items():
        if params:
            ratios = {k: v for k, v in (("lr_ratio", lr), ("weight_decay_ratio", decay)) if v != 1.0}
            out.append({"params": params, **ratios})
    return out


def scale_lr(groups: list[dict[str, Any]], ratio: float,
             params: Iterable[nn.Parameter] | None = None) -> list[dict[str, Any]]:
    """``groups`` with the LR of ``params`` (every parameter when None) times ``ratio``: each group split into its
    other parameters and those, the latter with ``lr_ratio`` x ``ratio`` (e.g. DETR's backbone at 0.1x)."""
    if ratio == 1.0:
        return groups
    chosen = None if params is None else {id(p) for p in params}
    out = []
    for group in groups:
        rest = [p for p in group["params"] if chosen is not None and id(p) not in chosen]
        mine = [p for p in group["params"] if chosen is None or id(p) in chosen]
        out += [{**group, "params": rest}] if rest else []
        out += [{**group, "params": mine, "lr_ratio": group.get("lr_ratio", 1.0) * ratio}] if mine else []
    return out


def linear_scaling(trainer: Any, base_batch_size: int, task: str) -> float:
    """The linear scaling rule (Goyal et al. 2017; mmdet ``auto_scale_lr``): images per optimizer step of the run
    (batch size x devices x accumulation) / ``base_batch_size``, the batch the recipe's LR is for."""
    if trainer is None:
        raise ValueError(f"{task}: lr_base_batch_size scales the LR by the run's batch: it needs a Trainer")
    per_device = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
    if per_device is None:
        trainer.estimated_stepping_batches  # noqa: B018  (sets up the training loader)
        per_device = getattr(trainer.train_dataloader, "batch_size", None)
    if not per_device:
        raise ValueError(f"{task}: lr_base_batch_size needs the batch size (a DataModule with batch_size or a "
                         "DataLoader with batch_size)")
    images = int(per_device) * trainer.world_size * trainer.accumulate_grad_batches
    rank_zero_info(f"{task}: linear scaling rule, LR x {images}/{base_batch_size} for {per_device} images x "
                   f"{trainer.world_size} devices x {trainer.accumulate_grad_batches} accumulated per step")
    return images / base_batch_size
