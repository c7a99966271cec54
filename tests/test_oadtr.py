"""OadTR model (lit_tasks.models.action.oadtr): shapes, size, causal decoder, streaming == offline windows, bf16."""

from __future__ import annotations

import pytest
import torch

from lit_tasks.models.action.oadtr import OadTR, StreamingOadTR, class_probabilities

TINY = dict(in_dim=12, num_classes=6, window=8, embed_dim=32, enc_layers=2, enc_heads=4, enc_mlp_dim=48,
            dec_layers=2, dec_heads=2, dec_ffn_dim=40, num_queries=4)


def tiny_model(seed: int = 0, **kw) -> OadTR:
    torch.manual_seed(seed)
    model = OadTR(**{**TINY, **kw})
    with torch.no_grad():  # the released zero inits make all queries equal: give them distinct values
        model.queries.normal_()
        model.task_token.normal_()
    return model.eval()


def offline_windows(stream: torch.Tensor, window: int, pad: str) -> torch.Tensor:
    """``(L, D)`` stream -> ``(L, T, D)``: the window ending at every frame, start padded as ``pad`` says."""
    idx = torch.arange(stream.shape[0])[:, None] + torch.arange(-window + 1, 1)[None]
    windows = stream[idx.clamp(min=0)]
    if pad == "zeros":
        windows[idx < 0] = 0.0
    return windows


def test_shapes_and_paper_size() -> None:
    model = tiny_model()
    out = model(torch.randn(3, 8, 12))
    assert out.current.shape == (3, 6) and out.anticipation.shape == (3, 4, 6)
    assert out.current.dtype == torch.float32
    with torch.device("meta"):
        paper = OadTR(in_dim=3072, num_classes=22)
    # The released log's 74,709,036 less its unused decoder positional embedding (8 x 1024).
    assert sum(p.numel() for p in paper.parameters()) == 74_709_036 - 8 * 1024
    assert len(paper.encoder) == 3 and len(paper.decoder) == 5 and paper.queries.shape == (1, 8, 1024)
    assert paper.encoder[0].attn.heads == 8 and paper.decoder[0].self_attn.heads == 4
    assert paper.pos_embed.weight.shape == (65, 1024)


def test_task_token_is_appended_after_the_window() -> None:
    model = tiny_model()
    x = torch.randn(2, 8, 12)
    seen = {}
    model.encoder[0].register_forward_hook(lambda m, args, out: seen.setdefault("enc_in", args[0]))
    model.encoder_norm.register_forward_hook(lambda m, args, out: seen.setdefault("memory", out))
    model.current_head.register_forward_hook(lambda m, args, out: seen.setdefault("head_in", args[0]))
    with torch.no_grad():
        model(x)
        pos = model.pos_embed.weight
        tokens = model.input_proj(x) + pos[:8]
        task = model.task_token[0, 0] + pos[8]
    assert seen["enc_in"].shape == (2, 9, 32)
    torch.testing.assert_close(seen["enc_in"][:, :8], tokens)
    torch.testing.assert_close(seen["enc_in"][:, 8], task.expand(2, -1))
    # The current-frame head reads [encoder output at the task token, mean of the decoder outputs].
    torch.testing.assert_close(seen["head_in"][:, :32], seen["memory"][:, -1])


def test_decoder_is_causal_through_the_model() -> None:
    model = tiny_model(seed=1)
    x = torch.randn(2, 8, 12)
    base = model(x).anticipation
    for j in range(3):
        with torch.no_grad():
            saved = model.queries.clone()
            model.queries[:, j + 1 :] += torch.randn_like(model.queries[:, j + 1 :]) * 3.0
            changed = model(x).anticipation
            model.queries.copy_(saved)
        # Outputs of queries <= j do not move; those of the changed queries do (the check is not vacuous).
        torch.testing.assert_close(changed[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-6)
        assert (changed[:, j + 1 :] - base[:, j + 1 :]).abs().amax() > 1e-3
    with torch.no_grad():  # changing query 0 changes every later output (it is attended to)
        model.queries[:, 0] += 3.0
        assert (model(x).anticipation - base).abs().amax(dim=(0, 2)).min() > 1e-4


@pytest.mark.parametrize("pad", ["replicate", "zeros"])
def test_streaming_equals_offline_windows(pad: str) -> None:
    model = tiny_model(seed=2)
    streams = torch.randn(2, 3 * 8 + 5, 12)  # two streams, longer than the window
    detector = model.streaming(pad=pad, ambiguous_index=5)
    online = [detector.step(streams[:, t]) for t in range(streams.shape[1])]
    assert detector.frames_seen == streams.shape[1]
    for b in range(2):
        with torch.no_grad():
            out = model(offline_windows(streams[b], 8, pad))
        current = class_probabilities(out.current, 5)
        anticipation = class_probabilities(out.anticipation, 5)
        for t, o in enumerate(online):
            torch.testing.assert_close(o.current[b], current[t], rtol=0, atol=1e-5)
            torch.testing.assert_close(o.anticipation[b], anticipation[t], rtol=0, atol=1e-5)

    # Unbatched steps, after a reset, give the same as batched ones.
    detector.reset()
    single = [detector.step(streams[1, t]) for t in range(streams.shape[1])]
    assert single[0].current.shape == (6,) and single[0].anticipation.shape == (4, 6)
    for t in range(streams.shape[1]):
        torch.testing.assert_close(single[t].current, online[t].current[1], rtol=0, atol=1e-6)
    assert (single[0].current[5] == 0).all() and abs(float(single[0].current.sum()) - 1) < 1e-6


def test_padding_rules_differ_on_early_frames_only() -> None:
    model = tiny_model(seed=3)
    stream = torch.randn(12, 12)
    rep, zer = StreamingOadTR(model, pad="replicate"), StreamingOadTR(model, pad="zeros")
    a = torch.stack([rep.step(f).current for f in stream])
    b = torch.stack([zer.step(f).current for f in stream])
    assert (a[:7] - b[:7]).abs().amax() > 1e-4  # frames 0..6 have padded windows
    torch.testing.assert_close(a[7:], b[7:], rtol=0, atol=1e-6)  # full windows: identical


def test_streaming_errors() -> None:
    model = tiny_model()
    detector = model.streaming()
    with pytest.raises(ValueError, match=r"expected a feature vector \(12,\)"):
        detector.step(torch.randn(11))
    detector.step(torch.randn(2, 12))
    with pytest.raises(ValueError, match="call reset"):
        detector.step(torch.randn(3, 12))
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        detector.step(torch.randn(2, 12))
    with pytest.raises(ValueError, match="pad must be"):
        model.streaming(pad="edge")
    with pytest.raises(ValueError, match=r"expected features \(B, 8, 12\)"):
        model(torch.randn(1, 7, 12))


def test_dropout_in_training_only() -> None:
    model = tiny_model()
    x = torch.randn(2, 8, 12)
    torch.testing.assert_close(model(x).current, model(x).current, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    a = model(x).current
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x).current)


def test_bf16_autocast_is_finite_with_gradients() -> None:
    model = tiny_model().train()
    x = torch.randn(4, 8, 12) * 50.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = class_probabilities(out.current, 5).clamp_min(1e-6).log().mean() + out.anticipation.float().mean()
    loss.backward()
    assert torch.isfinite(out.current).all() and torch.isfinite(out.anticipation).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_class_probabilities_drop_the_ambiguous_column() -> None:
    logits = torch.randn(5, 6) * 10
    p = class_probabilities(logits, ambiguous_index=5)
    torch.testing.assert_close(p[:, :5], logits[:, :5].softmax(-1))
    assert (p[:, 5] == 0).all()
    p = class_probabilities(logits.to(torch.bfloat16), ambiguous_index=2)
    assert p.dtype == torch.float32 and (p[:, 2] == 0).all()
    torch.testing.assert_close(class_probabilities(logits), logits.softmax(-1))


@pytest.mark.parametrize("pad", ["replicate", "zeros"])
def test_streaming_equals_the_window_dataset(pad: str) -> None:
    """The DataModule's windows (datamodules.features.samples) and the streaming detector share one padding rule."""
    from datamodules.features.samples import FeatureWindowDataset
    from datamodules.synthetic.streams import make_feature_streams

    data = make_feature_streams(num_sessions=2, num_actions=4, feature_dim=12, min_frames=20, max_frames=30, seed=3)
    model = tiny_model(seed=4)
    ds = FeatureWindowDataset(data, window=8, num_future=4, pad=pad)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        offline = class_probabilities(model(batch["features"]).current, data.ambiguous_index)
    for k, s in enumerate(data.sessions):
        detector = model.streaming(pad=pad, ambiguous_index=data.ambiguous_index)
        online = torch.stack([detector.step(torch.from_numpy(f)).current for f in s.features])
        rows = batch["session"] == k
        assert batch["frame"][rows].tolist() == list(range(s.num_frames))
        torch.testing.assert_close(online, offline[rows], rtol=0, atol=1e-5)


def test_folded_cross_attention_equals_the_unfolded_one() -> None:
    """Keys / values folded into the queries: the same attention, in eval and with attention dropout."""
    import torch.nn.functional as F

    from lit_tasks.models.action.oadtr import DecoderAttention

    torch.manual_seed(0)
    attn = DecoderAttention(32, 4, attn_dropout=0.5)
    with torch.no_grad():  # biases matter here: the k bias drops out of the softmax, the v bias does not
        attn.k.bias.normal_()
        attn.v.bias.normal_()
    q, m = torch.randn(3, 4, 32), torch.randn(3, 9, 32)
    ones = F.pad(m, (0, 1), value=1.0)
    assert attn.folds(4, 9) and not attn.folds(8, 8)  # 4 * (32 + 36) < 9 * 32; 8 * (32 + 32) > 8 * 32
    attn.eval()
    torch.testing.assert_close(attn.forward_folded(q, ones), attn(q, m), rtol=0, atol=1e-6)
    attn.train()  # same RNG draw -> same dropout mask on the (B, h, L, S) weights
    torch.manual_seed(1)
    unfolded = attn(q, m)
    torch.manual_seed(1)
    folded = attn.forward_folded(q, ones)
    torch.testing.assert_close(folded, unfolded, rtol=0, atol=1e-6)
    torch.manual_seed(1)  # without the ones column the v bias would be weighted by 1, not by the kept weights
    assert (attn.forward_folded(q, F.pad(m, (0, 1))) - unfolded).abs().amax() > 1e-2
    grads = [torch.autograd.grad(out.square().sum(), attn.v.weight)[0] for out in (unfolded, folded)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_model_folded_and_unfolded_give_the_same_outputs() -> None:
    model = tiny_model(seed=5)
    plain = tiny_model(seed=5, fold_cross_attention=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 8, 12)
    with torch.no_grad():
        a, b = model(x), plain(x)
    torch.testing.assert_close(a.current, b.current, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.anticipation, b.anticipation, rtol=0, atol=1e-5)
