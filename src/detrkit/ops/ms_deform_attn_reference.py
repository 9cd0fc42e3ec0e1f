"""Multi-scale deformable attention in plain PyTorch: the ground truth for the fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinear sampling of every level with ``grid_sample``, then the attention-weighted sum.

    Shapes as in :func:`detrkit.ops.ms_deform_attn`; returns ``[N, Lq, M * D]``. Reads the values
    of ``spatial_shapes`` (``level_start_index`` is implied by them), so under ``torch.compile``
    it breaks the graph.
    """
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)  # L x [N, H*W, M, D]
    # grid_sample wants [-1, 1]; with align_corners=False its pixel centres match the
    # normalised (i + 0.5) / size convention of the locations.
    sampling_grids = 2 * sampling_locations - 1  # [N, Lq, M, L, P, 2]

    samples = []
    for level, (h, w) in enumerate(shapes):
        value_l = value_per_level[level].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        samples.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # [N*M, D, Lq, P]
    samples = torch.stack(samples, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]

    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    output = (samples * weights).sum(-1)  # [N*M, D, Lq]
    return output.view(N, M * D, Lq).transpose(1, 2).contiguous()  # [N, Lq, M*D]
