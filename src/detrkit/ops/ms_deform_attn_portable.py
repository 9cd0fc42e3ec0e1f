"""Multi-scale deformable attention from gathers and arithmetic only, for exported graphs.

The reference implementation needs every level's (H, W) as Python numbers to cut ``value`` into
images for ``grid_sample``; in a traced graph those numbers would become constants of the export
size. Here the level sizes stay tensors: bilinear sampling is written out as four gathers from the
flattened levels, with corner indices and weights computed from ``spatial_shapes`` and
``level_start_index`` inside the graph. Every runtime executes these operators (ONNX Gather,
Floor, Where, MatMul), at any image size.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The four corners of a bilinear cell as (dx, dy) steps from its top-left pixel.
_CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def ms_deform_attn_portable(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same contract and result as :func:`detrkit.ops.ms_deform_attn_reference` (bilinear, zeros
    outside the map, pixel centres at ``(i + 0.5) / size``); returns ``[N, Lq, M * D]``."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    # Per-level sizes and offsets, broadcast against [N, M, Lq, L, P].
    height = spatial_shapes[:, 0].view(1, 1, 1, L, 1)
    width = spatial_shapes[:, 1].view(1, 1, 1, L, 1)
    start = level_start_index.view(1, 1, 1, L, 1)

    # Heads next to the batch, so that one row index addresses (image, head, position).
    locations = sampling_locations.float().transpose(1, 2)  # [N, M, Lq, L, P, 2]
    weights = attention_weights.float().transpose(1, 2)  # [N, M, Lq, L, P]
    # Continuous pixel coordinates whose integer values are pixel centres.
    x = locations[..., 0] * width - 0.5
    y = locations[..., 1] * height - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0  # [N, M, Lq, L, P] position inside the cell
    x0, y0 = x0.long(), y0.long()

    rows = value.transpose(1, 2).reshape(N * M * S, D)  # [(n, m, s), D]
    row_offset = torch.arange(N * M, device=value.device).view(N, M, 1, 1, 1) * S
    output = value.new_zeros((N, M, Lq, 1, D), dtype=torch.float32)
    for dx, dy in _CORNERS:
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        # Corners off the map read zeros: their weight is zeroed and their index is any valid row.
        index = torch.where(inside, start + yi * width + xi, 0) + row_offset
        corner = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        weight = torch.where(inside, corner * weights, 0.0)  # [N, M, Lq, L, P]
        samples = rows.index_select(0, index.reshape(-1)).view(N, M, Lq, L * P, D)
        # Weighted sum over levels x points: [N, M, Lq, 1, L*P] @ [N, M, Lq, L*P, D]
        output = output + weight.view(N, M, Lq, 1, L * P) @ samples.float()
    # [N, M, Lq, 1, D] -> [N, Lq, M * D]
    return output.view(N, M, Lq, D).transpose(1, 2).reshape(N, Lq, M * D).to(value.dtype)
