"""Multi-scale deformable attention as a module (Zhu et al., 2021).

Each query predicts, from itself, ``n_points`` sampling offsets around its reference point on every
level and a softmax of attention weights over levels x points. Values are a projection of the input,
sampled bilinearly; the operator itself lives in :mod:`detrkit.ops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """``sampling_offsets`` and ``attention_weights`` are Linear layers on the query;
    ``value_proj`` / ``output_proj`` project the attended input in and the result out."""

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: every head starts looking in its own direction, points
        1..P steps away; all weights are equal at first (zero logits)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)  # [M, 2]
        # Scale so that the larger of |x|, |y| is 1: the first point is one pixel away.
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)  # [P]
        grid = directions[:, None, None, :] * steps[None, None, :, None]  # [M, 1, P, 2]
        grid = grid.expand(-1, self.n_levels, -1, -1)  # [M, L, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(
        self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Where each query samples and how much each sample weighs (also read by
        :func:`detrkit.inference.capture_internals`).

        Arguments as in :meth:`forward`. Returns ``sampling_locations`` ``[N, Lq, M, L, P, 2]``,
        normalised (x, y) on each level, and ``attention_weights`` ``[N, Lq, M, L, P]``, which sum
        to 1 over levels x points for every query and head.
        """
        batch, num_queries, _ = query.shape
        shape = (batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        sampling_offsets = self.sampling_offsets(query).view(*shape, 2)
        attention_weights = self.attention_weights(query).view(*shape[:3], -1)
        attention_weights = F.softmax(attention_weights, -1).view(shape)  # over levels x points
        return self.locate(reference_points, sampling_offsets, spatial_shapes), attention_weights

    def locate(
        self, reference_points: Tensor, sampling_offsets: Tensor, spatial_shapes: Tensor
    ) -> Tensor:
        """Sampling locations ``[N, Lq, M, L, P, 2]`` from the references and the predicted
        offsets ``[N, Lq, M, L, P, 2]``."""
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by that level's (W, H).
            offset_normalizer = spatial_shapes.flip(-1)[None, None, None, :, None, :]
            reference_points = reference_points[:, :, None, :, None, :]  # [N, Lq, 1, L, 1, 2]
            sampling_locations = reference_points + sampling_offsets / offset_normalizer
            return sampling_locations
        if reference_points.shape[-1] == 4:
            # Offsets are relative to the reference box: P points span half its size.
            centre = reference_points[:, :, None, :, None, :2]  # [N, Lq, 1, L, 1, 2]
            size = reference_points[:, :, None, :, None, 2:]
            sampling_locations = centre + sampling_offsets / self.n_points * size * 0.5
            return sampling_locations
        raise ValueError(
            f"reference_points must end in 2 (points) or 4 (boxes), got {reference_points.shape}"
        )

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: ``[N, Lq, C]`` (with its position added).
            reference_points: ``[N, Lq, L, 2]`` normalised (x, y) per level, or ``[N, Lq, L, 4]``
                boxes (cx, cy, w, h), whose size scales the offsets.
            input_flatten: ``[N, S, C]`` all levels' pixels, flattened and concatenated.
            spatial_shapes: ``[L, 2]`` (H, W) per level; level_start_index: ``[L]``.
            input_padding_mask: ``[N, S]`` True on padding; padded values are zeroed.

        Returns:
            ``[N, Lq, C]``.
        """
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.unflatten(-1, (self.n_heads, -1))  # [N, S, M, C / M]
        sampling_locations, attention_weights = self.sampling(
            query, reference_points, spatial_shapes
        )
        output = ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )  # [N, Lq, C]
        return self.output_proj(output)
