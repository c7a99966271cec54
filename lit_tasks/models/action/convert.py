"""Official OadTR checkpoints (wangxiang1230/OadTR ``main.py``: ``{"model": state_dict, "args", ...}``) onto our
:class:`~lit_tasks.models.action.oadtr.OadTR`.

The released ``VisionTransformer_v3`` (``transformer_models/ViT.py``, ``Transformer.py``, ``decoder.py``, ``attn.py``):

=====================================================================  ===============================================
released                                                               ours
=====================================================================  ===============================================
``linear_encoding``                                                    ``input_proj``
``cls_token`` ``(1, 1, E)``                                            ``task_token`` (appended after the window)
``position_encoding.pe.weight`` ``(T + 1, E)``                         ``pos_embed.weight``
``encoder.net.{2i}.fn.norm`` (``Residual(PreNormDrop(SelfAttention))``)  ``encoder.{i}.norm1``
``encoder.net.{2i}.fn.fn.qkv`` (no bias) / ``.fn.fn.proj``             ``encoder.{i}.attn.qkv`` / ``.attn.proj``
``encoder.net.{2i+1}.fn.norm`` (``Residual(PreNorm(FeedForward))``)    ``encoder.{i}.norm2``
``encoder.net.{2i+1}.fn.fn.net.{0,3}``                                 ``encoder.{i}.mlp.{0,3}``
``pre_head_ln``                                                        ``encoder_norm``
``decoder_cls_token`` ``(1, Q, E)``                                    ``queries``
``decoder.layers.{l}.self_attention.{query,key,value,out}_projection``  ``decoder.{l}.self_attn.{q,k,v,out}``
``decoder.layers.{l}.cross_attention.*_projection``                    ``decoder.{l}.cross_attn.*``
``decoder.layers.{l}.conv1`` / ``conv2`` (1x1 ``Conv1d``)              ``decoder.{l}.ffn.0`` / ``ffn.3`` (``Linear``:
                                                                       the kernel's last axis of 1 dropped)
``decoder.layers.{l}.norm{1,2,3}``, ``decoder.norm``                   ``decoder.{l}.norm{1,2,3}``, ``decoder_norm``
``classifier`` ``(C, E)``                                              ``anticipation_head``
``mlp_head`` ``(C, 2E)``                                               ``current_head``
``decoder_position_encoding.pe.weight`` ``(Q, E)``                     (built by the released model, never used in its
                                                                       forward: dropped)
``*.position_ids`` (``LearnedPositionalEncoding``'s index buffer)      (checked to be ``0, 1, ...``: dropped)
=====================================================================  ===============================================

The file records the sizes its shapes fix (``feature_dim``, ``window``, ``num_future``, ``embed_dim``, layer counts,
MLP / FFN widths); the numbers of heads are not stored (the released defaults 8 / 4 are ours).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from lit_tasks.models.published import Converted, Rule, read_converted, rename

OADTR_RULES: list[Rule] = [
    (r"^linear_encoding\.", "input_proj."),
    (r"^cls_token$", "task_token"),
    (r"^position_encoding\.pe\.", "pos_embed."),
    (r"^position_encoding\.position_ids$", "drop.position_ids"),
    (r"^decoder_position_encoding\.", None),  # never used by the released forward
    (r"^encoder\.net\.(\d+)\.fn\.norm\.", lambda m: f"encoder.{int(m[1]) // 2}.norm{int(m[1]) % 2 + 1}."),
    (r"^encoder\.net\.(\d+)\.fn\.fn\.(qkv|proj)\.", lambda m: f"encoder.{int(m[1]) // 2}.attn.{m[2]}."),
    (r"^encoder\.net\.(\d+)\.fn\.fn\.net\.(\d)\.", lambda m: f"encoder.{int(m[1]) // 2}.mlp.{m[2]}."),
    (r"^pre_head_ln\.", "encoder_norm."),
    (r"^decoder_cls_token$", "queries"),
    (r"^decoder\.layers\.(\d+)\.(self|cross)_attention\.(query|key|value|out)_projection\.",
     lambda m: f"decoder.{m[1]}.{m[2]}_attn.{ {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'out'}[m[3]] }."),
    (r"^decoder\.layers\.(\d+)\.conv1\.", r"decoder.\1.ffn.0."),
    (r"^decoder\.layers\.(\d+)\.conv2\.", r"decoder.\1.ffn.3."),
    (r"^decoder\.layers\.(\d+)\.(norm[123])\.", r"decoder.\1.\2."),
    (r"^decoder\.norm\.", "decoder_norm."),
    (r"^classifier\.", "anticipation_head."),
    (r"^mlp_head\.", "current_head."),
]
# ActionDetectionTask takes its classes from the data and offers no class-head choice: a file of other classes
# fails on the heads' shapes, naming them.
CLASS_HEAD: tuple[str, ...] = ()


def detect_action_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"oadtr_official"`` or ``"lit_tasks"``."""
    keys = set(state_dict)
    if {"linear_encoding.weight", "decoder_cls_token", "mlp_head.weight"} <= keys:
        return "oadtr_official"
    if {"input_proj.weight", "queries", "current_head.weight"} <= keys:
        return "lit_tasks"
    raise ValueError(f"not an OadTR state dict of a known layout (official VisionTransformer_v3, lit_tasks); first "
                     f"keys: {list(state_dict)[:5]}")


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def convert_official(state_dict: Mapping[str, Tensor]) -> Converted:
    """The released OadTR state dict -> ours (table in the module docstring)."""
    if "encoder.net.0.fn.fn.net.0.weight" in state_dict:
        raise ValueError("official OadTR: encoder.net.0 is a feed-forward block, expected attention first")
    sd = rename(state_dict, OADTR_RULES, "official OadTR")
    ids = sd.pop("drop.position_ids", None)
    if ids is not None and not torch.equal(ids.flatten()[: sd["pos_embed.weight"].shape[0]],
                                           torch.arange(sd["pos_embed.weight"].shape[0])):
        raise ValueError("official OadTR: position_encoding.position_ids is not 0, 1, 2, ...: another positional code")
    for key in [k for k in sd if k.startswith("decoder.") and ".ffn." in k and k.endswith(".weight")]:
        if sd[key].ndim == 3:  # Conv1d kernel (out, in, 1) -> Linear (out, in)
            sd[key] = sd[key].squeeze(-1)
    options = dict(feature_dim=int(sd["input_proj.weight"].shape[1]), window=int(sd["pos_embed.weight"].shape[0]) - 1,
                   num_future=int(sd["queries"].shape[1]), embed_dim=int(sd["input_proj.weight"].shape[0]),
                   enc_layers=_count(sd, "encoder."), enc_mlp_dim=int(sd["encoder.0.mlp.0.weight"].shape[0]),
                   dec_layers=_count(sd, "decoder."), dec_ffn_dim=int(sd["decoder.0.ffn.0.weight"].shape[0]))
    return Converted(sd, options, "official OadTR VisionTransformer_v3", CLASS_HEAD)


def convert_action_state_dict(state_dict: Mapping[str, Tensor]) -> Converted:
    """Any supported layout -> :class:`Converted`."""
    if detect_action_layout(state_dict) == "oadtr_official":
        return convert_official(state_dict)
    return Converted(dict(state_dict), {}, "lit_tasks OadTR", CLASS_HEAD)


def read_action_weights(path: str) -> Converted:
    """A local OadTR checkpoint (``{"model": ...}`` as ``main.py`` saves, or a converted file) as ours."""
    return read_converted(path, convert_action_state_dict)
