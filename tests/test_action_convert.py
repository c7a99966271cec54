"""Official OadTR checkpoints (lit_tasks/models/action/convert.py).

OadTR does not install from the package index. The test writes a checkpoint as the released ``main.py`` saves it
(``{"model": state_dict, "args": Namespace, ...}``) with exactly the names and shapes of its ``VisionTransformer_v3``
(``transformer_models/ViT.py``, ``Transformer.py``, ``decoder.py``, ``attn.py``; the positional encoding's
``nn.Embedding`` ``pe`` and ``position_ids`` buffer of the ``LearnedPositionalEncoding`` it imports), checks that
``ActionDetectionTask(pretrained_weights=...)`` uses every key and fills every tensor, and compares the outputs with the
released forward pass written out below from those files (small sizes: the mapping, not the width, is under test).
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from lit_tasks import ActionDetectionTask
from lit_tasks.models.action.convert import read_action_weights

SIZES = dict(feature_dim=24, embed_dim=32, window=6, num_future=3, enc_layers=2, dec_layers=2, enc_mlp_dim=48,
             dec_ffn_dim=40, num_classes=5)
ENC_HEADS, DEC_HEADS = 8, 4  # the released defaults (not in the file); ours by default
ATOL = 1e-5  # float32, the same operations in the same order on O(1) values (LayerNorm outputs)


def released_keys(s=SIZES) -> dict[str, tuple[int, ...]]:
    """``VisionTransformer_v3.state_dict()`` names and shapes (``use_representation=False``, learned positions)."""
    e, t, q, c = s["embed_dim"], s["window"], s["num_future"], s["num_classes"]
    keys = {"cls_token": (1, 1, e), "linear_encoding.weight": (e, s["feature_dim"]), "linear_encoding.bias": (e,),
            "position_encoding.pe.weight": (t + 1, e), "position_encoding.position_ids": (1, t + 1)}
    for i in range(s["enc_layers"]):
        a, f = f"encoder.net.{2 * i}.fn", f"encoder.net.{2 * i + 1}.fn"
        keys.update({f"{a}.norm.weight": (e,), f"{a}.norm.bias": (e,), f"{a}.fn.qkv.weight": (3 * e, e),
                     f"{a}.fn.proj.weight": (e, e), f"{a}.fn.proj.bias": (e,), f"{f}.norm.weight": (e,),
                     f"{f}.norm.bias": (e,), f"{f}.fn.net.0.weight": (s["enc_mlp_dim"], e),
                     f"{f}.fn.net.0.bias": (s["enc_mlp_dim"],), f"{f}.fn.net.3.weight": (e, s["enc_mlp_dim"]),
                     f"{f}.fn.net.3.bias": (e,)})
    keys.update({"pre_head_ln.weight": (e,), "pre_head_ln.bias": (e,), "mlp_head.weight": (c, 2 * e),
                 "mlp_head.bias": (c,)})
    for l in range(s["dec_layers"]):
        p = f"decoder.layers.{l}"
        for attn in ("self_attention", "cross_attention"):
            for proj in ("query", "key", "value", "out"):
                keys.update({f"{p}.{attn}.{proj}_projection.weight": (e, e), f"{p}.{attn}.{proj}_projection.bias": (e,)})
        keys.update({f"{p}.conv1.weight": (s["dec_ffn_dim"], e, 1), f"{p}.conv1.bias": (s["dec_ffn_dim"],),
                     f"{p}.conv2.weight": (e, s["dec_ffn_dim"], 1), f"{p}.conv2.bias": (e,)})
        for n in (1, 2, 3):
            keys.update({f"{p}.norm{n}.weight": (e,), f"{p}.norm{n}.bias": (e,)})
    keys.update({"decoder.norm.weight": (e,), "decoder.norm.bias": (e,), "decoder_cls_token": (1, q, e),
                 "decoder_position_encoding.pe.weight": (q, e), "decoder_position_encoding.position_ids": (1, q),
                 "classifier.weight": (c, e), "classifier.bias": (c,)})
    return keys


def released_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in released_keys().items():
        if k.endswith("position_ids"):
            sd[k] = torch.arange(shape[1]).expand(1, -1).clone()
        elif "norm" in k or "pre_head_ln" in k:  # LayerNorms near the identity, not exactly it
            sd[k] = (1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=generator)
        else:
            sd[k] = torch.randn(shape, generator=generator) / math.sqrt(shape[-1] if len(shape) > 1 else 4)
    return sd


def _attention_layer(sd, p, queries, keys, heads, causal):
    """``AttentionLayer(FullAttention(mask_flag=causal))`` of attn.py (eval: no dropout)."""
    b, l, _ = queries.shape
    q = F.linear(queries, sd[f"{p}.query_projection.weight"], sd[f"{p}.query_projection.bias"]).view(b, l, heads, -1)
    k = F.linear(keys, sd[f"{p}.key_projection.weight"], sd[f"{p}.key_projection.bias"]).view(b, keys.shape[1], heads, -1)
    v = F.linear(keys, sd[f"{p}.value_projection.weight"], sd[f"{p}.value_projection.bias"]).view(b, keys.shape[1], heads, -1)
    scores = torch.einsum("blhe,bshe->bhls", q, k)
    if causal:
        scores = scores.masked_fill(torch.triu(torch.ones(l, l, dtype=torch.bool), diagonal=1), float("-inf"))
    attn = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)
    out = torch.einsum("bhls,bshd->blhd", attn, v).reshape(b, l, -1)
    return F.linear(out, sd[f"{p}.out_projection.weight"], sd[f"{p}.out_projection.bias"])


def released_forward(sd, features):
    """``VisionTransformer_v3.forward`` in eval mode, rgb and flow already concatenated: (current, anticipation)."""
    e = SIZES["embed_dim"]
    ln = lambda x, p: F.layer_norm(x, (e,), sd[f"{p}.weight"], sd[f"{p}.bias"])  # noqa: E731
    x = F.linear(features, sd["linear_encoding.weight"], sd["linear_encoding.bias"])
    x = torch.cat((x, sd["cls_token"].expand(x.shape[0], -1, -1)), dim=1)
    x = x + sd["position_encoding.pe.weight"][sd["position_encoding.position_ids"][0, : x.shape[1]]]
    for i in range(SIZES["enc_layers"]):
        a, f = f"encoder.net.{2 * i}.fn", f"encoder.net.{2 * i + 1}.fn"
        h = ln(x, f"{a}.norm")  # SelfAttention: fused qkv (no bias), heads, scale head_dim ** -0.5, proj
        b, n, _ = h.shape
        qkv = F.linear(h, sd[f"{a}.fn.qkv.weight"]).reshape(b, n, 3, ENC_HEADS, e // ENC_HEADS).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (e // ENC_HEADS) ** -0.5, dim=-1)
        out = (attn @ qkv[2]).transpose(1, 2).reshape(b, n, e)
        x = x + F.linear(out, sd[f"{a}.fn.proj.weight"], sd[f"{a}.fn.proj.bias"])
        h = F.gelu(F.linear(ln(x, f"{f}.norm"), sd[f"{f}.fn.net.0.weight"], sd[f"{f}.fn.net.0.bias"]))
        x = x + F.linear(h, sd[f"{f}.fn.net.3.weight"], sd[f"{f}.fn.net.3.bias"])
    x = ln(x, "pre_head_ln")
    dec = sd["decoder_cls_token"].expand(x.shape[0], -1, -1)
    for l in range(SIZES["dec_layers"]):
        p = f"decoder.layers.{l}"
        dec = ln(dec + _attention_layer(sd, f"{p}.self_attention", dec, dec, DEC_HEADS, True), f"{p}.norm1")
        dec = ln(dec + _attention_layer(sd, f"{p}.cross_attention", dec, x, DEC_HEADS, False), f"{p}.norm2")
        y = F.gelu(F.conv1d(dec.transpose(-1, 1), sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"]))
        y = F.conv1d(y, sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"]).transpose(-1, 1)
        dec = ln(dec + y, f"{p}.norm3")
    dec = ln(dec, "decoder.norm")
    anticipation = F.linear(dec, sd["classifier.weight"], sd["classifier.bias"])
    current = F.linear(torch.cat((x[:, -1], dec.mean(dim=1)), dim=1), sd["mlp_head.weight"], sd["mlp_head.bias"])
    return current, anticipation


def _task(path, **kwargs):
    return ActionDetectionTask(**{**SIZES, "ambiguous_index": 4, "num_log_streams": 0, "pretrained_weights": str(path),
                                  **kwargs})


def test_official_oadtr_checkpoint_loads_every_key_and_computes_as_released(tmp_path):
    sd = released_state_dict()
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                "args": argparse.Namespace(num_layers=2, decoder_layers=2)}, tmp_path / "checkpoint0003.pth")
    converted = read_action_weights(str(tmp_path / "checkpoint0003.pth"))
    task = _task(tmp_path / "checkpoint0003.pth").eval()
    own = task.model.state_dict()
    # every tensor of ours from the file; the file's keys all used but the decoder positional embedding the released
    # forward never reads and the two position_ids index buffers (checked to be 0, 1, 2, ...)
    assert set(converted.state_dict) == set(own) and len(own) == len(sd) - 3
    for key, value in own.items():
        assert torch.equal(value, converted.state_dict[key]), key
    features = torch.randn(3, SIZES["window"], SIZES["feature_dim"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        current, anticipation = released_forward(sd, features)
        out = task.model(features)
    diffs = {"current": (out.current - current).abs().max().item(),
             "anticipation": (out.anticipation - anticipation).abs().max().item()}
    print("official OadTR: keys", len(sd), "mapped", len(converted.state_dict), "largest differences", diffs)
    assert max(diffs.values()) <= ATOL, diffs


def test_official_oadtr_paper_size_keys_and_mismatches(tmp_path):
    """The paper's model (3072-d TSN features, 22 classes): its released checkpoint has 179 tensors, all accounted
    for; the sizes it fixes are named when the task is built with others."""
    keys = released_keys(dict(feature_dim=3072, embed_dim=1024, window=64, num_future=8, enc_layers=3, dec_layers=5,
                              enc_mlp_dim=1024, dec_ffn_dim=1024, num_classes=22))
    sd = {k: torch.zeros(s, dtype=torch.long if k.endswith("position_ids") else torch.float32) for k, s in keys.items()}
    for k in sd:
        if k.endswith("position_ids"):
            sd[k] = torch.arange(sd[k].shape[1])[None]
    from lit_tasks.models.action.convert import convert_action_state_dict

    converted = convert_action_state_dict(sd)
    assert converted.options == dict(feature_dim=3072, window=64, num_future=8, embed_dim=1024, enc_layers=3,
                                     enc_mlp_dim=1024, dec_layers=5, dec_ffn_dim=1024)
    with torch.device("meta"):
        from lit_tasks.models.action.oadtr import OadTR

        ours = OadTR(in_dim=3072, num_classes=22).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in converted.state_dict.items()}
    print(f"official OadTR (paper size): {len(keys)} keys, {len(converted.state_dict)} mapped")
    small = released_state_dict()
    torch.save({"model": small}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="window=6 \\(given 8\\)"):
        _task(tmp_path / "ckpt.pth", window=8)
    torch.save({"model": {**small, "encoder.net.0.fn.fn.qkv.bias": torch.zeros(96)}}, tmp_path / "bias.pth")
    with pytest.raises(ValueError, match="does not use: encoder.0.attn.qkv.bias"):
        _task(tmp_path / "bias.pth")
