"""DETR's encoder-decoder transformer (Carion et al. 2020, §3.2 and Appendix A.3, Fig. 10), post-norm.

As the reference (facebookresearch/detr models/transformer.py) and unlike ``torch.nn.Transformer``: the positional
encodings are added to the queries and keys (never the values) of every attention layer, object queries are
positional encodings of the decoder (its input starts at zeros), the encoder has no final LayerNorm, and the
decoder's final LayerNorm is applied to every layer's output, which are all returned (auxiliary losses).

Tensors are batch-first: ``(B, S, d)``. Attention goes through ``F.scaled_dot_product_attention`` (PyTorch picks
its flash / memory-efficient kernel on GPU and its fused kernel on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Multi-head scaled dot-product attention with separate q / k / v / out projections.

    The layout takes Hugging Face's ``q_proj/k_proj/v_proj/out_proj`` as they are and the reference's
    ``nn.MultiheadAttention`` weights by splitting ``in_proj_weight`` / ``in_proj_bias`` in three (q, k, v order).
    Initialised as the reference: Xavier-uniform over the stacked (3d, d) q/k/v matrix, zero biases.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.q_proj.in_features
        in_proj = nn.init.xavier_uniform_(torch.empty(3 * d, d))
        for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            proj.weight.copy_(in_proj[i * d: (i + 1) * d])
            nn.init.zeros_(proj.bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                blocked: Tensor | None = None) -> Tensor:
        """``query`` (B, Lq, d), ``key`` / ``value`` (B, Lk, d), ``key_padding_mask`` (B, Lk) True = ignore, ``blocked``
        (B or 1, Lq, Lk) True = query may not see key -> (B, Lq, d)."""
        batch, len_q, d = query.shape
        heads = lambda x: x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731  (B, h, L, d/h)
        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
        if blocked is not None:
            attn_mask = ~blocked[:, None] if attn_mask is None else attn_mask & ~blocked[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, len_q, d))


class TransformerEncoderLayer(nn.Module):
    """Post-norm: x = LN(x + Drop(SelfAttn(q = k = x + pos, v = x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """``src``, ``pos`` (B, S, d); ``key_padding_mask`` (B, S) or None."""
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerDecoderLayer(nn.Module):
    """Post-norm self-attention among queries, cross-attention to the image, FFN (each: residual, dropout, LN)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads, dropout)
        self.cross_attn = MultiheadAttention(d_model, num_heads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_with_pos: Tensor,
                memory_key_padding_mask: Tensor | None, query_blocked: Tensor | None = None) -> Tensor:
        """``tgt``, ``query_pos`` (B, Q, d); ``memory``, ``memory_with_pos`` = memory + pos (B, S, d);
        ``query_blocked`` (B or 1, Q, Q) True = a query may not see another (None: all see all)."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, blocked=query_blocked)))
        attn = self.cross_attn(tgt + query_pos, memory_with_pos, memory, memory_key_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the object queries; returns every decoder layer.

    ``forward(src, mask, query_embed, pos)``: ``src`` and ``pos`` (B, d, H, W), ``mask`` (B, H, W) True = padding
    or None (no padding), ``query_embed`` (Q, d) or (B, Q, d) -> ``(L, B, Q, d)``, each layer's output through the
    final LayerNorm (only the last layer when ``return_intermediate`` is False: ``(1, B, Q, d)``). Optional, for
    the training-only queries of :mod:`lit_tasks.models.detection.detr_queries`: ``content`` (B, Q, d), the
    decoder's input (None: zeros, the paper's), and ``query_blocked`` (B or 1, Q, Q), the self-attention mask.
    ``return_memory``: also return the encoder output ``(B, H * W, d)`` (Co-DETR's auxiliary head reads it).
    """

    def __init__(self, *, d_model: int = 256, num_heads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 return_intermediate: bool = True) -> None:
        super().__init__()
        self.d_model, self.return_intermediate = d_model, return_intermediate
        self.encoder_layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """The reference's ``Transformer._reset_parameters``: xavier_uniform_ on every parameter with dim > 1.

        There each attention holds q/k/v as one (3d, d) ``in_proj_weight``, so the Xavier bound of our q, k and v
        matrices is the stacked matrix's (std sqrt(2 / 4d)), not a (d, d) one's (sqrt(2 / 2d), x sqrt 2): the FFN
        matrices first, then each attention draws its own (which skips its Linear children). Biases and LayerNorms
        keep their initialisation (attention biases 0, as nn.MultiheadAttention's; FFN biases torch's default).
        """
        attention_parts = {id(m) for a in self.modules() if isinstance(a, MultiheadAttention) for m in a.children()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in attention_parts:
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, MultiheadAttention):
                module.reset_parameters()

    def forward(self, src: Tensor, mask: Tensor | None, query_embed: Tensor, pos: Tensor, content: Tensor | None = None,
                query_blocked: Tensor | None = None, return_memory: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        memory = self.encode(src, mask, pos)
        hs = self.decode(memory, mask, pos, query_embed, content, query_blocked)
        return (hs, memory) if return_memory else hs

    def encode(self, src: Tensor, mask: Tensor | None, pos: Tensor) -> Tensor:
        """The encoder's output ``(B, H * W, d)`` for ``src`` and ``pos`` ``(B, d, H, W)``."""
        memory, pos = src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2)
        key_padding_mask = None if mask is None else mask.flatten(1)
        for layer in self.encoder_layers:
            memory = layer(memory, pos, key_padding_mask)
        return memory

    def decode(self, memory: Tensor, mask: Tensor | None, pos: Tensor, query_embed: Tensor,
               content: Tensor | None = None, query_blocked: Tensor | None = None) -> Tensor:
        """Every decoder layer's output ``(L, B, Q, d)`` over the encoder ``memory`` (see :meth:`forward`)."""
        pos = pos.flatten(2).transpose(1, 2)
        key_padding_mask = None if mask is None else mask.flatten(1)
        batch = memory.shape[0]
        query_pos = query_embed.expand(batch, -1, -1) if query_embed.ndim == 3 else \
            query_embed[None].expand(batch, -1, -1)
        memory_with_pos = memory + pos  # the cross-attention keys, the same for every decoder layer
        tgt = torch.zeros_like(query_pos) if content is None else content
        outputs = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, memory, memory_with_pos, key_padding_mask, query_blocked)
            if self.return_intermediate:
                outputs.append(self.decoder_norm(tgt))
        return torch.stack(outputs) if self.return_intermediate else self.decoder_norm(tgt)[None]
