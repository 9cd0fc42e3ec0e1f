"""Multi-scale deformable attention, fast.

:class:`FastMSDeformAttn` computes the sampling offsets and the attention logits with one matrix
product, the sampling locations in one fused pass, keeps locations and weights in fp32 for bf16
values, and skips zeroing padded values when nothing is padded; in CPU inference the kernel
computes the weights' softmax and the locations itself, query by query
(:func:`~detrkit.ops.ms_deform_attn_projected`). :class:`SampleFirstMSDeformAttn`
(the decoder's cross-attention) also samples the memory before ``value_proj`` where that is
cheaper: with a few hundred queries against thousands of pixels, by far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detrkit.models.deformable_attention import MSDeformAttn
from detrkit.ops import (
    coordinate_dtype_for,
    ms_deform_attn,
    ms_deform_attn_projected,
    onednn,
    projected_kernel_applies,
)


class FastMSDeformAttn(MSDeformAttn):
    reference_class = MSDeformAttn

    def offsets_and_logits(self, query: Tensor) -> Tensor:
        """``sampling_offsets(query)`` and ``attention_weights(query)`` side by side, from one
        matrix product: ``[N, Lq, M * L * P * 3]``."""
        return onednn.stacked_linear(query, (self.sampling_offsets, self.attention_weights))

    def sampling(
        self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor
    ) -> tuple[Tensor, Tensor]:
        batch, num_queries, _ = query.shape
        shape = (batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        both = self.offsets_and_logits(query)
        sampling_offsets, attention_weights = both.split(
            [self.sampling_offsets.out_features, self.attention_weights.out_features], -1
        )
        # In the locations' dtype (fp32 when the projections run in bf16): in bf16 a location on
        # a 134-pixel-wide level would be off by up to half a pixel. The offsets are converted
        # before the arithmetic: mixed dtypes would take torch's slower elementwise path.
        coordinate_dtype = torch.promote_types(both.dtype, reference_points.dtype)
        attention_weights = F.softmax(
            attention_weights.reshape(*shape[:3], -1), -1, dtype=coordinate_dtype
        ).view(shape)
        if reference_points.shape[-1] != 2:
            offsets = sampling_offsets.reshape(*shape, 2)
            return self.locate(reference_points, offsets, spatial_shapes), attention_weights
        # reference + offset / (W, H) of the level, in one pass. The per-level operands are spread
        # over points first, so that every operand's innermost axis is the same L * P * 2
        # numbers: broadcast over an innermost axis of 2, the same arithmetic ran 8x slower.
        per_point = (self.n_levels, self.n_points, 2)
        offset_normalizer = spatial_shapes.flip(-1).to(coordinate_dtype)  # [L, 2] (W, H)
        offset_normalizer = offset_normalizer[:, None].expand(per_point).reshape(-1)  # [L*P*2]
        reference = reference_points[:, :, None, :, None].expand(-1, -1, 1, *per_point)
        sampling_locations = torch.addcdiv(
            reference.reshape(batch, num_queries, 1, -1),  # [N, Lq, 1, L*P*2]
            sampling_offsets.to(coordinate_dtype).reshape(batch, num_queries, self.n_heads, -1),
            offset_normalizer,
        ).view(*shape, 2)
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
        if self.samples_in_kernel(query, reference_points, input_flatten):
            # The softmax and the locations inside the kernel (CPU inference).
            value = self.projected_value(input_flatten, input_padding_mask)
            attended = ms_deform_attn_projected(
                value,
                spatial_shapes,
                level_start_index,
                reference_points,
                self.offsets_and_logits(query),
            )
            return onednn.linear(self.output_proj, attended)
        sampling_locations, attention_weights = self.sampling(
            query, reference_points, spatial_shapes
        )
        where = (spatial_shapes, level_start_index, sampling_locations, attention_weights)
        # The projections with their bias inside oneDNN's product in bf16 inference on a CPU.
        return onednn.linear(
            self.output_proj, self.attend(input_flatten, input_padding_mask, *where)
        )

    def attend(
        self,
        input_flatten: Tensor,
        input_padding_mask: Tensor | None,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        """The attended values before ``output_proj``: ``[N, Lq, C]``."""
        value = self.projected_value(input_flatten, input_padding_mask)
        where = (spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return sample(value, *where)

    def samples_in_kernel(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor):
        """Whether the forward runs :func:`~detrkit.ops.ms_deform_attn_projected`, which
        computes the attention weights and sampling locations inside the kernel (it has no
        gradient: not while one is wanted for the inputs or this module's weights)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return False
        return projected_kernel_applies(input_flatten, reference_points, query)

    def projected_value(self, input_flatten: Tensor, input_padding_mask: Tensor | None) -> Tensor:
        """``value_proj`` of the memory, zero where padded: ``[N, S, M, D]``."""
        value = onednn.linear(self.value_proj, input_flatten)
        if input_padding_mask is not None and may_have_padding(input_padding_mask):
            # In place: the projection's output is fresh and autograd needs none of it.
            value = value.masked_fill_(input_padding_mask[..., None], 0.0)
        return value.unflatten(-1, (self.n_heads, -1))  # [N, S, M, D]


def sample(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The operator on ``value`` ``[N, S, M, D]`` with fp32 locations for bf16/fp16 values (the
    fused kernels gather the narrow values and accumulate in fp32): ``[N, Lq, M * D]`` in
    value's dtype."""
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    output = ms_deform_attn(
        value if dtype == coordinate_dtype_for(value.dtype) else value.to(dtype),
        spatial_shapes,
        level_start_index,
        sampling_locations.to(dtype),
        attention_weights.to(dtype),
    )
    return output.to(value.dtype)


class SampleFirstMSDeformAttn(FastMSDeformAttn):
    """Computes ``value_proj`` after the sampling where :func:`sampling_first_costs_less`.

    Sampling is linear, so sum_t w_t (W x_t + b) = W (sum_t w_t x_t) + b sum_t w_t, where t runs
    over a query's in-map, unpadded bilinear corners: the same result up to rounding.
    """

    def samples_in_kernel(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor):
        sizes = (query.shape[1], input_flatten.shape[1], self.d_model)
        cheaper_first = sampling_first_costs_less(
            *sizes, self.n_heads, self.n_levels, self.n_points
        )
        return not cheaper_first and super().samples_in_kernel(
            query, reference_points, input_flatten
        )

    def attend(
        self,
        input_flatten: Tensor,
        input_padding_mask: Tensor | None,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        where = (spatial_shapes, level_start_index, sampling_locations, attention_weights)
        sizes = (sampling_locations.shape[1], input_flatten.shape[1], self.d_model)
        if not sampling_first_costs_less(*sizes, self.n_heads, self.n_levels, self.n_points):
            return super().attend(input_flatten, input_padding_mask, *where)
        batch, num_queries, heads = sampling_locations.shape[:3]
        # Each (query, head) pair becomes a single-head query that reads all C channels.
        locations = sampling_locations.flatten(1, 2).unsqueeze(2)  # [N, Lq * M, 1, L, P, 2]
        weights = attention_weights.flatten(1, 2).unsqueeze(2)  # [N, Lq * M, 1, L, P]
        in_image = torch.ones_like(input_flatten[..., :1])  # [N, S, 1]
        if input_padding_mask is not None:
            in_image = in_image.masked_fill(input_padding_mask[..., None], 0.0)
            # Only when something is padded: the copy costs as much as the sampling.
            if may_have_padding(input_padding_mask):
                input_flatten = input_flatten.masked_fill(input_padding_mask[..., None], 0.0)
        args = (spatial_shapes, level_start_index, locations, weights)
        sampled = sample(input_flatten.unsqueeze(2), *args)  # [N, Lq * M, C]
        weight_in_image = sample(in_image.unsqueeze(2), *args)  # [N, Lq * M, 1]
        weight = self.value_proj.weight.unflatten(0, (heads, -1))  # [M, D, C]
        projected = torch.einsum(
            "nqmc,mdc->nqmd", sampled.view(batch, num_queries, heads, -1), weight
        )
        bias = self.value_proj.bias.view(heads, -1)  # [M, D]
        projected = projected + weight_in_image.view(batch, num_queries, heads, 1) * bias
        return projected.flatten(2)  # [N, Lq, C]


def sampling_first_costs_less(
    num_queries: int, num_pixels: int, channels: int, heads: int, levels: int, points: int
) -> bool:
    """Whether sampling before ``value_proj`` takes fewer multiply-adds than projecting every
    pixel first: ``Lq`` queries against ``S`` pixels of ``C`` channels."""
    samples = num_queries * levels * points * 4  # bilinear corners read, per head
    project_first = num_pixels * channels * channels + samples * channels  # D per head, M heads
    sample_first = samples * heads * channels + num_queries * channels * channels
    return sample_first < project_first


def may_have_padding(mask: Tensor) -> bool:
    """False only when ``mask`` is known to hold no padding: checked on CPUs, where the answer is
    at hand. Elsewhere reading it would wait for the GPU, and when compiling or tracing it is
    data (a traced answer would hold for every later input)."""
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if mask.device.type != "cpu" or tracing or torch.onnx.is_in_onnx_export():
        return True
    return bool(mask.any())
