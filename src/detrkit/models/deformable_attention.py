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

from detrkit.ops import coordinate_dtype_for, ms_deform_attn


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
        self.implementation = "auto"  # which ms_deform_attn kernel runs; see detrkit.ops
        # Whether forward may sample the memory before value_proj where that costs fewer
        # operations (few queries, many pixels): on in the decoder, off in exports. See
        # _sample_then_project and _sampling_first_costs_less.
        self.sample_before_projection = False
        # Set by merge_query_projections (optimize_for_inference): sampling_offsets and
        # attention_weights side by side, [M*L*P*3, C] and [M*L*P*3].
        self.register_buffer("merged_query_weight", None, persistent=False)
        self.register_buffer("merged_query_bias", None, persistent=False)
        self.register_load_state_dict_post_hook(MSDeformAttn._merge_again_after_loading)
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

    @torch.no_grad()
    def merge_query_projections(self) -> None:
        """Has inference compute the sampling offsets and the attention logits with one matrix
        product instead of two (one pass over the queries, a wider product). Gradients still use
        the two layers. Loading a state dict merges again; after changing their weights in any
        other way, call this again."""
        layers = (self.sampling_offsets, self.attention_weights)
        self.merged_query_weight = torch.cat([layer.weight for layer in layers])
        self.merged_query_bias = torch.cat([layer.bias for layer in layers])

    def _merge_again_after_loading(self, incompatible_keys) -> None:
        if self.merged_query_weight is not None:
            self.merge_query_projections()

    def sampling(
        self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Where each query samples and how much each sample weighs. One method for
        :meth:`forward` and for :func:`detrkit.inference.capture_internals`, which records them.

        Arguments as in :meth:`forward`. Returns ``sampling_locations`` ``[N, Lq, M, L, P, 2]``,
        normalised (x, y) on each level, and ``attention_weights`` ``[N, Lq, M, L, P]``, which sum
        to 1 over levels x points for every query and head.
        """
        batch, num_queries, _ = query.shape
        shape = (batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if self.merged_query_weight is not None and not torch.is_grad_enabled():
            both = F.linear(query, self.merged_query_weight, self.merged_query_bias)
            sizes = [self.sampling_offsets.out_features, self.attention_weights.out_features]
            sampling_offsets, attention_weights = both.split(sizes, -1)
        else:
            sampling_offsets = self.sampling_offsets(query)
            attention_weights = self.attention_weights(query)
        sampling_offsets = sampling_offsets.view(*shape, 2)  # [N, Lq, M, L, P, 2]
        attention_weights = attention_weights.view(*shape[:3], -1)
        # In the locations' dtype (fp32 when the projections run in bf16), as the operator takes
        # them; converting in the softmax costs nothing extra.
        coordinate_dtype = torch.promote_types(sampling_offsets.dtype, reference_points.dtype)
        attention_weights = F.softmax(attention_weights, -1, dtype=coordinate_dtype)
        attention_weights = attention_weights.view(shape)  # [N, Lq, M, L, P]

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by that level's (W, H), then add the
            # reference, in one pass. The per-level operands are spread over points first, so that
            # every operand's innermost axis is the same L * P * 2 numbers: broadcast over an
            # innermost axis of 2, the same arithmetic ran 8x slower.
            per_point = (self.n_levels, self.n_points, 2)
            offset_normalizer = spatial_shapes.flip(-1).to(sampling_offsets.dtype)  # [L, 2] (W, H)
            offset_normalizer = offset_normalizer[:, None].expand(per_point).reshape(-1)  # [L*P*2]
            reference = reference_points[:, :, None, :, None].expand(-1, -1, 1, *per_point)
            sampling_locations = torch.addcdiv(
                reference.reshape(batch, num_queries, 1, -1),  # [N, Lq, 1, L*P*2]
                sampling_offsets.view(batch, num_queries, self.n_heads, -1),
                offset_normalizer,
            ).view(*shape, 2)
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the reference box: P points span half its size.
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got {reference_points.shape}"
            )
        return sampling_locations, attention_weights

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
        sampling_locations, attention_weights = self.sampling(
            query, reference_points, spatial_shapes
        )
        if self.sample_before_projection and _sampling_first_costs_less(
            query.shape[1],
            input_flatten.shape[1],
            self.d_model,
            self.n_heads,
            self.n_levels,
            self.n_points,
        ):
            output = self._sample_then_project(
                input_flatten,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
                input_padding_mask,
            )
        else:
            value = self.value_proj(input_flatten)
            if input_padding_mask is not None and _may_have_padding(input_padding_mask):
                # In place: the projection's output is fresh and autograd needs none of it.
                value = value.masked_fill_(input_padding_mask[..., None], 0.0)
            value = value.unflatten(-1, (self.n_heads, -1))  # [N, S, M, D]
            output = self._sample(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights
            )  # [N, Lq, M * D]
        return self.output_proj(output)

    def _sample(
        self,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        """The operator on ``value`` ``[N, S, M, D]``: ``[N, Lq, M * D]`` in value's dtype."""
        # sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y). With bf16/fp16 values
        # (autocast, or a model in that precision) they stay fp32, with the attention weights:
        # in bf16 a location on a 134-pixel-wide level would be off by up to half a pixel. The
        # values go in as they are: the fused kernels gather bf16 and accumulate in fp32.
        dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
        output = ms_deform_attn(
            value if dtype == coordinate_dtype_for(value.dtype) else value.to(dtype),
            spatial_shapes,
            level_start_index,
            sampling_locations.to(dtype),
            attention_weights.to(dtype),
            implementation=self.implementation,
        )
        return output.to(value.dtype)

    def _sample_then_project(
        self,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        input_padding_mask: Tensor | None,
    ) -> Tensor:
        """What :meth:`forward` computes, with ``value_proj`` moved after the sampling.

        Sampling is linear, so sum_t w_t (W x_t + b) = W (sum_t w_t x_t) + b sum_t w_t, where t
        runs over a query's in-map, unpadded bilinear corners. When queries are few (the
        decoder's 300 against an image's ~18,000 pixels), sampling the C input channels for
        every (query, head) costs a fraction of projecting every pixel; the results are the
        same up to rounding.
        """
        batch, num_queries, heads = sampling_locations.shape[:3]
        # Each (query, head) pair becomes a single-head query that reads all C channels.
        locations = sampling_locations.flatten(1, 2).unsqueeze(2)  # [N, Lq * M, 1, L, P, 2]
        weights = attention_weights.flatten(1, 2).unsqueeze(2)  # [N, Lq * M, 1, L, P]
        in_image = torch.ones_like(input_flatten[..., :1])  # [N, S, 1]
        if input_padding_mask is not None:
            in_image = in_image.masked_fill(input_padding_mask[..., None], 0.0)
            # Only when something is padded: the copy costs as much as the sampling.
            if _may_have_padding(input_padding_mask):
                input_flatten = input_flatten.masked_fill(input_padding_mask[..., None], 0.0)
        args = (spatial_shapes, level_start_index, locations, weights)
        sampled = self._sample(input_flatten.unsqueeze(2), *args)  # [N, Lq * M, C]
        weight_in_image = self._sample(in_image.unsqueeze(2), *args)  # [N, Lq * M, 1]
        weight = self.value_proj.weight.unflatten(0, (heads, -1))  # [M, D, C]
        projected = torch.einsum(
            "nqmc,mdc->nqmd", sampled.view(batch, num_queries, heads, -1), weight
        )
        bias = self.value_proj.bias.view(heads, -1)  # [M, D]
        projected = projected + weight_in_image.view(batch, num_queries, heads, 1) * bias
        return projected.flatten(2)  # [N, Lq, M * D]


def _sampling_first_costs_less(
    num_queries: int, num_pixels: int, channels: int, heads: int, levels: int, points: int
) -> bool:
    """Whether :meth:`MSDeformAttn._sample_then_project` takes fewer multiply-adds than
    projecting every pixel first: ``Lq`` queries against ``S`` pixels of ``C`` channels."""
    samples = num_queries * levels * points * 4  # bilinear corners read, per head
    project_first = num_pixels * channels * channels + samples * channels  # D per head, M heads
    sample_first = samples * heads * channels + num_queries * channels * channels
    return sample_first < project_first


def _may_have_padding(mask: Tensor) -> bool:
    """False only when ``mask`` is known to hold no padding: checked on CPUs, where the answer is
    at hand. Elsewhere reading it would wait for the GPU, and when compiling it is data."""
    if mask.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    return bool(mask.any())
