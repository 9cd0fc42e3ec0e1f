"""Multi-scale deformable attention for GPUs: Triton kernels, forward and backward.

One program handles ``BLOCK_Q`` queries of one head of one image. For every level and point it
resolves the bilinear corners of all its queries' sampling points at once and gathers each
corner's ``D`` channels as a ``[BLOCK_Q, D]`` tile, accumulating in fp32 for fp32, bf16 and fp16
inputs (fp64 for fp64). bf16 and fp16 values may come with fp32 locations and weights: every load
is converted to the accumulation dtype, so the kernels read each input in its own. Layouts and
the sampling convention are those of ``csrc/ms_deform_attn_cpu.cpp`` (``grid_sample``: bilinear,
zeros outside, ``align_corners=False``).

The launchers below take tensors on any device that Triton runs on; with ``TRITON_INTERPRET=1``
that includes the CPU, which is how the tests check these kernels on machines without a GPU.
Triton is imported when this module is, so import it only where a kernel is wanted.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel is launched: queries per program and warps per program."""

    block_q: int
    num_warps: int


FORWARD_CONFIG = LaunchConfig(block_q=64, num_warps=4)
BACKWARD_CONFIG = LaunchConfig(block_q=64, num_warps=4)


@triton.jit
def _bilinear_corner(x0, y0, fx, fy, width, height, valid, DX: tl.constexpr, DY: tl.constexpr):
    """Corner (x0 + DX, y0 + DY) of each point: its pixel index within the level, whether it
    lies on the map, its bilinear weight and that weight's derivatives in x and y."""
    cx = x0 + DX
    cy = y0 + DY
    inside = valid & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    # Weights of the near (0) and far (1) corner along each axis: 1 - f and f.
    wx = DX * fx + (1 - DX) * (1.0 - fx)
    wy = DY * fy + (1 - DY) * (1.0 - fy)
    sign_x = 2.0 * DX - 1.0
    sign_y = 2.0 * DY - 1.0
    return cy * width + cx, inside, wx * wy, sign_x * wy, sign_y * wx


@triton.jit
def _sampling_point(loc_ptr, point, valid, width, height, ACC: tl.constexpr):
    """A point's (x, y) in the level's pixel units, split into the top-left corner and the
    fractions past it; also whether it is NaN. Points far off the map are clamped to just
    outside it (all corners then read zero), which keeps the int conversion in range."""
    x = tl.load(loc_ptr + 2 * point, mask=valid, other=0.0).to(ACC)
    y = tl.load(loc_ptr + 2 * point + 1, mask=valid, other=0.0).to(ACC)
    is_nan = (x != x) | (y != y)
    x = tl.where(is_nan, -2.0, x * width - 0.5)
    y = tl.where(is_nan, -2.0, y * height - 0.5)
    x = tl.minimum(tl.maximum(x, -2.0), width + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), height + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return x0f.to(tl.int64), y0f.to(tl.int64), x - x0f, y - y0f, is_nan


@triton.jit
def _program_tile(S, Lq, M, D, L, P, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's queries and head: where its head starts in a value row, the index of each
    query's first point in [N, Lq, M, L, P] ([BQ]), the offsets of its [BQ, BD] tile in
    [N, Lq, M * D], which queries exist ([BQ]), the channels ([BD]) and which of them exist."""
    n = (tl.program_id(1) // M).to(tl.int64)
    m = tl.program_id(1) % M
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    query_head = (n * Lq + q) * M + m  # [BQ] into [N, Lq, M]
    head_offset = n * S * M * D + m * D
    tile = query_head[:, None] * D + d[None, :]
    return head_offset, query_head * (L * P), tile, q < Lq, d, d < D


@triton.jit
def _value_row(start, pixel, inside, S):
    """A corner's row of value, and whether to read it: level sizes are not checked against
    value on a GPU (that would wait for it), so wrong ones read zeros, never past value."""
    row = start + pixel
    return row, inside & (row >= 0) & (row < S)


@triton.jit
def _level(shapes_ptr, starts_ptr, level):
    """A level's height, width and first row in value."""
    height = tl.load(shapes_ptr + 2 * level)
    width = tl.load(shapes_ptr + 2 * level + 1)
    return height, width, tl.load(starts_ptr + level)


@triton.jit
def _forward_kernel(
    value_ptr,  # [N, S, M, D]
    shapes_ptr,  # [L, 2] (H, W)
    starts_ptr,  # [L]
    loc_ptr,  # [N, Lq, M, L, P, 2]
    attn_ptr,  # [N, Lq, M, L, P]
    out_ptr,  # [N, Lq, M * D]
    S,
    Lq,
    M,
    D,
    L,
    P,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: fp32, or fp64 for fp64 inputs
):
    head_offset, point0, tile_offsets, valid, d, d_ok = _program_tile(
        S, Lq, M, D, L, P, BLOCK_Q, BLOCK_D
    )
    row_stride = M * D
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    poisoned = tl.zeros([BLOCK_Q], dtype=tl.int1)  # queries with a NaN location
    for level in range(L):
        height, width, start = _level(shapes_ptr, starts_ptr, level)
        for p in range(P):
            point = point0 + level * P + p
            x0, y0, fx, fy, is_nan = _sampling_point(loc_ptr, point, valid, width, height, ACC)
            poisoned |= is_nan
            attention = tl.load(attn_ptr + point, mask=valid, other=0.0).to(ACC)
            for corner in tl.static_range(4):
                pixel, inside, weight, _, _ = _bilinear_corner(
                    x0, y0, fx, fy, width, height, valid, corner % 2, corner // 2
                )
                row, inside = _value_row(start, pixel, inside, S)
                rows = head_offset + row[:, None] * row_stride + d[None, :]
                tile = tl.load(value_ptr + rows, mask=inside[:, None] & d_ok[None, :], other=0.0)
                acc += (attention * weight)[:, None] * tile.to(ACC)
    acc = tl.where(poisoned[:, None], float("nan"), acc)
    tile_mask = valid[:, None] & d_ok[None, :]
    tl.store(out_ptr + tile_offsets, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _backward_kernel(
    value_ptr,  # [N, S, M, D]
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_out_ptr,  # [N, Lq, M * D]
    grad_value_ptr,  # [N, S, M, D] fp32, accumulated atomically
    grad_loc_ptr,  # [N, Lq, M, L, P, 2]
    grad_attn_ptr,  # [N, Lq, M, L, P]
    S,
    Lq,
    M,
    D,
    L,
    P,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: fp32, or fp64 for fp64 inputs
):
    head_offset, point0, tile_offsets, valid, d, d_ok = _program_tile(
        S, Lq, M, D, L, P, BLOCK_Q, BLOCK_D
    )
    row_stride = M * D
    grad_out = tl.load(
        grad_out_ptr + tile_offsets, mask=valid[:, None] & d_ok[None, :], other=0.0
    ).to(ACC)  # [BQ, BD]
    for level in range(L):
        height, width, start = _level(shapes_ptr, starts_ptr, level)
        for p in range(P):
            point = point0 + level * P + p
            x0, y0, fx, fy, _ = _sampling_point(loc_ptr, point, valid, width, height, ACC)
            attention = tl.load(attn_ptr + point, mask=valid, other=0.0).to(ACC)
            grad_attention = tl.zeros([BLOCK_Q], dtype=ACC)
            grad_x = tl.zeros([BLOCK_Q], dtype=ACC)
            grad_y = tl.zeros([BLOCK_Q], dtype=ACC)
            for corner in tl.static_range(4):
                pixel, inside, weight, dweight_dx, dweight_dy = _bilinear_corner(
                    x0, y0, fx, fy, width, height, valid, corner % 2, corner // 2
                )
                row, inside = _value_row(start, pixel, inside, S)
                offsets = head_offset + row[:, None] * row_stride + d[None, :]
                tile_mask = inside[:, None] & d_ok[None, :]
                tile = tl.load(value_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
                # grad_output . value[corner]: how the sample moves the output.
                dot = tl.sum(grad_out * tile, axis=1)  # [BQ]
                grad_attention += weight * dot
                grad_x += dweight_dx * dot
                grad_y += dweight_dy * dot
                tl.atomic_add(
                    grad_value_ptr + offsets,
                    (attention * weight)[:, None] * grad_out,
                    mask=tile_mask,
                )
            tl.store(grad_attn_ptr + point, grad_attention, mask=valid)
            # x = loc_x * W - 0.5, so d/d loc_x = W d/dx.
            tl.store(grad_loc_ptr + 2 * point, attention * grad_x * width, mask=valid)
            tl.store(grad_loc_ptr + 2 * point + 1, attention * grad_y * height, mask=valid)


def _grid(value: Tensor, sampling_locations: Tensor, config: LaunchConfig) -> tuple[int, int]:
    num_queries = sampling_locations.shape[1]
    return (triton.cdiv(num_queries, config.block_q), value.shape[0] * value.shape[2])


def _sizes(value: Tensor, sampling_locations: Tensor, config: LaunchConfig) -> dict:
    """The kernels' size arguments and compile-time constants, and the launch's warps."""
    _, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    accumulate = tl.float64 if value.dtype == torch.float64 else tl.float32
    block_d = triton.next_power_of_2(D)
    return dict(
        S=S,
        Lq=Lq,
        M=M,
        D=D,
        L=L,
        P=P,
        BLOCK_Q=config.block_q,
        BLOCK_D=block_d,
        ACC=accumulate,
        num_warps=config.num_warps,
    )


def alert_not_deterministic() -> None:
    """Under ``torch.use_deterministic_algorithms(True)``, what torch's own non-deterministic
    operators do: raise, or warn with ``warn_only=True``. The backward's atomic additions into
    grad_value sum in whatever order the GPU runs them."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        "ms_deform_attn's Triton backward is not deterministic (atomic additions into grad_value)"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
        return
    raise RuntimeError(
        f"{message}, but torch.use_deterministic_algorithms(True) is set; "
        "torch.use_deterministic_algorithms(True, warn_only=True) allows it"
    )


def _launch(kernel, config: LaunchConfig, value: Tensor, *tensors: Tensor) -> None:
    """Runs ``kernel`` on ``(value, *tensors)`` over its grid, sizes from value and the sampling
    locations (``tensors[2]``), on value's GPU: Triton launches on the current device and its
    stream (CPU tensors run in Triton's interpreter)."""
    sampling_locations = tensors[2]
    guard = torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext()
    with guard:
        kernel[_grid(value, sampling_locations, config)](
            value, *tensors, **_sizes(value, sampling_locations, config)
        )


def _accumulation_dtype(value: Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def forward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    config: LaunchConfig = FORWARD_CONFIG,
) -> Tensor:
    """``[N, Lq, M * D]`` in value's dtype; contiguous inputs, shapes as in
    :func:`detrkit.ops.ms_deform_attn`."""
    N, _, M, D = value.shape
    output = value.new_empty(N, sampling_locations.shape[1], M * D)
    _launch(
        _forward_kernel,
        config,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        output,
    )
    return output


def backward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    grad_output: Tensor,
    config: LaunchConfig = BACKWARD_CONFIG,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_value, grad_sampling_locations, grad_attention_weights)`` in the inputs' dtypes."""
    # Many (query, point) pairs add into the same value rows: accumulate them in fp32 (fp64).
    accumulate = dict(dtype=_accumulation_dtype(value), device=value.device)
    grad_value = torch.zeros(value.shape, **accumulate)
    grad_locations = torch.empty(sampling_locations.shape, **accumulate)
    grad_weights = torch.empty(attention_weights.shape, **accumulate)
    alert_not_deterministic()
    _launch(
        _backward_kernel,
        config,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        grad_output,
        grad_value,
        grad_locations,
        grad_weights,
    )
    return (
        grad_value.to(value.dtype),
        grad_locations.to(sampling_locations.dtype),
        grad_weights.to(attention_weights.dtype),
    )
