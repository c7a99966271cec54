"""Published DETR weights onto :class:`lit_tasks.models.detection.detr.DETR`: the original and the Hugging Face layouts.

Supported state dict layouts (detected from the key names):

- ``facebookresearch``: facebookresearch/detr checkpoints (``torch.load(...)["model"]``): ``backbone.0.body.*``
  (torchvision ResNet), ``backbone.1.*`` (learned position embedding), ``transformer.{encoder,decoder}.layers.N.*``
  with ``nn.MultiheadAttention``'s fused ``in_proj_weight`` / ``in_proj_bias`` (split here into q, k, v),
  ``transformer.decoder.norm``, ``input_proj``, ``query_embed``, ``class_embed``, ``bbox_embed``. Post-norm only
  (a pre-norm checkpoint's ``transformer.encoder.norm`` is reported as unmatched).
- ``huggingface``: ``DetrForObjectDetection.state_dict()`` of transformers 4.x (the files on the hub:
  ``model.backbone.conv_encoder.model.*``, ``out_proj``, ``fc1``) and 5.x (``model.backbone.model.*``,
  ``o_proj``, ``mlp.fc1``), with a timm backbone (the default) or Hugging Face's own ResNet (``use_timm_backbone=False``,
  mapped onto timm's names).
- ``lit_tasks``: our own names (a state dict saved from :class:`DETR`), taken as it is.

torchvision's and timm's ResNets name their weights alike (``conv1``, ``bn1``, ``layerK.B.convJ``,
``downsample.0/1``), so the backbone maps by prefix. BatchNorm ``num_batches_tracked`` counters are dropped
(frozen BN has none) and filled from the model where it has them.

**Another number of classes** (the common first question): the published COCO models have 92 class logits
(91 = max COCO category id + 1, plus no-object; class index = category id, detr#108). Either keep chosen rows
(``class_rows``: for each of our classes, its row in the checkpoint; e.g. ``sorted(coco_category_ids)`` for
the 80 COCO classes numbered contiguously in id order; the no-object row is always kept, last), or
``reinit_class_head=True``: everything is loaded except ``class_embed``, which keeps the model's fresh
initialisation, to be fine-tuned on the new classes. Neither given and the sizes differ: an error says so.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

# (pattern, replacement) applied in order, first match wins. The replacement is a template, a function of the match,
# or None for a key that carries nothing for us.
_Rule = tuple[str, Union[str, Callable[[re.Match], str], None]]
_HF_BACKBONE = r"^model\.backbone\.(?:conv_encoder\.)?model\."  # transformers 4.x: conv_encoder; 5.x: none
_HF_BLOCK = _HF_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."  # HF ResNet stage S, block B
_HF_RULES: list[_Rule] = [
    (r".*\.num_batches_tracked$", None),
    # Hugging Face's own ResNet (use_timm_backbone=False) -> timm / torchvision names.
    (_HF_BACKBONE + r"embedder\.embedder\.convolution\.", "backbone.conv1."),
    (_HF_BACKBONE + r"embedder\.embedder\.normalization\.", "backbone.bn1."),
    (_HF_BLOCK + r"shortcut\.convolution\.", lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (_HF_BLOCK + r"shortcut\.normalization\.", lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (_HF_BLOCK + r"layer\.(\d+)\.convolution\.", lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (_HF_BLOCK + r"layer\.(\d+)\.normalization\.", lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
    # timm backbone: the names are timm's already.
    (_HF_BACKBONE, "backbone."),
    (r"^model\.(?:backbone\.)?position_embedding\.row_embeddings\.", "position_embedding.row_embed."),
    (r"^model\.(?:backbone\.)?position_embedding\.column_embeddings\.", "position_embedding.col_embed."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"transformer.encoder_layers.\1.self_attn.\2_proj."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.(?:o|out)_proj\.", r"transformer.encoder_layers.\1.self_attn.out_proj."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.encoder_layers.\1.norm1."),
    (r"^model\.encoder\.layers\.(\d+)\.(?:mlp\.)?fc(\d)\.", r"transformer.encoder_layers.\1.linear\2."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder_layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"transformer.decoder_layers.\1.self_attn.\2_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.(?:o|out)_proj\.", r"transformer.decoder_layers.\1.self_attn.out_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder_layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.([qkv])_proj\.", r"transformer.decoder_layers.\1.cross_attn.\2_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.(?:o|out)_proj\.", r"transformer.decoder_layers.\1.cross_attn.out_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder_layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.(?:mlp\.)?fc(\d)\.", r"transformer.decoder_layers.\1.linear\2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder_layers.\1.norm3."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder_norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.layers\.(\d+)\.", r"bbox_embed.layers.\1."),
]

_FACEBOOK_RULES: list[_Rule] = [
    (r".*\.num_batches_tracked$", None),
    (r"^backbone\.0\.body\.", "backbone."),
    (r"^backbone\.1\.(row|col)_embed\.", r"position_embedding.\1_embed."),
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"transformer.encoder_layers.\1.self_attn."),
    (r"^transformer\.encoder\.layers\.(\d+)\.(linear[12]|norm[12])\.", r"transformer.encoder_layers.\1.\2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.", r"transformer.decoder_layers.\1.self_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.", r"transformer.decoder_layers.\1.cross_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.(linear[12]|norm[123])\.", r"transformer.decoder_layers.\1.\2."),
    (r"^transformer\.decoder\.norm\.", "transformer.decoder_norm."),
    (r"^(input_proj|query_embed|class_embed|bbox_embed\.layers\.\d+)\.", r"\1."),
]


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"facebookresearch"``, ``"huggingface"`` or ``"lit_tasks"`` from the key names; ValueError otherwise."""
    keys = list(state_dict)
    if any(k.startswith("transformer.encoder_layers.") for k in keys):
        return "lit_tasks"
    if any(k.startswith("backbone.0.body.") for k in keys) or any(k.startswith("transformer.encoder.layers.") for k in keys):
        return "facebookresearch"
    if any(k.startswith("model.encoder.layers.") for k in keys) or any(k.startswith("class_labels_classifier.") for k in keys):
        return "huggingface"
    raise ValueError(f"not a DETR state dict of a known layout (facebookresearch/detr, Hugging Face "
                     f"DetrForObjectDetection, lit_tasks); first keys: {keys[:5]}")


def _rename(key: str, rules: list[_Rule]) -> str | None | bool:
    """The new name, None for a key to drop, False when no rule matches."""
    for pattern, replacement in rules:
        match = re.match(pattern, key)
        if match:
            if replacement is None:
                return None
            suffix = key[match.end():]
            head = replacement(match) if callable(replacement) else match.expand(replacement)
            return head + suffix
    return False


def convert_detr_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a DETR state dict of any supported layout to ours (values untouched except the split ``in_proj``).

    Raises:
        ValueError: naming every key no rule maps (e.g. a segmentation head, a pre-norm encoder's final norm).
    """
    layout = detect_layout(state_dict)
    if layout == "lit_tasks":
        return dict(state_dict)
    rules = _HF_RULES if layout == "huggingface" else _FACEBOOK_RULES
    converted: dict[str, Tensor] = {}
    unmatched = []
    for key, value in state_dict.items():
        new = _rename(key, rules)
        if new is False:
            unmatched.append(key)
        elif new is not None:
            converted.update(_split_in_proj(new, value))
    if unmatched:
        raise ValueError(f"{layout} DETR state dict: {len(unmatched)} key(s) match nothing in lit_tasks' DETR: "
                         f"{_listing(unmatched)}")
    return converted


def _split_in_proj(key: str, value: Tensor) -> dict[str, Tensor]:
    """``nn.MultiheadAttention``'s stacked (q; k; v) ``in_proj_weight`` / ``in_proj_bias`` -> three projections."""
    match = re.match(r"^(.*\.)?in_proj_(weight|bias)$", key)
    if not match:
        return {key: value}
    q, k, v = value.chunk(3, dim=0)
    return {f"{match[1] or ''}{name}_proj.{match[2]}": t.clone() for name, t in zip("qkv", (q, k, v))}


def _listing(keys: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def infer_detr_config(state_dict: Mapping[str, Tensor]) -> dict[str, object]:
    """Sizes readable from a (converted) state dict: ``d_model``, ``num_queries``, layer counts, ``dim_feedforward``,
    ``num_classes`` (class logits - 1), ``position_embedding``. Heads, backbone depth and dilation are not stored."""
    sd = convert_detr_state_dict(state_dict)
    layers = lambda part: len({k.split(".")[2] for k in sd if k.startswith(f"transformer.{part}_layers.")})  # noqa: E731
    return {
        "d_model": sd["query_embed.weight"].shape[1],
        "num_queries": sd["query_embed.weight"].shape[0],
        "num_encoder_layers": layers("encoder"),
        "num_decoder_layers": layers("decoder"),
        "dim_feedforward": sd["transformer.encoder_layers.0.linear1.weight"].shape[0],
        "num_classes": sd["class_embed.weight"].shape[0] - 1,
        "position_embedding": "learned" if "position_embedding.row_embed.weight" in sd else "sine",
    }


# Parameters of DETR's training-only parts (queries of detr_queries, the head of detr_aux_head), absent from published
# files.
TRAINING_ONLY_PREFIXES = ("denoising.", "box_position.", "extra_query_embed.", "aux_head.")


def load_detr_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    class_rows: Sequence[int] | None = None,
    reinit_class_head: bool = False,
) -> None:
    """Convert ``state_dict`` (any supported layout) and load it into ``model`` (a :class:`DETR`), strictly.

    Args:
        class_rows: for each of the model's classes, the checkpoint's class-head row to take (the no-object row,
            the checkpoint's last, is appended). E.g. ``sorted(coco_category_ids)`` for the 80 COCO classes.
        reinit_class_head: load everything except ``class_embed`` (kept as initialised), for new classes.

    Raises:
        ValueError: unmatched keys in either direction, shape mismatches, or a class head of another size
            without ``class_rows`` / ``reinit_class_head``; each message names the keys.
    """
    if class_rows is not None and reinit_class_head:
        raise ValueError("load_detr_weights: give class_rows or reinit_class_head, not both")
    sd = convert_detr_state_dict(state_dict)
    own = model.state_dict()
    num_logits = own["class_embed.weight"].shape[0]
    if reinit_class_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("class_embed.")}
        sd.update({k: v for k, v in own.items() if k.startswith("class_embed.")})
    elif class_rows is not None:
        if len(class_rows) != num_logits - 1:
            raise ValueError(f"class_rows has {len(class_rows)} entries, the model has {num_logits - 1} classes")
        available = sd["class_embed.weight"].shape[0] - 1
        bad = [r for r in class_rows if not 0 <= r < available]
        if bad:
            raise ValueError(f"class_rows {bad} outside the checkpoint's {available} classes [0, {available})")
        rows = torch.tensor(list(class_rows) + [available])  # the no-object row stays last
        sd["class_embed.weight"] = sd["class_embed.weight"][rows]
        sd["class_embed.bias"] = sd["class_embed.bias"][rows]
    elif sd["class_embed.weight"].shape[0] != num_logits:
        raise ValueError(f"the checkpoint's class head has {sd['class_embed.weight'].shape[0]} logits "
                         f"({sd['class_embed.weight'].shape[0] - 1} classes + no-object), the model {num_logits}: pass "
                         f"class_rows (which checkpoint class each of ours is) or reinit_class_head=True "
                         f"(a new, untrained class head)")
    for key, value in own.items():  # BatchNorm counters: frozen BN has none, trainable BN keeps its own
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = value
    # Training-only query modules (denoising, extra query groups) are not in published weights: kept as initialised.
    sd.update({k: v for k, v in own.items() if k.startswith(TRAINING_ONLY_PREFIXES) and k not in sd})
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError("DETR weights do not fit the model (built with another backbone, position embedding or "
                         f"depth?): missing in the checkpoint: {_listing(missing) or 'none'}; not in the model: "
                         f"{_listing(unexpected) or 'none'}")
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f"DETR weights of other shapes than the model's: {_listing(wrong)}")
    model.load_state_dict(sd, strict=True)


def _load_file(path: str | Path) -> object:
    """What a local weights file holds: ``.safetensors`` (a state dict) or a torch pickle, read with
    ``weights_only=True`` (``argparse.Namespace`` allowed: facebookresearch/detr checkpoints store their ``args``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DETR checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _state_dict_of(obj: object, path: str | Path) -> dict[str, Tensor]:
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), or one under 'model' / 'state_dict'")
    return obj


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local file: ``.safetensors`` or a torch pickle (``.pth``, ``.pt``, ``.bin``).

    Loaded with ``weights_only=True`` (``argparse.Namespace`` allowed: facebookresearch/detr checkpoints store
    their ``args``); a ``{"model": ...}`` (facebookresearch) or ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    return _state_dict_of(_load_file(path), path)


# build_detr arguments that a converted file fixes and that a mismatch would not always reveal through shapes
# (nheads, dilation) or that give a clearer message than the shape listing.
_ARCHITECTURE = ("backbone", "dilation", "position_embedding", "d_model", "nheads", "num_encoder_layers",
                 "num_decoder_layers", "dim_feedforward", "num_queries")


def load_pretrained_detr(
    model: nn.Module,
    path: str | Path,
    class_rows: Sequence[int] | None = None,
    reinit_class_head: bool = False,
    build_args: Mapping[str, object] | None = None,
) -> None:
    """Load a local DETR weights file into ``model``: a file of ``tools/convert_detr.py`` or any layout
    :func:`read_checkpoint` reads (facebookresearch ``.pth``, Hugging Face ``model.safetensors`` /
    ``pytorch_model.bin``), through :func:`load_detr_weights` (``class_rows`` / ``reinit_class_head`` as there).

    A converted file records the ``build_detr`` arguments it was made for; those of ``_ARCHITECTURE`` must equal
    ``build_args`` (the model's), else ValueError naming each difference (the number of heads, for one, changes
    no shape: only this check catches it).
    """
    obj = _load_file(path)
    saved = obj.get("build_detr") if isinstance(obj, dict) else None
    if isinstance(saved, dict) and build_args is not None:
        differ = [f"{k}={build_args[k]!r} (the file: {saved[k]!r})" for k in _ARCHITECTURE
                  if k in saved and k in build_args and saved[k] != build_args[k]]
        if differ:
            raise ValueError(f"DETR weights {path} were converted for another architecture: set " + ", ".join(differ))
    try:
        load_detr_weights(model, _state_dict_of(obj, path), class_rows=class_rows,
                          reinit_class_head=reinit_class_head)
    except ValueError as err:
        raise ValueError(f"DETR weights {path}: {err}") from err
