"""2-D positional encodings of a feature map for transformer detectors (DETR, Carion et al. 2020, Appendix A.4).

Both take the padding mask ``(B, H, W)`` (True = padding) of the feature map and return ``(B, 2 * num_feats, H, W)``:
the y half first then the x half for the sine encoding, x first then y for the learned one (as the reference
facebookresearch/detr models/position_encoding.py orders them, so converted weights line up).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sine_position_embedding(
    mask: Tensor, num_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """Sine/cosine of each cell's position normalised over the image's non-padded area, ``(B, 2 * num_feats, H, W)``.

    y (x) = cumulative count of valid cells down the column (along the row), divided by the column's (row's)
    total count (+ 1e-6) and multiplied by ``scale``: the last valid cell sits at ``scale`` whatever the padding,
    so an image gets the same encoding alone and padded in a batch (for the same valid feature size). Then
    channel pairs (2i, 2i + 1) hold sin / cos of ``pos / temperature ** (2i / num_feats)``, as Vaswani et al.
    Padded cells get finite values (they are masked out of attention).
    """
    valid = (~mask).to(torch.float32)
    y_embed = valid.cumsum(1)
    x_embed = valid.cumsum(2)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    pos_x, pos_y = sin_cos_pairs(x_embed, num_feats, temperature), sin_cos_pairs(y_embed, num_feats, temperature)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sin_cos_pairs(values: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """``(...)`` -> ``(..., num_feats)``: channel pairs (2i, 2i + 1) hold sin / cos of
    ``value / temperature ** (2i / num_feats)`` (Vaswani et al.; DETR's and DAB-DETR's frequencies)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = values[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEmbedding(nn.Module):
    """:func:`sine_position_embedding` as a module without parameters (DETR's default, ``normalize=True``)."""

    def __init__(self, num_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_feats, self.temperature, self.scale = num_feats, temperature, scale

    def forward(self, mask: Tensor) -> Tensor:
        return sine_position_embedding(mask, self.num_feats, self.temperature, self.scale)


class LearnedPositionEmbedding(nn.Module):
    """A learned vector per row and per column (``nn.Embedding(max_size, num_feats)`` each), concatenated x then y.

    Positions are absolute cell indices, so padding changes nothing for the valid cells; maps larger than
    ``max_size`` (50 in DETR: 1600 pixels at stride 32) are an error.
    """

    def __init__(self, num_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_feats)
        self.col_embed = nn.Embedding(max_size, num_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        batch, h, w = mask.shape
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(f"learned position embedding holds {max_size} rows / columns, the feature map is "
                             f"{h} x {w}: use smaller images or position_embedding='sine'")
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # (W, F)
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # (H, F)
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


def build_position_embedding(kind: str, d_model: int) -> nn.Module:
    """``"sine"`` or ``"learned"`` encoding of ``d_model`` channels (``d_model / 2`` per axis)."""
    if d_model % 2:
        raise ValueError(f"position embedding: d_model must be even, got {d_model}")
    if kind == "sine":
        return SinePositionEmbedding(d_model // 2)
    if kind == "learned":
        return LearnedPositionEmbedding(d_model // 2)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {kind!r}")
