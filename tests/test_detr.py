"""DETR network, post-processing and a tiny training run (lit_tasks/models/detection/detr.py and its parts)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_tasks.models.detection.detr import DETR, DETROutput, build_detr, check_image_sizes
from lit_tasks.models.detection.detr_convert import _split_in_proj
from lit_tasks.models.detection.detr_transformer import MultiheadAttention, Transformer
from lit_tasks.models.detection.position_encoding import LearnedPositionEmbedding, sine_position_embedding

BACKBONE = "test_resnet.r160_in1k"  # timm's smallest ResNet: C5 has 96 channels, stride 32
TINY = dict(backbone=BACKBONE, d_model=32, nheads=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
            num_queries=8)


def _tiny_detr(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_detr(3, **{**TINY, **kwargs})


def _padded_batch(sizes, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.rand(3, h, w, generator=g)
    return images


def test_output_shapes_and_box_range() -> None:
    model, _, _ = _tiny_detr()
    out = model.eval()(_padded_batch([(64, 96), (50, 70)]), [(64, 96), (50, 70)])
    assert out.logits.shape == (3, 2, 8, 4) and out.boxes.shape == (3, 2, 8, 4)  # (L, B, Q, C + 1)
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    assert out.image_sizes.tolist() == [[64, 96], [50, 70]]
    no_aux, _, _ = _tiny_detr(aux_loss=False)
    assert no_aux.eval()(_padded_batch([(64, 64)])).logits.shape == (1, 1, 8, 4)


def test_reference_freezing_and_dc5() -> None:
    model, _, _ = _tiny_detr()
    frozen = {n.split(".")[0] for n, p in model.backbone.named_parameters() if not p.requires_grad}
    trained = {n.split(".")[0] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}  # stem + layer1 frozen
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())  # frozen BN everywhere
    dc5, _, _ = _tiny_detr(dilation=True)
    assert dc5.backbone(torch.rand(1, 3, 64, 96))[-1].shape[-2:] == (4, 6)  # output stride 16, not 32


@pytest.mark.parametrize("position_embedding", ["sine", "learned"])
@pytest.mark.parametrize("size", [(70, 90), (64, 96), (33, 120)])
def test_an_image_gets_the_same_detections_alone_and_batched(position_embedding, size) -> None:
    """Padded next to a larger image (before or after it) vs alone at its own size: equal to 1e-4."""
    model, _, postprocess = _tiny_detr(position_embedding=position_embedding)
    model.eval()
    large = (96, 128)
    batch = _padded_batch([large, size, large], seed=1)  # two batch-mates of one size share a backbone call
    with torch.no_grad():
        batched = model(batch, [large, size, large])
        alone = model(batch[1:2, :, : size[0], : size[1]].clone(), [size])
        reordered = model(batch[[1, 0]], [size, large])
    for other, index in ((alone, 0), (reordered, 0)):
        torch.testing.assert_close(batched.logits[:, 1], other.logits[:, index], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched.boxes[:, 1], other.boxes[:, index], atol=1e-4, rtol=0)
    dets_batched = postprocess(batched, [large, size, large])[1]
    dets_alone = postprocess(alone, [size])[0]
    torch.testing.assert_close(dets_batched["boxes"], dets_alone["boxes"], atol=1e-3, rtol=0)  # pixels: 1e-4 * 128
    torch.testing.assert_close(dets_batched["scores"], dets_alone["scores"], atol=1e-4, rtol=0)


def test_the_reference_way_depends_on_batch_mates() -> None:
    """Why the default exists: one backbone call on the padded batch changes the smaller image's predictions."""
    model, _, _ = _tiny_detr(backbone_on_padded_batch=True)
    model.eval()
    size, large = (70, 90), (96, 128)
    batch = _padded_batch([large, size], seed=1)
    with torch.no_grad():
        batched = model(batch, [large, size])
        alone = model(batch[1:2, :, :70, :90].clone(), [size])
    assert (batched.logits[:, 1] - alone.logits[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(batched.logits[:, 0], model(batch[:1], [large]).logits[:, 0], atol=1e-4, rtol=0)


def test_sine_encoding_is_normalised_over_the_valid_area() -> None:
    h, w = 5, 7
    padded_mask = torch.ones(1, 9, 11, dtype=torch.bool)
    padded_mask[0, :h, :w] = False
    padded = sine_position_embedding(padded_mask, num_feats=16)[..., :h, :w]
    alone = sine_position_embedding(torch.zeros(1, h, w, dtype=torch.bool), num_feats=16)
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=0)
    # Hand value: y half first; channel 0 = sin(2*pi * row_count / h), channel 1 = cos(same), x half from 16.
    row, col = 2, 4
    y = (row + 1) / (h + 1e-6) * 2 * math.pi
    x = (col + 1) / (w + 1e-6) * 2 * math.pi
    assert alone[0, 0, row, col].item() == pytest.approx(math.sin(y), abs=1e-6)
    assert alone[0, 1, row, col].item() == pytest.approx(math.cos(y), abs=1e-6)
    assert alone[0, 2, row, col].item() == pytest.approx(math.sin(y / 10000 ** (2 / 16)), abs=1e-6)
    assert alone[0, 16, row, col].item() == pytest.approx(math.sin(x), abs=1e-6)


def test_learned_encoding_layout_and_size_limit() -> None:
    torch.manual_seed(0)
    pe = LearnedPositionEmbedding(num_feats=4, max_size=6)
    pos = pe(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert pos.shape == (2, 8, 3, 5)
    torch.testing.assert_close(pos[1, :4, 2, 3], pe.col_embed.weight[3])  # x (column) half first
    torch.testing.assert_close(pos[1, 4:, 2, 3], pe.row_embed.weight[2])
    with pytest.raises(ValueError, match="holds 6 rows / columns, the feature map is 3 x 7"):
        pe(torch.zeros(1, 3, 7, dtype=torch.bool))


def test_attention_equals_torch_multihead_attention_with_padding() -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ours = MultiheadAttention(16, 4).eval()
    state = {}
    for key, value in reference.state_dict().items():
        state.update(_split_in_proj(key, value))
    ours.load_state_dict(state)
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        expected = reference(q, k, v, key_padding_mask=padding, need_weights=False)[0]
        torch.testing.assert_close(ours(q, k, v, padding), expected, atol=1e-5, rtol=1e-5)
        assert (ours(q, k, v, None) - expected).abs().max() > 1e-3  # the mask mattered


def _assert_xavier_uniform(weight: torch.Tensor, fan_out: int, fan_in: int, what: str) -> None:
    """``weight`` looks drawn from xavier_uniform_ over a (fan_out, fan_in) matrix: U(-a, a), a = sqrt(6 / (in + out)).

    The sample std of n uniform draws has relative standard error sqrt((kurtosis - 1) / (4 n)) = sqrt(0.2 / n)
    (kurtosis 9/5); 6 of those is the tolerance (0.8 % for a 256 x 256 matrix).
    """
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    values = weight.detach().double().flatten()
    std, expected = float(values.std()), bound / math.sqrt(3.0)
    assert float(values.abs().max()) <= bound, f"{what}: max |w| {float(values.abs().max()):.4f} > bound {bound:.4f}"
    assert abs(std / expected - 1) < 6 * math.sqrt(0.2 / values.numel()), f"{what}: std {std:.4f}, expected {expected:.4f}"
    assert abs(float(values.mean())) < 6 * expected / math.sqrt(values.numel()), f"{what}: mean {float(values.mean())}"


def test_transformer_initialisation_is_the_references() -> None:
    """detr models/transformer.py ``Transformer._reset_parameters``: xavier_uniform_ on every parameter of the
    transformer with dim > 1, where nn.MultiheadAttention holds q/k/v as one (3d, d) ``in_proj_weight``: each of
    our q/k/v (d, d) matrices is a third of one Xavier draw over (3d, d) (std sqrt(2 / 4d) = 0.0442 at d = 256, not
    Xavier over (d, d), 0.0625); out_proj and the FFN matrices Xavier over their own shape; attention biases 0
    (nn.MultiheadAttention's own init), FFN biases torch's Linear default, LayerNorms 1 and 0."""
    d, ffn = 256, 512
    torch.manual_seed(0)
    transformer = Transformer(d_model=d, num_heads=8, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=ffn)
    layers = [*transformer.encoder_layers, *transformer.decoder_layers]
    attentions = {f"{kind}.{name}": module for kind, layer in zip(("encoder", "decoder"), layers)
                  for name, module in layer.named_children() if isinstance(module, MultiheadAttention)}
    assert len(attentions) == 3
    for name, attention in attentions.items():
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        _assert_xavier_uniform(torch.cat([p.weight for p in projections]), 3 * d, d, f"{name} stacked in_proj")
        for part, proj in zip("qkv", projections):
            _assert_xavier_uniform(proj.weight, 3 * d, d, f"{name} {part}_proj (a third of the (3d, d) draw)")
            assert not proj.bias.any()
        _assert_xavier_uniform(attention.out_proj.weight, d, d, f"{name} out_proj")
        assert not attention.out_proj.bias.any()
    for layer in layers:
        _assert_xavier_uniform(layer.linear1.weight, ffn, d, "linear1")
        _assert_xavier_uniform(layer.linear2.weight, d, ffn, "linear2")
        assert float(layer.linear1.bias.abs().max()) <= 1 / math.sqrt(d)  # nn.Linear's default, as the reference
        assert float(layer.linear2.bias.abs().max()) <= 1 / math.sqrt(ffn) and layer.linear2.bias.any()
    norms = [m for m in transformer.modules() if isinstance(m, nn.LayerNorm)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)


def test_postprocess_by_hand() -> None:
    logits = torch.full((1, 1, 3, 4), -10.0)
    logits[0, 0, 0, 1] = 2.0  # query 0: class 1
    logits[0, 0, 1, 3] = 5.0  # query 1: mostly no-object; its best real class still reported
    logits[0, 0, 1, 2] = 1.0
    logits[0, 0, 2, 0] = 4.0  # query 2: class 0, highest real-class score
    boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]]])
    outputs = DETROutput(logits, boxes, torch.tensor([[50, 100]]))
    det = build_detr(3, **TINY)[2](outputs, [(50, 100)])[0]
    prob = logits[0, 0].softmax(-1)
    assert det["labels"].tolist() == [0, 1, 2]  # sorted by score: query 2, query 0, query 1
    torch.testing.assert_close(det["scores"], torch.stack([prob[2, 0], prob[0, 1], prob[1, 2]]))
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 25.0, 50.0, 50.0], [40.0, 15.0, 60.0, 35.0],
                                                           [5.0, 2.5, 15.0, 7.5]]))


def test_build_detr_injects_its_parts() -> None:
    """As the reference's build(): the options make the backbone, transformer, encoding and matcher, injected."""
    model, criterion, _ = _tiny_detr(aux_loss=False, cost_giou=3.0, num_decoder_layers=2)
    assert model.transformer.d_model == 32 and len(model.transformer.decoder_layers) == 2
    assert not model.transformer.return_intermediate and not model.aux_loss
    assert model.input_proj.in_channels == model.backbone.feature_info.channels()[-1]
    assert (criterion.matcher.cost_class, criterion.matcher.cost_bbox, criterion.matcher.cost_giou) == (1.0, 5.0, 3.0)
    parts = dict(backbone=model.backbone, transformer=model.transformer, position_embedding=model.position_embedding)
    with pytest.raises(ValueError, match="return_intermediate"):
        DETR(**parts, num_classes=3, num_queries=8, aux_loss=True)
    with pytest.raises(TypeError):
        DETR(*parts.values(), 3)  # keyword-only


def test_bad_image_sizes_are_errors() -> None:
    images = torch.zeros(2, 3, 32, 48)
    assert check_image_sizes(images, None) == [(32, 48), (32, 48)]
    assert check_image_sizes(images, torch.tensor([[32, 48], [20, 10]])) == [(32, 48), (20, 10)]
    with pytest.raises(ValueError, match="2 images but 1 image_sizes"):
        check_image_sizes(images, [(32, 48)])
    with pytest.raises(ValueError, match=r"image_sizes\[1\] = \(40, 10\) is not within the padded batch \(32, 48\)"):
        check_image_sizes(images, [(32, 48), (40, 10)])


def test_a_few_steps_decrease_the_loss_under_bf16_autocast() -> None:
    """Two synthetic images, one without boxes: the set loss falls and stays finite in bf16 mixed precision."""
    model, criterion, postprocess = _tiny_detr(seed=0, dropout=0.0)
    model.train()
    criterion.train()
    sizes = [(64, 80), (48, 64)]
    images = _padded_batch(sizes, seed=2)
    images[0, :, 10:30, 20:50] = 1.0  # a bright box on image 0
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 50.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    totals = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = criterion(model(images, sizes), targets)
        total = sum(v for k, v in losses.items() if k.startswith("loss_"))
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)  # the reference's max-norm
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.8 * totals[0], totals
    with torch.no_grad():
        detections = postprocess(model.eval()(images, sizes), sizes)
    assert all(torch.isfinite(d["boxes"]).all() for d in detections)
