"""DETR weight conversion (lit_tasks/models/detection/detr_convert.py, tools/convert_detr.py) without transformers.

Hugging Face layouts are checked against the real DetrForObjectDetection in test_detr_hf_parity.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lit_tasks.models.detection.detr import build_detr
from lit_tasks.models.detection.detr_convert import (
    convert_detr_state_dict,
    detect_layout,
    infer_detr_config,
    load_detr_weights,
    read_checkpoint,
)

BACKBONE = "test_resnet.r160_in1k"
TINY = dict(backbone=BACKBONE, d_model=32, nheads=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
            num_queries=6)
ROOT = Path(__file__).resolve().parents[1]


def _model(num_classes: int = 3, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = build_detr(num_classes, **{**TINY, **kwargs})[0].eval()
    with torch.no_grad():  # non-trivial LayerNorms and frozen-BN statistics, so a misplaced one shows
        for name, tensor in model.state_dict().items():
            if re.search(r"norm\d?\.(weight|bias)$|decoder_norm|running_(mean|var)$", name):
                tensor.copy_(torch.rand_like(tensor) * 0.5 + (0.75 if "weight" in name or "var" in name else -0.25))
    return model


def to_facebookresearch(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> facebookresearch/detr's (models/detr.py, transformer.py, backbone.py), q/k/v stacked into
    ``nn.MultiheadAttention``'s ``in_proj_weight`` / ``in_proj_bias``: how a real checkpoint looks."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.", "backbone.0.body.", key)
        key = re.sub(r"^position_embedding\.", "backbone.1.", key)
        key = re.sub(r"^transformer\.encoder_layers\.", "transformer.encoder.layers.", key)
        key = re.sub(r"^transformer\.decoder_layers\.", "transformer.decoder.layers.", key)
        key = key.replace(".cross_attn.", ".multihead_attn.").replace("transformer.decoder_norm.", "transformer.decoder.norm.")
        out[key] = value
    for key in [k for k in out if re.search(r"\.q_proj\.(weight|bias)$", k)]:
        prefix, kind = re.match(r"(.*)\.q_proj\.(weight|bias)$", key).groups()
        parts = [out.pop(f"{prefix}.{p}_proj.{kind}") for p in "qkv"]
        out[f"{prefix}.in_proj_{kind}"] = torch.cat(parts)
    return out


def _same_outputs(a, b) -> None:
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    images[1, :, 40:] = 0
    with torch.no_grad():
        out_a, out_b = a(images, [(64, 96), (40, 96)]), b(images, [(64, 96), (40, 96)])
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=0, rtol=0)
    torch.testing.assert_close(out_a.boxes, out_b.boxes, atol=0, rtol=0)


@pytest.mark.parametrize("position_embedding", ["sine", "learned"])
def test_facebookresearch_layout_loads_into_an_equal_model(position_embedding) -> None:
    source = _model(position_embedding=position_embedding)
    reference_sd = to_facebookresearch(source.state_dict())
    assert "transformer.decoder.layers.1.multihead_attn.in_proj_weight" in reference_sd
    assert detect_layout(reference_sd) == "facebookresearch"
    target = _model(seed=1, position_embedding=position_embedding)
    load_detr_weights(target, reference_sd)
    _same_outputs(source, target)


def test_unmatched_keys_are_named_in_both_directions() -> None:
    reference_sd = to_facebookresearch(_model().state_dict())
    with pytest.raises(ValueError, match=r"1 key\(s\) match nothing.*transformer\.encoder\.norm\.weight"):
        convert_detr_state_dict({**reference_sd, "transformer.encoder.norm.weight": torch.ones(32)})  # pre-norm model
    incomplete = {k: v for k, v in reference_sd.items() if not k.startswith("bbox_embed.layers.2.")}
    with pytest.raises(ValueError, match=r"missing in the checkpoint: bbox_embed\.layers\.2\.weight, "
                                         r"bbox_embed\.layers\.2\.bias; not in the model: none"):
        load_detr_weights(_model(), incomplete)
    learned = to_facebookresearch(_model(position_embedding="learned").state_dict())
    with pytest.raises(ValueError, match=r"missing in the checkpoint: none; not in the model: "
                                         r"position_embedding\.row_embed\.weight"):
        load_detr_weights(_model(), learned)  # a learned-encoding checkpoint into a sine model
    with pytest.raises(ValueError, match="not a DETR state dict of a known layout"):
        convert_detr_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_other_shapes_are_named() -> None:
    reference_sd = to_facebookresearch(_model(num_queries=6).state_dict())
    with pytest.raises(ValueError, match=r"query_embed\.weight \(6, 32\) vs model \(9, 32\)"):
        load_detr_weights(_model(num_queries=9), reference_sd)


def test_class_head_for_another_number_of_classes() -> None:
    source = _model(num_classes=5)
    reference_sd = to_facebookresearch(source.state_dict())
    with pytest.raises(ValueError, match=r"class head has 6 logits \(5 classes \+ no-object\), the model 3: pass "
                                         r"class_rows .* or reinit_class_head=True"):
        load_detr_weights(_model(num_classes=2), reference_sd)

    picked = _model(num_classes=2, seed=2)
    load_detr_weights(picked, reference_sd, class_rows=[4, 1])
    weight = source.class_embed.weight.detach()
    torch.testing.assert_close(picked.class_embed.weight, weight[[4, 1, 5]])  # no-object row kept, last
    torch.testing.assert_close(picked.query_embed.weight, source.query_embed.weight)

    fresh = _model(num_classes=2, seed=3)
    initial_head = fresh.class_embed.weight.detach().clone()
    load_detr_weights(fresh, reference_sd, reinit_class_head=True)
    torch.testing.assert_close(fresh.class_embed.weight, initial_head)  # untouched
    torch.testing.assert_close(fresh.bbox_embed.layers[0].weight, source.bbox_embed.layers[0].weight)
    with pytest.raises(ValueError, match=r"class_rows \[7\] outside the checkpoint's 5 classes"):
        load_detr_weights(_model(num_classes=2), reference_sd, class_rows=[0, 7])


def test_trainable_batch_norm_keeps_its_counters() -> None:
    reference_sd = to_facebookresearch(_model().state_dict())  # frozen BN: no num_batches_tracked
    model = _model(frozen_bn=False, frozen_stages=-1)
    load_detr_weights(model, reference_sd)
    torch.testing.assert_close(model.backbone.layer1[0].bn1.running_var, reference_sd["backbone.0.body.layer1.0.bn1.running_var"])


def test_read_checkpoint_formats(tmp_path: Path) -> None:
    reference_sd = to_facebookresearch(_model().state_dict())
    pth = tmp_path / "detr.pth"
    torch.save({"model": reference_sd, "args": argparse.Namespace(lr=1e-4, backbone="resnet50"), "epoch": 499}, pth)
    assert set(read_checkpoint(pth)) == set(reference_sd)  # facebookresearch checkpoints carry an argparse.Namespace
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference_sd.items()}, str(st))
    torch.testing.assert_close(read_checkpoint(st)["query_embed.weight"], reference_sd["query_embed.weight"])
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        read_checkpoint(tmp_path / "missing.pth")
    torch.save({"model": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth: expected a state dict"):
        read_checkpoint(tmp_path / "odd.pth")


def test_infer_config() -> None:
    reference_sd = to_facebookresearch(_model(num_classes=4, position_embedding="learned").state_dict())
    assert infer_detr_config(reference_sd) == dict(d_model=32, num_queries=6, num_encoder_layers=2, num_decoder_layers=2,
                                                   dim_feedforward=64, num_classes=4, position_embedding="learned")


def _tool():
    spec = importlib.util.spec_from_file_location("convert_detr_tool", ROOT / "tools" / "convert_detr.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_convert_tool_round_trip(tmp_path: Path) -> None:
    tool = _tool()
    source = _model(num_classes=3)
    src = tmp_path / "detr-tiny.pth"
    torch.save({"model": to_facebookresearch(source.state_dict())}, src)
    out = tool.main([str(src), str(tmp_path / "ours.pt"), "--backbone", BACKBONE, "--nheads", "4"])
    saved = torch.load(out, weights_only=True)
    assert saved["build_detr"]["num_classes"] == 3 and saved["build_detr"]["num_queries"] == 6
    rebuilt = build_detr(**saved["build_detr"])[0].eval()
    rebuilt.load_state_dict(saved["state_dict"])
    _same_outputs(source, rebuilt)
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        tool.main([str(src), str(out), "--backbone", BACKBONE, "--nheads", "4"])
    with pytest.raises(SystemExit, match="backbone not recognised"):
        tool.main([str(src), str(tmp_path / "other.pt")])
    tool.main([str(src), str(tmp_path / "two.pt"), "--backbone", BACKBONE, "--nheads", "4", "--class_rows", "2,0"])
    assert torch.load(tmp_path / "two.pt", weights_only=True)["build_detr"]["num_classes"] == 2


def test_guess_backbone_for_resnet50() -> None:
    tool = _tool()
    keys = {f"backbone.layer{s}.{b}.conv3.weight": torch.zeros(1)
            for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)}
    assert tool.guess_backbone(keys) == "resnet50"
    assert tool.guess_backbone({k.replace("conv3", "conv2"): v for k, v in keys.items()}) is None


def test_convert_weights_tool_forwards_detr_files(tmp_path: Path) -> None:
    """tools/convert_weights.py detection: a DETR file goes through tools/convert_detr.py (same output)."""
    spec = importlib.util.spec_from_file_location("convert_weights_tool", ROOT / "tools" / "convert_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    source = _model(num_classes=3)
    torch.save({"model": to_facebookresearch(source.state_dict())}, tmp_path / "detr-tiny.pth")
    out = tool.main(["detection", str(tmp_path / "detr-tiny.pth"), str(tmp_path / "ours.pt"), "--backbone", BACKBONE,
                     "--nheads", "4", "--class_rows", "2,0"])
    saved = torch.load(out, weights_only=True)
    assert saved["build_detr"]["num_classes"] == 2 and saved["build_detr"]["nheads"] == 4
    expected = source.state_dict()["class_embed.weight"][[2, 0, 3]]
    torch.testing.assert_close(saved["state_dict"]["class_embed.weight"], expected, rtol=0, atol=0)
