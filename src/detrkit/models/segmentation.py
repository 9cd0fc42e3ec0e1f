"""DETR's mask head for panoptic segmentation (Carion et al., 2020, section 4.4).

A trained DETR stays as it is, under ``detr``. Each decoder output attends to the encoder memory
with a multi-head attention map (``bbox_attention``: only the weights, no values); the maps of a
query, one per head, join the projected C5 features and go through a small FPN-like stack of 3x3
convolutions (``mask_head``), which adds the backbone's C4, C3 and C2 on the way up, to one mask
logit map per query at stride 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.models.backbone import RESNET_CHANNELS, ResNetBackbone
from detrkit.models.config import DETRSegmentationConfig
from detrkit.models.detr import DETR

GROUPS = 8  # group norm groups of the mask head


class MHAttentionMap(nn.Module):
    """The attention weights of every query over every memory position, per head:
    ``softmax(q k^T / sqrt(C / M))``, normalised jointly over the heads and positions of a
    query, as the original normalises them."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """``q`` ``[B, Q, C]`` decoder outputs, ``k`` ``[B, C, H, W]`` the memory, ``mask``
        ``[B, H, W]`` True on padding. Returns ``[B, Q, M, H, W]``."""
        q = self.q_linear(q)
        # k_linear applied at every position: a 1x1 convolution with its weights.
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        batch, queries, _ = q.shape
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(batch, queries, self.num_heads, head_dim)  # [B, Q, M, C/M]
        kh = k.view(batch, self.num_heads, head_dim, *k.shape[-2:])  # [B, M, C/M, H, W]
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        weights = F.softmax(weights.flatten(2), dim=-1).view(weights.shape)
        return self.dropout(weights)


class MaskHeadSmallConv(nn.Module):
    """Query-wise masks from the C5 projection and the attention maps, upsampled three times
    with the backbone's C4, C3 and C2 added through 1x1 adapters: ``[B * Q, 1, H/4, W/4]``."""

    def __init__(self, dim: int, fpn_dims: list[int], context_dim: int) -> None:
        super().__init__()
        inter_dims = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(GROUPS, dim)
        self.lay2 = nn.Conv2d(dim, inter_dims[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(GROUPS, inter_dims[1])
        self.lay3 = nn.Conv2d(inter_dims[1], inter_dims[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(GROUPS, inter_dims[2])
        self.lay4 = nn.Conv2d(inter_dims[2], inter_dims[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(GROUPS, inter_dims[3])
        self.lay5 = nn.Conv2d(inter_dims[3], inter_dims[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(GROUPS, inter_dims[4])
        self.out_lay = nn.Conv2d(inter_dims[4], 1, 3, padding=1)
        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter_dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter_dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter_dims[3], 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: list[Tensor]) -> Tensor:
        """``x`` ``[B, C, H, W]`` projected C5, ``bbox_mask`` ``[B, Q, M, H, W]``, ``fpns`` the
        backbone's C4, C3, C2 ``[B, C_l, H_l, W_l]``."""
        queries = bbox_mask.shape[1]
        # Every query gets its own copy of the image features, with its attention maps beside.
        x = torch.cat([expand(x, queries), bbox_mask.flatten(0, 1)], 1)  # [B*Q, C + M, H, W]
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for adapter, lay, gn, fpn in zip(
            (self.adapter1, self.adapter2, self.adapter3),
            (self.lay3, self.lay4, self.lay5),
            (self.gn3, self.gn4, self.gn5),
            fpns,
        ):
            fpn = expand(adapter(fpn), queries)  # [B*Q, C', 2H, 2W]
            x = fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
            x = F.relu(gn(lay(x)))
        return self.out_lay(x)


def expand(tensor: Tensor, length: int) -> Tensor:
    """``[B, ...]`` -> ``[B * length, ...]``, each item repeated ``length`` times in a row."""
    return tensor.unsqueeze(1).repeat(1, length, *([1] * (tensor.dim() - 1))).flatten(0, 1)


class DETRSegmentation(nn.Module):
    """DETR (under ``detr``) with the mask head. Same call as :class:`DETR`; the outputs add
    ``pred_masks`` ``[B, Q, H/4, W/4]``, one mask logit map per query."""

    def __init__(self, config: DETRSegmentationConfig) -> None:
        super().__init__()
        self.config = config
        self.detr = DETR(config)
        # The mask head reads C2-C4 too: the same ResNet, returning every stage.
        self.detr.backbone[0] = ResNetBackbone(
            config.backbone,
            config.dilation,
            return_layers=("layer1", "layer2", "layer3", "layer4"),
            norm=config.backbone_norm,
        )
        hidden_dim, nheads = config.hidden_dim, config.nheads
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        channels = RESNET_CHANNELS[config.backbone]
        fpn_dims = [channels["layer3"], channels["layer2"], channels["layer1"]]
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, fpn_dims, hidden_dim)

    @property
    def backbone(self) -> nn.Module:
        """The detector's backbone (``detr.backbone``), where training code looks for it."""
        return self.detr.backbone

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict:
        detr = self.detr
        if mask is None:
            mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        features, masks, positions = detr.backbone(images, mask)  # C2, C3, C4, C5
        src = detr.input_proj(features[-1])  # [B, C, H/32, W/32]
        hs, memory = detr.transformer(src, masks[-1], detr.query_embed.weight, positions[-1])
        out = detr.heads(hs)
        # The last decoder layer's outputs attend to the memory: [B, Q, M, H/32, W/32].
        bbox_mask = self.bbox_attention(hs[-1], memory, mask=masks[-1])
        seg_masks = self.mask_head(src, bbox_mask, [features[2], features[1], features[0]])
        batch, queries = hs.shape[1], hs.shape[2]
        out["pred_masks"] = seg_masks.view(batch, queries, *seg_masks.shape[-2:])
        return out
