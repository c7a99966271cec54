"""Parity with Hugging Face transformers' DetrForObjectDetection: random init, offline, converted weights.

HF's model is built from a config (no hub: ``HF_HUB_OFFLINE=1``, no pretrained backbone), its LayerNorms and
frozen-BN statistics randomised so that a misplaced norm cannot hide behind identity parameters, its weights
converted into ours. HF runs with ``auxiliary_loss=False``: with True, transformers (checked on 5.24) feeds the
decoder's final-LayerNorm output into the next decoder layer, which the reference does not do.
"""

from __future__ import annotations

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_loss = pytest.importorskip("transformers.loss.loss_for_object_detection")

from lit_tasks.losses.set_criterion import SetCriterion  # noqa: E402
from lit_tasks.models.backbone import Normalize, build_backbone  # noqa: E402
from lit_tasks.models.detection.detr import DETROutput, build_detr  # noqa: E402
from lit_tasks.models.detection.detr_convert import load_detr_weights  # noqa: E402
from lit_tasks.ops.box_ops import box_xyxy_to_cxcywh  # noqa: E402

NUM_CLASSES = 3
SIZES = [(96, 128), (70, 90)]  # the second image is padded bottom and right
SMALL = dict(num_labels=NUM_CLASSES, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=8)
OURS = dict(d_model=32, nheads=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64, num_queries=8)
# Everything below is fp32 with the same operations in the same order; 1e-4 (the bound) leaves room for
# kernels that sum in another order.
ATOL = 1e-4


def _randomise(model: torch.nn.Module, seed: int = 5) -> None:
    """Scrambles HF's initialisation so that every part of the computation shows in the outputs.

    HF initialises linear layers and embeddings with std 0.02: attention is then almost uniform and the decoder
    output nearly the same for every query, so positional encodings or key/query mix-ups would go unseen.
    Here matrices get std 1/sqrt(fan_in), biases std 0.1, query embeddings std 1, LayerNorms and frozen-BN
    statistics random values (the backbone's convolutions keep timm's / HF's initialisation).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("FrozenBatchNorm2d"):
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.2)
                if hasattr(module, "running_var"):
                    module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not name.startswith("model.backbone"):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in**0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g))


def _pair(position_embedding: str = "sine", dilation: bool = False, **ours_kwargs):
    torch.manual_seed(0)
    config = transformers.DetrConfig(use_timm_backbone=True, backbone="test_resnet.r160_in1k",
                                     use_pretrained_backbone=False, position_embedding_type=position_embedding,
                                     dilation=dilation, **SMALL)
    hf = transformers.DetrForObjectDetection(config).eval()
    _randomise(hf)
    ours = build_detr(NUM_CLASSES, backbone="test_resnet.r160_in1k", position_embedding=position_embedding,
                      dilation=dilation, **OURS, **ours_kwargs)[0].eval()
    load_detr_weights(ours, hf.state_dict())
    return hf, ours


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(2, 3, *SIZES[0])
    pixel_mask = torch.zeros(2, *SIZES[0], dtype=torch.long)
    for i, (h, w) in enumerate(SIZES):
        images[i, :, :h, :w] = torch.rand(3, h, w, generator=g)
        pixel_mask[i, :h, :w] = 1
    # What HF's image processor hands the model: normalised images, zero-padded afterwards.
    pixel_values = Normalize()(images) * pixel_mask[:, None]
    return images, pixel_values, pixel_mask


def _targets(counts):
    g = torch.Generator().manual_seed(2)
    ours, theirs = [], []
    for n, (h, w) in zip(counts, SIZES):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 2
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        ours.append({"boxes": boxes, "labels": labels})
        theirs.append({"class_labels": labels, "boxes": box_xyxy_to_cxcywh(boxes) / torch.tensor([w, h, w, h])})
    return ours, theirs


class _Zeros(torch.nn.Module):
    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape[0], OURS["d_model"], *mask.shape[1:])


@pytest.mark.parametrize("position_embedding,dilation", [("sine", False), ("learned", False), ("sine", True)])
def test_logits_and_boxes_match_hf_on_a_padded_batch(position_embedding, dilation) -> None:
    hf, ours = _pair(position_embedding, dilation, backbone_on_padded_batch=True)
    images, pixel_values, pixel_mask = _batch()
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, output_hidden_states=True)
        out = ours(images, SIZES)
    torch.testing.assert_close(out.pred_logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, expected.pred_boxes, atol=ATOL, rtol=0)
    # The comparison can see mistakes (differences 100x its tolerance): queries differ, and the positional
    # encoding changes the outputs.
    assert (out.pred_logits[:, 1:] - out.pred_logits[:, :1]).abs().max() > 100 * ATOL
    with torch.no_grad():
        pos_embedding = ours.position_embedding
        ours.position_embedding = _Zeros()
        without_pos = ours(images, SIZES)
        ours.position_embedding = pos_embedding
    assert (without_pos.pred_logits - out.pred_logits).abs().max() > 100 * ATOL
    # The intermediate decoder layers (auxiliary outputs): the final LayerNorm applied to each layer's raw output.
    # (HF's decoder_hidden_states: the decoder input, the raw outputs of layers 0 .. L-2, then its last_hidden_state.)
    hidden = expected.decoder_hidden_states[1:-1]
    assert len(hidden) == out.logits.shape[0] - 1 == 2
    with torch.no_grad():
        for layer, h in enumerate(hidden):
            normed = hf.model.decoder.layernorm(h)
            torch.testing.assert_close(out.logits[layer], hf.class_labels_classifier(normed), atol=ATOL, rtol=0)
            torch.testing.assert_close(out.boxes[layer], hf.bbox_predictor(normed).sigmoid(), atol=ATOL, rtol=0)


def test_default_mode_equals_hf_on_each_image_alone() -> None:
    """Per-image backbone (our default): the padded image gets what HF gives it without any padding."""
    hf, ours = _pair()
    images, pixel_values, pixel_mask = _batch()
    h, w = SIZES[1]
    with torch.no_grad():
        out = ours(images, SIZES)
        full = hf(pixel_values=pixel_values[:1], pixel_mask=pixel_mask[:1])
        alone = hf(pixel_values=pixel_values[1:, :, :h, :w], pixel_mask=pixel_mask[1:, :h, :w])
    torch.testing.assert_close(out.pred_logits[0], full.logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pred_logits[1], alone.logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes[1], alone.pred_boxes[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("counts", [(3, 2), (4, 0)])
def test_loss_and_matching_match_hf(counts) -> None:
    hf, ours = _pair(backbone_on_padded_batch=True)
    images, pixel_values, pixel_mask = _batch()
    our_targets, hf_labels = _targets(counts)
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=hf_labels)
        out = ours(images, SIZES)
    last = DETROutput(out.logits[-1:], out.boxes[-1:], out.image_sizes)
    losses = SetCriterion(num_classes=NUM_CLASSES).eval()(last, our_targets)
    theirs = expected.loss_dict
    assert losses["loss_ce"].item() == pytest.approx(theirs["loss_ce"].item(), abs=ATOL)
    assert losses["loss_bbox"].item() == pytest.approx(5 * theirs["loss_bbox"].item(), abs=ATOL)
    assert losses["loss_giou"].item() == pytest.approx(2 * theirs["loss_giou"].item(), abs=ATOL)
    assert losses["cardinality_error"].item() == pytest.approx(theirs["cardinality_error"].item())
    total = sum(v for k, v in losses.items() if k.startswith("loss_"))
    assert total.item() == pytest.approx(expected.loss.item(), abs=ATOL)


def test_auxiliary_losses_match_hf_criterion() -> None:
    """HF's own criterion (ImageLoss + HungarianMatcher, 1/5/2) on our outputs of every decoder layer."""
    _, ours = _pair()
    images, _, _ = _batch()
    our_targets, hf_labels = _targets((3, 2))
    with torch.no_grad():
        out = ours(images, SIZES)
    matcher = hf_loss.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    criterion = hf_loss.ImageLoss(matcher, NUM_CLASSES, eos_coef=0.1, losses=["labels", "boxes", "cardinality"])
    aux = [{"logits": lg, "pred_boxes": bx} for lg, bx in zip(out.logits[:-1], out.boxes[:-1])]
    theirs = criterion({"logits": out.pred_logits, "pred_boxes": out.pred_boxes, "auxiliary_outputs": aux}, hf_labels)
    losses = SetCriterion(num_classes=NUM_CLASSES)(out, our_targets)
    weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    for suffix in ("_0", "_1", ""):
        for name, weight in weights.items():
            assert losses[name + suffix].item() == pytest.approx(weight * theirs[name + suffix].item(), abs=ATOL)


def test_hf_resnet_backbone_and_transformers_4_names() -> None:
    """``use_timm_backbone=False`` (HF's ResNet, the hub's "no_timm" revision) maps onto timm's ResNet; the
    transformers 4.x key names (``conv_encoder``, ``out_proj``, ``fc1``) load too."""
    torch.manual_seed(0)
    resnet = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1],
                                       layer_type="basic", out_features=["stage4"])
    hf = transformers.DetrForObjectDetection(transformers.DetrConfig(backbone_config=resnet, **SMALL)).eval()
    _randomise(hf)
    ours = build_detr(NUM_CLASSES, backbone="resnet18", backbone_on_padded_batch=True, **OURS)[0]
    ours.backbone = build_backbone("resnet18", out_indices=(-1,), frozen_stages=1, frozen_bn=True, layers=(1, 1, 1, 1))
    ours.eval()
    v4_names = {re.sub(r"\.mlp\.fc(\d)\.", r".fc\1.", k.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
                       .replace(".o_proj.", ".out_proj.")): v for k, v in hf.state_dict().items()}
    assert any(".out_proj." in k for k in v4_names) and any("conv_encoder.model.embedder" in k for k in v4_names)
    load_detr_weights(ours, v4_names)
    images, pixel_values, pixel_mask = _batch()
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
        out = ours(images, SIZES)
    torch.testing.assert_close(out.pred_logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, expected.pred_boxes, atol=ATOL, rtol=0)
