"""Position encodings of feature maps: the fixed sine encoding and the learned one.

Both return ``[B, 2 * num_pos_feats, H, W]`` for a padding mask ``[B, H, W]`` (True on padding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of each pixel's (y, x) position, as in "Attention is all you need".

    Positions are cumulative sums over the *unpadded* area, so an image's encoding does not depend on
    how much padding its batch added. With ``normalize`` they are scaled to ``[0, scale]`` per image.
    ``offset`` is added before normalising: 0 for DETR, -0.5 for Deformable DETR (pixel centres).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W], 1-based row index
        x_embed = not_mask.cumsum(2, dtype=torch.float32)  # [B, H, W], 1-based column index
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (
            2 * (dim_t // 2) / self.num_pos_feats
        )  # [F]: pairs share a freq

        pos_x = x_embed[:, :, :, None] / dim_t  # [B, H, W, F]
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin (even features) and cos (odd features) of each frequency.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]: y first


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: one embedding per column and per row (at most 50 of each)."""

    def __init__(self, num_pos_feats: int = 256 // 2, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        batch, height, width = mask.shape
        max_size = self.row_embed.num_embeddings
        if height > max_size or width > max_size:
            raise ValueError(
                f"learned position embedding covers feature maps up to {max_size}x{max_size}, "
                f"got {height}x{width}; use a smaller image or the sine encoding"
            )
        x_emb = self.col_embed(torch.arange(width, device=mask.device))  # [W, F]
        y_emb = self.row_embed(torch.arange(height, device=mask.device))  # [H, F]
        pos = torch.cat(
            [x_emb.unsqueeze(0).expand(height, -1, -1), y_emb.unsqueeze(1).expand(-1, width, -1)],
            dim=-1,
        )  # [H, W, 2F]: x first, as the original
        return pos.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1)  # [B, 2F, H, W]


def build_position_encoding(kind: str, hidden_dim: int, offset: float = 0.0) -> nn.Module:
    """The encoding a config names ("sine" or "learned"), half the channels per axis."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True, offset=offset)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {kind!r}")
