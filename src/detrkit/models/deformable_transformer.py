"""Deformable DETR's encoder-decoder: multi-scale deformable attention over all feature levels.

Sequences are batch-first. ``spatial_shapes`` ``[L, 2]`` (H, W), ``level_start_index`` ``[L]`` and
``valid_ratios`` ``[B, L, 2]`` (the unpadded fraction of each level, (w, h)) are computed once per
forward and shared by every layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.models.deformable_attention import MSDeformAttn
from detrkit.models.denoising import DenoisingQueries
from detrkit.models.transformer import AddNorm, clones, heads_mask, with_pos


class ImageTooSmallError(ValueError):
    """Raised when images give two-stage Deformable DETR fewer encoder positions than the
    proposals it takes from them."""


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), clamped so that 0 and 1 map to finite values."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """A box head's output ``delta`` ``[B, Q, 4]`` applied to reference points ``[B, Q, 2]`` or
    boxes ``[B, Q, 4]`` (normalised): the boxes in inverse-sigmoid space. A point reference moves
    the centre only; the size is the head's own."""
    if reference.shape[-1] == 4:
        return delta + inverse_sigmoid(reference)
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1)


class DeformableTransformerEncoderLayer(AddNorm, nn.Module):
    """Deformable self-attention over all levels' pixels, then an MLP (post-norm)."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def feed_forward(self, src: Tensor) -> Tensor:
        """The MLP block: ``norm2(src + linear2(relu(linear1(src))))``."""
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.add_norm(self.norm2, src, self.dropout3(src2))

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        # src, pos: [B, S, C]; reference_points: [B, S, L, 2]; the query is the pixel + its position
        src2 = self.self_attn(
            with_pos(src, pos),
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        src = self.add_norm(self.norm1, src, self.dropout1(src2))
        return self.feed_forward(src)


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = clones(layer, num_layers)

    @staticmethod
    def get_reference_points(
        shapes: list[tuple[int, int]], valid_ratios: Tensor, device: torch.device
    ) -> Tensor:
        """Every level's pixel centres, normalised by the image's unpadded extent on that level and
        projected onto every level: ``[B, S, L, 2]`` (x, y)."""
        reference_points = []
        for level, (height, width) in enumerate(shapes):
            # arange, not linspace: under torch.export linspace fixes its length to the export size
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            reference_points.append(torch.stack((ref_x, ref_y), -1))  # [B, H*W, 2]
        reference_points = torch.cat(reference_points, 1)  # [B, S, 2] in the valid area's units
        return reference_points[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]

    def forward(
        self,
        src: Tensor,
        shapes: list[tuple[int, int]],
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        reference_points = self.get_reference_points(shapes, valid_ratios, src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableTransformerDecoderLayer(AddNorm, nn.Module):
    """Self-attention among queries, deformable cross-attention to the memory, then an MLP."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def feed_forward(self, tgt: Tensor) -> Tensor:
        """The MLP block: ``norm3(tgt + linear2(relu(linear1(tgt))))``."""
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.add_norm(self.norm3, tgt, self.dropout4(tgt2))

    def self_attention(
        self, tgt: Tensor, query_pos: Tensor, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Queries attend to each other: Q = K = tgt + query_pos, V = tgt. ``attn_mask``
        ``[B, Q, Q]``, True where a query may not look (denoising training), or None."""
        q = k = with_pos(tgt, query_pos)
        attn_mask = heads_mask(attn_mask, self.self_attn.num_heads)
        return self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        # tgt, query_pos: [B, Q, C]; reference_points: [B, Q, L, 2 or 4]; memory: [B, S, C]
        attended = self.self_attention(tgt, query_pos, self_attn_mask)
        tgt = self.add_norm(self.norm2, tgt, self.dropout2(attended))
        tgt2 = self.cross_attn(
            with_pos(tgt, query_pos),
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
        )
        tgt = self.add_norm(self.norm1, tgt, self.dropout1(tgt2))
        return self.feed_forward(tgt)


class DeformableTransformerDecoder(nn.Module):
    """Returns every layer's output and the reference points each layer's prediction is relative
    to. With box refinement (``bbox_embed`` set by the detector, one head per layer), every layer
    moves the reference boxes; the new references are detached, as in the original."""

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        # Set by DeformableDETR for box refinement / two-stage; registered then, after the layers,
        # which is where the original checkpoints list them.
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        query_pos: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``reference_points``: ``[B, Q, 2]`` points or ``[B, Q, 4]`` boxes, normalised;
        ``self_attn_mask``: the queries' self-attention mask (denoising training), or None.
        Returns ``[L, B, Q, C]`` outputs and ``[L, B, Q, 2 or 4]`` references."""
        intermediate, intermediate_reference_points = [], []
        for layer_index, layer in enumerate(self.layers):
            # Project the references onto every level's valid area: [B, Q, L, 2 or 4]
            ratios = (
                valid_ratios if reference_points.shape[-1] == 2 else valid_ratios.repeat(1, 1, 2)
            )
            reference_points_input = reference_points[:, :, None] * ratios[:, None]
            tgt = layer(
                tgt,
                query_pos,
                reference_points_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                self_attn_mask,
            )
            if self.bbox_embed is not None:
                delta = self.bbox_embed[layer_index](tgt)  # [B, Q, 4] in inverse-sigmoid space
                reference_points = refine_boxes(delta, reference_points).sigmoid().detach()
            intermediate.append(tgt)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)


class DeformableTransformer(nn.Module):
    """Flattens the feature levels, encodes them, and decodes ``num_queries`` object queries,
    whose positions come from a learned embedding or, two-stage, from the encoder's proposals."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ) -> None:
        super().__init__()
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.encoder = DeformableTransformerEncoder(
            DeformableTransformerEncoderLayer(
                d_model,
                dim_feedforward,
                dropout,
                num_feature_levels,
                nhead,
                enc_n_points,
            ),
            num_encoder_layers,
        )
        self.decoder = DeformableTransformerDecoder(
            DeformableTransformerDecoderLayer(
                d_model,
                dim_feedforward,
                dropout,
                num_feature_levels,
                nhead,
                dec_n_points,
            ),
            num_decoder_layers,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """The unpadded fraction of a level's width and height per image: ``[B, 2]`` (w, h)."""
        _, height, width = mask.shape
        valid_height = (~mask[:, :, 0]).sum(1)
        valid_width = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)

    @staticmethod
    def get_proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128) -> Tensor:
        """Sine encoding of proposal boxes given in inverse-sigmoid space: ``[B, K, 4]`` ->
        ``[B, K, 4 * num_pos_feats]`` (``num_pos_feats = d_model / 2``, 128 in the original)."""
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid() * (2 * math.pi)
        pos = pos[:, :, :, None] / dim_t  # [B, K, 4, F]
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(
        self, memory: Tensor, memory_padding_mask: Tensor, shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """One proposal box per memory position: centred on its pixel, sized 0.05 * 2**level.
        Padded positions and proposals too close to the border get +inf (never chosen) and zeroed
        memory. Returns the projected memory ``[B, S, C]`` and proposals ``[B, S, 4]``
        (inverse-sigmoid space)."""
        batch = memory.shape[0]
        proposals = []
        start = 0
        for level, (height, width) in enumerate(shapes):
            level_mask = memory_padding_mask[:, start : start + height * width]
            level_mask = level_mask.view(batch, height, width)
            valid_height = (~level_mask[:, :, 0]).sum(1)
            valid_width = (~level_mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=memory.device),
                torch.arange(width, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)  # [H, W, 2]
            scale = torch.stack([valid_width, valid_height], 1).view(batch, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * (2.0**level))
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += height * width
        output_proposals = torch.cat(proposals, 1)  # [B, S, 4] normalised cx, cy, w, h
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        invalid = memory_padding_mask.unsqueeze(-1) | ~valid
        output_proposals = output_proposals.masked_fill(invalid, float("inf"))
        output_memory = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(output_memory)), output_proposals

    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos_embeds: list[Tensor],
        query_embed: Tensor | None = None,
        denoising: DenoisingQueries | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """
        Args:
            srcs, masks, pos_embeds: per level ``[B, C, H_l, W_l]``, ``[B, H_l, W_l]``, ``[B, C, H_l, W_l]``.
            query_embed: ``[Q, 2C]`` learned query position and content (None for two-stage).
            denoising: training only: denoising queries decoded before the object queries,
                under their attention mask (their outputs come first in every result).

        Returns:
            decoder outputs ``[L, B, Q, C]``, initial reference points ``[B, Q, 2 or 4]``, every
            layer's reference points ``[L, B, Q, 2 or 4]``, and for two-stage the encoder's class
            logits ``[B, S, C]`` and proposal boxes ``[B, S, 4]`` (inverse-sigmoid space).
        """
        # Level sizes as Python ints for loops (symbolic when traced) and as the tensor the
        # operator takes. The tensor is stacked from scalars: torch.as_tensor would turn traced
        # sizes into constants of the export size.
        shapes = [(src.shape[-2], src.shape[-1]) for src in srcs]
        spatial_shapes = torch.stack(
            [srcs[0].new_full((), size, dtype=torch.long) for shape in shapes for size in shape]
        ).view(-1, 2)  # [L, 2]
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )  # [L]
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)  # [B, L, 2]
        src_flatten, mask_flatten, lvl_pos_embed_flatten = [], [], []
        for level, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            src_flatten.append(src.flatten(2).transpose(1, 2))  # [B, H_l * W_l, C]
            mask_flatten.append(mask.flatten(1))  # [B, H_l * W_l]
            pos_embed = pos_embed.flatten(2).transpose(1, 2)  # [B, H_l * W_l, C]
            # The sine position says where a pixel is; the learned level embedding, on which map.
            lvl_pos_embed = pos_embed + self.level_embed[level].view(1, 1, -1)
            lvl_pos_embed_flatten.append(lvl_pos_embed)
        src_flatten = torch.cat(src_flatten, 1)  # [B, S, C], S = sum of H_l * W_l
        mask_flatten = torch.cat(mask_flatten, 1)  # [B, S]
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)  # [B, S, C]

        memory = self.encoder(
            src_flatten,
            shapes,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            lvl_pos_embed_flatten,
            mask_flatten,
        )

        batch, _, channels = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(
                memory, mask_flatten, shapes
            )
            # The extra (last) heads score and refine a proposal at every memory position.
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = (
                self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            )
            # Class-agnostic: proposals are ranked by their first logit, the encoder loss's label.
            topk = self.two_stage_num_proposals
            # Not when tracing: a dynamic size compared here would become a guard on the export.
            if memory.shape[1] < topk and not torch.compiler.is_compiling():
                raise ImageTooSmallError(
                    f"two-stage Deformable DETR takes its {topk} queries from the encoder's "
                    f"positions, but these images give only {memory.shape[1]} (feature maps "
                    f"{shapes}): the images are too small for two_stage_num_proposals={topk}"
                )
            topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]  # [B, K]
            topk_coords_unact = torch.gather(
                enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).expand(-1, -1, 4)
            ).detach()  # [B, K, 4]
            reference_points = topk_coords_unact.sigmoid()
            # The sine encoding is computed in fp32; it goes in in the model's dtype.
            proposal_pos = self.get_proposal_pos_embed(topk_coords_unact, channels // 2)
            pos_trans_out = self.pos_trans_norm(self.pos_trans(proposal_pos.to(memory.dtype)))
            query_pos, tgt = torch.split(pos_trans_out, channels, dim=2)  # [B, K, C] each
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)  # [Q, C] each
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]
        self_attn_mask = None
        if denoising is not None:  # DN-DETR: noised objects as extra queries, in front
            tgt = torch.cat([denoising.content.to(tgt.dtype), tgt], 1)
            query_pos = torch.cat([denoising.position.to(query_pos.dtype), query_pos], 1)
            reference_points = torch.cat(
                [denoising.reference.to(reference_points.dtype), reference_points], 1
            )
            self_attn_mask = denoising.attn_mask
        init_reference = reference_points

        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            mask_flatten,
            self_attn_mask,
        )
        return hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact
