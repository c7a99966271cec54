"""Published weights: read a local file, check the architecture it needs, load it with every key accounted for.

One mechanism for every task's ``pretrained_weights`` option. A family's converter
(``lit_tasks/models/<family>/convert.py``) turns the reference's state dict (torchvision, mmdetection, insightface,
...) into a :class:`Converted`: our key names, the task options the weights need (``options``: e.g.
``backbone="resnet101"``, FCOS's ``points="torchvision"``), the keys of the class head (rows = classes) and the
reference's own evaluation settings (``reference_eval``, reported, never forced: they belong to a run).

A file converted once by ``tools/convert_weights.py`` holds ``{"state_dict": ours, "lit_tasks_weights": {"task",
"source", "options", "class_head", "reference_eval"}}`` and loads without converting again.

Loading (:func:`load_converted`) is strict both ways: any key of the model the file does not fill and any key of the
file the model does not use is listed in one ``ValueError``, and so is every shape difference; BatchNorm's
``num_batches_tracked`` counters are the only exception (frozen BN has none; a trainable BN keeps its own when a file
has none). The class head can be re-initialised (another dataset) or cut to chosen rows (a subset of the classes).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor, nn

WEIGHTS_KEY = "lit_tasks_weights"  # the record a converted file carries beside its state dict


@dataclass
class Converted:
    """A state dict under our names and what it needs.

    Attributes:
        state_dict: our key -> tensor.
        options: task init arguments the weights need (architecture: a mismatch is an error, an option left at
            None takes this value).
        source: the layout it came from, in words (``"torchvision fcos_resnet50_fpn"``).
        class_head: our keys whose first dimension runs over the classes (rows), for ``class_rows`` /
            ``reinit_class_head``; empty where the file has no class head.
        reference_eval: the evaluation settings the reference reports its number with (task option -> value), for
            the record and a hint when a run differs.
    """

    state_dict: dict[str, Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    source: str = "lit_tasks"
    class_head: tuple[str, ...] = ()
    reference_eval: dict[str, Any] = field(default_factory=dict)

    def record(self, task: str) -> dict[str, Any]:
        """The ``lit_tasks_weights`` entry of a converted file."""
        return {"task": task, "source": self.source, "options": dict(self.options),
                "class_head": list(self.class_head), "reference_eval": dict(self.reference_eval)}


# -- reading ------------------------------------------------------------------------------------------------------
def read_file(path: str | Path) -> Any:
    """What a local weights file holds: ``.safetensors`` (a state dict) or a torch pickle read with
    ``weights_only=True`` (``argparse.Namespace`` allowed: facebookresearch/detr and OadTR store their ``args``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises several types for a file that is not a safe pickle)
        raise ValueError(f"{path}: not a weights file torch.load(weights_only=True) can read ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err


def state_dict_of(obj: Any, path: str | Path) -> dict[str, Tensor]:
    """The state dict inside a loaded file: the object itself, or under ``state_dict`` (Lightning, mmcv, our
    converted files) / ``model`` (facebookresearch, OadTR); a common ``module.`` prefix (DataParallel) is removed."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), or one under 'state_dict' / 'model'")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_converted(path: str | Path, convert: Callable[[dict[str, Tensor]], Converted]) -> Converted:
    """Read ``path`` and return our :class:`Converted`: a converted file as it is recorded, any other through
    ``convert`` (the family's converter, which recognises the layout from the key names)."""
    return converted_from(read_file(path), path, convert)


def converted_from(obj: Any, path: str | Path, convert: Callable[[dict[str, Tensor]], Converted]) -> Converted:
    """:func:`read_converted` of what the file at ``path`` holds, already loaded."""
    record = obj.get(WEIGHTS_KEY) if isinstance(obj, dict) else None
    state_dict = state_dict_of(obj, path)
    if isinstance(record, dict):
        return Converted(state_dict, dict(record.get("options", {})), f"{record.get('source', '?')} (converted)",
                         tuple(record.get("class_head", ())), dict(record.get("reference_eval", {})))
    try:
        return convert(state_dict)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def save_converted(converted: Converted, task: str, path: str | Path) -> Path:
    """Write ``{"state_dict", "lit_tasks_weights"}`` (readable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": converted.state_dict, WEIGHTS_KEY: converted.record(task)}, path)
    return path


# -- options ------------------------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def apply_options(hparams: MutableMapping[str, Any], options: Mapping[str, Any], owner: str, path: str) -> list[str]:
    """Fill the task options the weights need: an option left at None takes the file's value (written into
    ``hparams``, so a checkpoint of the run rebuilds the same network without the file); one given with another value
    is an error that names each difference. Returns the options set from the file, as ``name=value``."""
    differ, taken = [], []
    for name, needed in options.items():
        if name not in hparams:
            raise ValueError(f"{owner}: pretrained_weights {path} needs option {name}={needed!r}, which this task "
                             f"does not have (weights of another task?)")
        given = hparams[name]
        if given is None:
            hparams[name] = needed
            taken.append(f"{name}={needed!r}")
        elif not _same(given, needed):
            differ.append(f"{name}={needed!r} (given {given!r})")
    if differ:
        raise ValueError(f"{owner}: pretrained_weights {path} were made for another architecture: set "
                         + ", ".join(differ))
    return taken


def differing_eval(reference: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``name=value`` of the reference's evaluation settings that this run does not use."""
    return [f"{k}={v!r}" for k, v in reference.items() if k in current and not _same(current[k], v)]


# -- loading ------------------------------------------------------------------------------------------------------
def listing(keys: Sequence[str], limit: int = 20) -> str:
    """Up to ``limit`` names, then how many more."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return (shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")) or "none"


def select_class_rows(state_dict: dict[str, Tensor], head: Sequence[str], rows: Sequence[int],
                      keep_last: bool = False) -> dict[str, Tensor]:
    """``state_dict`` with each ``head`` tensor cut to ``rows`` (``keep_last``: the file's last row, e.g. DETR's
    no-object, appended). ValueError for a row outside the file's classes."""
    out = dict(state_dict)
    for key in head:
        value = state_dict[key]
        available = value.shape[0] - (1 if keep_last else 0)
        bad = [r for r in rows if not 0 <= int(r) < available]
        if bad:
            raise ValueError(f"class rows {bad} outside the file's {available} classes [0, {available}) of {key}")
        index = torch.tensor([int(r) for r in rows] + ([available] if keep_last else []), dtype=torch.long)
        out[key] = value[index].clone()
    return out


def load_converted(
    model: nn.Module,
    converted: Converted,
    *,
    class_rows: Sequence[int] | None = None,
    reinit_class_head: bool = False,
    what: str = "weights",
    drop: Sequence[str] = (),
) -> None:
    """Load ``converted`` into ``model`` strictly (see the module docstring).

    Args:
        class_rows: for each class of the model, the file's class-head row (e.g. COCO category ids for a model
            whose classes are COCO's in id order).
        reinit_class_head: keep the model's own (fresh) class head, for other classes.
        what: how messages name the file (``"DetectionTask: pretrained_weights fcos.pth"``).
        drop: key prefixes of the file this model deliberately leaves out (e.g. RLE's ``flow.`` when training with
            the L1 loss); anything else unmatched stays an error.

    Raises:
        ValueError: both options given; a class head of another size without either; keys unmatched in either
            direction; other shapes. Each message names the keys.
    """
    if class_rows is not None and reinit_class_head:
        raise ValueError(f"{what}: give class rows or reinit_class_head, not both")
    sd = {k: v for k, v in converted.state_dict.items() if not k.startswith(tuple(drop))}
    own = model.state_dict()
    head = [k for k in converted.class_head if k in sd]
    if (class_rows is not None or reinit_class_head) and not head:
        raise ValueError(f"{what}: the file has no class head to re-initialise or cut ({converted.source})")
    if reinit_class_head:
        sd.update({k: own[k] for k in head if k in own})
    elif class_rows is not None:
        sd = select_class_rows(sd, head, class_rows)
    else:
        wrong = [k for k in head if k in own and sd[k].shape[0] != own[k].shape[0]]
        if wrong:
            raise ValueError(f"{what}: the file's class head has {sd[wrong[0]].shape[0]} classes, the model "
                             f"{own[wrong[0]].shape[0]}: pass class rows (the file's row of each of our classes, "
                             f"e.g. COCO category ids) or reinit_class_head=True (a new, untrained class head)")
    for key in [k for k in sd if k.endswith("num_batches_tracked") and k not in own]:
        del sd[key]  # frozen BN (FrozenBatchNorm2d) keeps no counter
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = value
    missing = [k for k in own if k not in sd]
    unused = [k for k in sd if k not in own]
    if missing or unused:
        raise ValueError(f"{what} ({converted.source}) do not fit the model: {len(missing)} key(s) of the model not in "
                         f"the file: {listing(missing)}; {len(unused)} key(s) of the file the model does not use: "
                         f"{listing(unused)}")
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{what} ({converted.source}): tensors of other shapes than the model's: {listing(wrong)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


# -- renaming -----------------------------------------------------------------------------------------------------
Rule = tuple[str, Any]  # (regex, replacement template | function of the match | None to drop the key)


def rename(state_dict: Mapping[str, Tensor], rules: Sequence[Rule], layout: str) -> dict[str, Tensor]:
    """Apply the first matching ``(pattern, replacement)`` rule to each key (``re.match``: the pattern matches the key's
    start, which the replacement replaces; the rest of the key is kept). A rule whose replacement is None drops the key; a key no rule
    matches is an error naming every such key."""
    out: dict[str, Tensor] = {}
    unmatched = []
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            match = re.match(pattern, key)
            if match:
                if replacement is not None:
                    head = replacement(match) if callable(replacement) else match.expand(replacement)
                    out[head + key[match.end():]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"{layout}: {len(unmatched)} key(s) map to nothing of ours: {listing(unmatched)}")
    return out


def blocks_per_stage(state_dict: Mapping[str, Tensor], prefix: str, stages: int = 4) -> tuple[int, ...]:
    """Blocks in each ``{prefix}layer{s}.{i}.`` stage of a ResNet-like state dict."""
    return tuple(len({k[len(f"{prefix}layer{s}."):].split(".")[0] for k in state_dict
                      if k.startswith(f"{prefix}layer{s}.")}) for s in range(1, stages + 1))


RESNET_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def resnet_name(state_dict: Mapping[str, Tensor], prefix: str) -> str | None:
    """timm's name of a torchvision-style ResNet from its blocks (``resnet18/34/50/101/152``), else None."""
    blocks = blocks_per_stage(state_dict, prefix)
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
    if blocks == (3, 4, 6, 3):
        return "resnet50" if bottleneck else "resnet34"
    depth = RESNET_DEPTHS.get(blocks)
    return None if depth is None or bottleneck != (depth >= 50) else f"resnet{depth}"


# -- the task side ------------------------------------------------------------------------------------------------
@dataclass
class PublishedWeights:
    """A task's ``pretrained_weights``, read and converted, its options applied (see :func:`published_weights`)."""

    path: str
    owner: str
    converted: Converted

    def load_into(self, model: nn.Module, class_rows: Sequence[int] | None = None,
                  reinit_class_head: bool = False, drop: Sequence[str] = ()) -> None:
        """:func:`load_converted` into the built network."""
        load_converted(model, self.converted, class_rows=class_rows, reinit_class_head=reinit_class_head,
                       what=f"{self.owner}: pretrained_weights {self.path}", drop=drop)

    def eval_hint(self, current: Mapping[str, Any]) -> str | None:
        """A line naming the reference's evaluation settings this run does not use (None when it uses them all)."""
        differ = differing_eval(self.converted.reference_eval, current)
        if not differ:
            return None
        return (f"{self.owner}: {self.converted.source} reports its published number with " + ", ".join(differ)
                + " (evaluation settings: pass them to reproduce it exactly)")


def published_weights(hparams: MutableMapping[str, Any], owner: str,
                      read: Callable[[str], Converted]) -> PublishedWeights | None:
    """Before the network is built: read ``hparams["pretrained_weights"]`` (None: nothing to do) with the family's
    ``read`` and apply the options the file needs to ``hparams`` (:func:`apply_options`). After building, call
    :meth:`PublishedWeights.load_into`."""
    path = hparams.get("pretrained_weights")
    if not path:
        if hparams.get("pretrained_class_rows") is not None or hparams.get("reinit_class_head"):
            raise ValueError(f"{owner}: pretrained_class_rows / reinit_class_head choose the class head of "
                             "pretrained_weights; none is given")
        return None
    if hparams.get("pretrained"):
        raise ValueError(f"{owner}: pretrained_weights {path} holds the backbone too: set pretrained false (it would "
                         "download ImageNet weights only to replace them)")
    converted = read(str(path))
    taken = apply_options(hparams, converted.options, owner, str(path))
    if taken:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"{owner}: from pretrained_weights {path} ({converted.source}): " + ", ".join(taken))
    return PublishedWeights(str(path), owner, converted)
