"""OadTR: an encoder over the past window and a decoder that anticipates the next frames (arXiv 2106.11149).

Wang et al., "OadTR: Online Action Detection with Transformers", ICCV 2021, §3 and Fig. 2, with the defaults
of the released code (REFERENCE §9.2; ``transformer_models/ViT.py`` ``VisionTransformer_v3``):

* the window of T past frame features ``(B, T, D_in)`` (THUMOS: TSN rgb + flow, 3072-d) is projected to
  ``embed_dim`` (1024); a learned task token (zero init) is APPENDED after the last frame; learned absolute
  positional embeddings for the T + 1 positions, then dropout;
* encoder: 3 pre-norm layers, 8 heads, MLP 1024 -> 1024 with GELU, then a final LayerNorm; the output at
  the task token summarises the window;
* decoder: 5 post-norm layers, 4 heads, FFN 1024 -> 1024 with GELU, over ``num_queries`` = 8 learned
  queries (zero init) with CAUSAL self-attention (query j sees queries <= j) and cross-attention to all
  T + 1 encoder outputs, then a final LayerNorm and dropout; query j anticipates frame t + 1 + j;
* heads: a shared Linear classifies every decoder output (anticipation logits); the current frame t is
  classified from [task-token feature, mean of the decoder outputs] by Linear(2 * 1024 -> C).

The paper-size model (D_in = 3072, C = 22) has 74,700,844 parameters: the released log's 74,709,036 less
the decoder positional embedding the released code builds but never uses (8 x 1024). Attention runs through
``torch.nn.functional.scaled_dot_product_attention``. Where we differ: the decoder FFN's 1x1 ``Conv1d``
layers are ``Linear`` layers (the same map); everything else, dropout included, is as released, e.g. the
encoder's attention output passes two dropouts (the attention projection's, rate ``attn_dropout``, then the
residual branch's, rate ``dropout``). The decoder's cross-attention is computed with its key / value
projections folded into the 8 queries (:meth:`DecoderAttention.forward_folded`): the same function and
parameters in a cheaper order, since 8 queries attend to 65 encoder outputs.

:class:`StreamingOadTR` runs the same model frame by frame (online detection; the released code only
evaluates offline windows).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD_MODES = ("replicate", "zeros")


class OadTROutput(NamedTuple):
    """Logits of the current frame ``(B, C)`` and of the ``Q`` anticipated frames ``(B, Q, C)``."""

    current: Tensor
    anticipation: Tensor


def class_probabilities(logits: Tensor, ambiguous_index: int | None = None) -> Tensor:
    """Softmax over the classes other than "ambiguous" (REFERENCE §9.5); the ambiguous column gets 0.

    Args:
        logits: ``(..., C)`` logits, any float dtype (the softmax runs in float32, float64 kept).
        ambiguous_index: column left out of the softmax (OadTR: 21, the last), or None for a plain softmax.

    Returns:
        ``(..., C)`` probabilities summing to 1 over the non-ambiguous columns.
    """
    if logits.dtype != torch.float64:
        logits = logits.float()
    if ambiguous_index is not None:
        logits = logits.clone()
        logits[..., ambiguous_index] = float("-inf")
    return logits.softmax(-1)


class WindowProbabilities(nn.Module):
    """Export wrapper: window features ``(B, T, D_in)`` -> probabilities ``(B, 1 + Q, C)`` in one tensor.

    Row 0 is the current frame, rows ``1 .. Q`` the anticipated frames; softmax over the non-ambiguous
    classes as :func:`class_probabilities` (a masked fill, so ONNX and TorchScript need no index writes).
    """

    def __init__(self, model: OadTR, ambiguous_index: int | None = None) -> None:
        super().__init__()
        self.model = model
        mask = torch.zeros(model.num_classes, dtype=torch.bool)
        if ambiguous_index is not None:
            mask[ambiguous_index] = True
        self.register_buffer("ambiguous", mask, persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        out = self.model(features)
        logits = torch.cat([out.current[:, None], out.anticipation], dim=1).float()
        return logits.masked_fill(self.ambiguous, float("-inf")).softmax(-1)


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(B, L, E)`` -> ``(B, heads, L, E / heads)``."""
    b, n, e = x.shape
    return x.view(b, n, heads, e // heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """``(B, heads, L, E / heads)`` -> ``(B, L, E)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class EncoderSelfAttention(nn.Module):
    """Multi-head self-attention of the encoder: one bias-free qkv projection, output projection + dropout."""

    def __init__(self, dim: int, heads: int, attn_dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"OadTR encoder: embed_dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(attn_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, E)`` -> ``(B, L, E)``, every token attending to every token of the window."""
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(_merge(out)))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer layer: ``x + drop(attn(LN(x)))``, then ``x + mlp(LN(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EncoderSelfAttention(dim, heads, attn_dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class DecoderAttention(nn.Module):
    """Multi-head attention with separate q / k / v / output projections (with bias), as the decoder's."""

    def __init__(self, dim: int, heads: int, attn_dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"OadTR decoder: embed_dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: Tensor, memory: Tensor, causal: bool = False) -> Tensor:
        """``query (B, L, E)`` attends to ``memory (B, S, E)``; ``causal``: position i sees positions <= i."""
        q, k, v = _heads(self.q(query), self.heads), _heads(self.k(memory), self.heads), _heads(self.v(memory), self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0,
                                             is_causal=causal)
        return self.out(_merge(out))

    def folds(self, queries: int, keys: int) -> bool:
        """Whether :meth:`forward_folded` costs fewer multiply-adds than :meth:`forward` for these lengths.

        The k / v projections cost ``S E^2`` each; folded, ``L E^2 + heads L S E``: cheaper when few queries
        attend to many keys (OadTR's 8 queries and 65 encoder tokens: about 6.5x fewer).
        """
        e = self.q.in_features
        return queries * (e + self.heads * keys) < keys * e

    def forward_folded(self, query: Tensor, memory_ones: Tensor) -> Tensor:
        """The same attention as :meth:`forward` (non-causal), with the k / v projections folded into the queries.

        Per head h with ``k = m W_k,h^T + b_k,h`` and ``v = m W_v,h^T + b_v,h``:
        ``q k^T = (q W_k,h) m^T + q b_k,h`` where the last term is the same for every key, so the softmax
        ignores it; and ``A v = (A m) W_v,h^T + (A 1) b_v,h``. So each head attends straight to the memory
        rows (width E, scale ``1 / sqrt(E / heads)`` as before) and projects the ``L`` results instead of the
        ``S`` keys and values. ``memory_ones`` is the memory with a column of ones appended,
        ``(B, S, E + 1)``: attending to it also gives ``A 1``, which is not 1 once attention dropout has
        dropped weights, so training with attention dropout computes the unfolded function too. Equal to
        :meth:`forward` up to float rounding.
        """
        e, h = self.q.in_features, self.heads  # Python ints, also when traced for export
        d = e // h
        q = _heads(self.q(query), h)  # (B, h, L, d)
        qk = torch.einsum("bhld,hde->bhle", q, self.k.weight.view(h, d, e).to(q.dtype))
        qk = F.pad(qk, (0, 1))  # the ones column adds nothing to the scores
        mem = memory_ones[:, None].expand(-1, h, -1, -1).to(qk.dtype)
        out = F.scaled_dot_product_attention(qk, mem, mem, dropout_p=self.attn_dropout if self.training else 0.0,
                                             scale=1.0 / math.sqrt(d))  # (B, h, L, E + 1)
        out = torch.einsum("bhle,hde->bhld", out[..., :e], self.v.weight.view(h, d, e).to(out.dtype)) \
            + out[..., e:] * self.v.bias.view(h, 1, d).to(out.dtype)
        return self.out(_merge(out))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: causal self-attention, cross-attention, GELU FFN, a LayerNorm after each."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(dim, heads, dropout)
        self.cross_attn = DecoderAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim), nn.Dropout(dropout))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def self_block(self, x: Tensor) -> Tensor:
        """``LN(x + drop(causal self-attention(x)))``: in the first layer this depends on no input."""
        return self.norm1(x + self.drop(self.self_attn(x, x, causal=True)))

    def forward(self, x: Tensor, memory: Tensor, after_self: Tensor | None = None,
                memory_ones: Tensor | None = None) -> Tensor:
        """``x (B, Q, E)``, ``memory (B, S, E)``; ``after_self`` replaces ``self_block(x)`` when cached.

        With ``memory_ones`` (the memory with a column of ones, ``(B, S, E + 1)``) the cross-attention runs
        folded (:meth:`DecoderAttention.forward_folded`).
        """
        x = self.self_block(x) if after_self is None else after_self
        cross = self.cross_attn(x, memory) if memory_ones is None else self.cross_attn.forward_folded(x, memory_ones)
        x = self.norm2(x + self.drop(cross))
        return self.norm3(x + self.ffn(x))


class OadTR(nn.Module):
    """OadTR (paper defaults): window features ``(B, T, D_in)`` -> current and anticipated frame logits.

    Args:
        in_dim: feature dimension D_in of a frame (from the data).
        num_classes: C, every column of the targets including background and ambiguous (OadTR: 22).
        window: T, frames in the encoder window (64; ``enc_layers`` in the released code).
        embed_dim: token width of encoder and decoder (1024).
        enc_layers / enc_heads / enc_mlp_dim: encoder depth (3), heads (8), MLP width (1024).
        dec_layers / dec_heads / dec_ffn_dim: decoder depth (5), heads (4), FFN width (1024).
        num_queries: Q, anticipated frames = decoder queries (8).
        dropout: dropout of embeddings, residual branches, MLPs and decoder attention (0.1).
        attn_dropout: encoder attention dropout (0.1).
        fold_cross_attention: run the decoder's cross-attention with its key / value projections folded
            into the queries when that is cheaper (:meth:`DecoderAttention.forward_folded`): the same
            function and parameters, about 2x faster decoder cross-attention at the paper's size.
    """

    def __init__(self, *, in_dim: int, num_classes: int, window: int = 64, embed_dim: int = 1024, enc_layers: int = 3,
                 enc_heads: int = 8, enc_mlp_dim: int = 1024, dec_layers: int = 5, dec_heads: int = 4,
                 dec_ffn_dim: int = 1024, num_queries: int = 8, dropout: float = 0.1, attn_dropout: float = 0.1,
                 fold_cross_attention: bool = True) -> None:
        super().__init__()
        if min(in_dim, num_classes, window, embed_dim, enc_layers, dec_layers, num_queries) < 1:
            raise ValueError("OadTR: in_dim, num_classes, window, embed_dim, layers and num_queries must be >= 1")
        self.in_dim, self.num_classes, self.window, self.num_queries = in_dim, num_classes, window, num_queries
        self.input_proj = nn.Linear(in_dim, embed_dim)
        self.task_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Embedding(window + 1, embed_dim)  # N(0, 1) init, as the released nn.Embedding
        self.pos_drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderLayer(embed_dim, enc_heads, enc_mlp_dim, dropout, attn_dropout)
                                     for _ in range(enc_layers))
        self.encoder_norm = nn.LayerNorm(embed_dim)
        self.queries = nn.Parameter(torch.zeros(1, num_queries, embed_dim))
        self.decoder = nn.ModuleList(DecoderLayer(embed_dim, dec_heads, dec_ffn_dim, dropout) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.decoder_drop = nn.Dropout(dropout)
        self.anticipation_head = nn.Linear(embed_dim, num_classes)
        self.current_head = nn.Linear(2 * embed_dim, num_classes)
        self.fold_cross_attention = fold_cross_attention

    def forward(self, features: Tensor) -> OadTROutput:
        """``features (B, T, D_in)`` -> ``OadTROutput(current (B, C), anticipation (B, Q, C))`` logits.

        The last of the T frames is the current frame t; anticipation row j is frame t + 1 + j.
        """
        if features.ndim != 3 or features.shape[1:] != (self.window, self.in_dim):
            raise ValueError(f"OadTR: expected features (B, {self.window}, {self.in_dim}), got {tuple(features.shape)}")
        return self.forward_tokens(self.input_proj(features))

    def forward_tokens(self, tokens: Tensor, first_self: Tensor | None = None) -> OadTROutput:
        """Everything after the input projection: ``tokens (B, T, E)`` -> logits (see :meth:`forward`).

        ``first_self`` is the first decoder layer's self-attention block output ``(1 or B, Q, E)``, which
        depends on no input and can be cached at inference (:class:`StreamingOadTR`).
        """
        b = tokens.shape[0]
        x = torch.cat([tokens, self.task_token.expand(b, -1, -1).to(tokens.dtype)], dim=1)
        x = self.pos_drop(x + self.pos_embed.weight.to(x.dtype))
        for layer in self.encoder:
            x = layer(x)
        memory = self.encoder_norm(x)

        q = self.queries.expand(b, -1, -1)
        fold = self.fold_cross_attention and self.decoder[0].cross_attn.folds(self.num_queries, self.window + 1)
        memory_ones = F.pad(memory, (0, 1), value=1.0) if fold else None
        for i, layer in enumerate(self.decoder):
            cached = first_self.expand(b, -1, -1) if (i == 0 and first_self is not None) else None
            q = layer(q, memory, after_self=cached, memory_ones=memory_ones)
        dec = self.decoder_drop(self.decoder_norm(q))

        anticipation = self.anticipation_head(dec)
        current = self.current_head(torch.cat([memory[:, -1], dec.mean(dim=1)], dim=-1))
        return OadTROutput(current, anticipation)

    def streaming(self, pad: str = "replicate", ambiguous_index: int | None = None) -> StreamingOadTR:
        """A frame-by-frame detector over this model (see :class:`StreamingOadTR`)."""
        return StreamingOadTR(self, pad=pad, ambiguous_index=ambiguous_index)


class StreamOutput(NamedTuple):
    """Probabilities of the current frame ``([B,] C)`` and of the Q anticipated frames ``([B,] Q, C)``."""

    current: Tensor
    anticipation: Tensor


class StreamingOadTR:
    """Online OadTR: feed one feature vector per frame, get the current frame's class probabilities at once.

    Keeps the last T projected frames in a rolling window, so each step projects only the new frame; the
    first decoder layer's query self-attention, which depends on no input, is computed once. The encoder
    and the rest of the decoder run again every step: absolute positional embeddings change every token's
    input when the window slides (``benchmarks/action_speed.py`` measures where the time goes).

    Before T frames have arrived the window is padded at the start, with the same rule as the offline
    windows of ``datamodules.features.samples.FeatureWindowDataset`` (``pad``):

    * ``"replicate"`` (default): the first frame repeated (the window of frame t < T - 1 is
      ``[f_0] * (T - 1 - t) + [f_0 .. f_t]``; index clipping at 0, as LSTR / TeSTra's data layers do);
    * ``"zeros"``: zero feature vectors (their projection is the input projection's bias).

    So ``step`` at frame t returns the same numbers as the offline model on that frame's window.
    ``step`` runs under ``torch.no_grad`` with the model in eval mode (the constructor calls ``model.eval()``).

    Args:
        model: a trained :class:`OadTR` (weights read at construction and :meth:`reset`: call ``reset`` after
            changing them).
        pad: ``"replicate"`` or ``"zeros"``.
        ambiguous_index: column left out of the softmax (see :func:`class_probabilities`).
    """

    def __init__(self, model: OadTR, pad: str = "replicate", ambiguous_index: int | None = None) -> None:
        if pad not in PAD_MODES:
            raise ValueError(f"StreamingOadTR: pad must be one of {PAD_MODES}, got {pad!r}")
        self.model = model.eval()
        self.pad = pad
        self.ambiguous_index = ambiguous_index
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the stream (start a new video) and refresh the cached query self-attention."""
        self.tokens: Tensor | None = None  # (B, T, E) projected frames, oldest first
        self.frames_seen = 0
        self.first_self = self.model.decoder[0].self_block(self.model.queries)

    @torch.no_grad()
    def step(self, feature: Tensor) -> StreamOutput:
        """Add frame t's features ``(D_in,)`` or ``(B, D_in)`` (B streams in step); return frame t's output.

        Returns:
            ``StreamOutput(current ([B,] C), anticipation ([B,] Q, C))`` probabilities, without the batch
            dimension when ``feature`` had none.
        """
        m = self.model
        if m.training:
            raise RuntimeError("StreamingOadTR: the model is in training mode (dropout on); call model.eval()")
        batched = feature.ndim == 2
        x = feature if batched else feature.unsqueeze(0)
        if x.ndim != 2 or x.shape[1] != m.in_dim:
            raise ValueError(f"StreamingOadTR: expected a feature vector ({m.in_dim},) or (B, {m.in_dim}), "
                             f"got {tuple(feature.shape)}")
        if self.tokens is not None and x.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"StreamingOadTR: {x.shape[0]} streams given, {self.tokens.shape[0]} running; "
                             "call reset() to start new streams")
        x = x.to(device=m.input_proj.weight.device, dtype=m.input_proj.weight.dtype)
        new = m.input_proj(x)[:, None]  # (B, 1, E)
        if self.tokens is None:
            fill = new if self.pad == "replicate" else m.input_proj.bias.expand_as(new)
            self.tokens = torch.cat([fill.expand(-1, m.window - 1, -1), new], dim=1)
        else:
            self.tokens = torch.cat([self.tokens[:, 1:], new], dim=1)
        self.frames_seen += 1
        out = m.forward_tokens(self.tokens, first_self=self.first_self)
        current = class_probabilities(out.current, self.ambiguous_index)
        anticipation = class_probabilities(out.anticipation, self.ambiguous_index)
        if not batched:
            current, anticipation = current[0], anticipation[0]
        return StreamOutput(current, anticipation)
