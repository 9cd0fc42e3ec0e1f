"""Deformable DETR (Zhu et al., 2021), with its iterative box refinement and two-stage variants."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from detrkit.models.backbone import Joiner, ResNetBackbone, resize_mask
from detrkit.models.config import DeformableDETRConfig
from detrkit.models.deformable_transformer import (
    DeformableTransformer,
    refine_boxes,
)
from detrkit.models.denoising import DenoisingQueries
from detrkit.models.heads import MLP
from detrkit.models.position_encoding import build_position_encoding


def _repeat(module: nn.Module, n: int, shared: bool) -> nn.ModuleList:
    """``n`` independent copies, or the same module ``n`` times (one set of weights, listed under
    every index in the state dict, as the original's checkpoints list them)."""
    return nn.ModuleList(module if shared else copy.deepcopy(module) for _ in range(n))


class DeformableDETR(nn.Module):
    """Detects up to ``num_queries`` objects per image from multi-scale features.

    Same call as :class:`~detrkit.models.detr.DETR`: ``model(images, mask)`` returns
    ``pred_logits`` ``[B, Q, num_classes]`` (sigmoid scores, no "no object" class), ``pred_boxes``
    ``[B, Q, 4]`` normalised (cx, cy, w, h), ``aux_outputs`` and, two-stage, ``enc_outputs``.
    In training, ``denoising`` (:class:`~detrkit.models.denoising.DenoisingQueries`) adds
    denoising queries to the decoder; their predictions come as ``dn_outputs`` (``pred_logits``,
    ``pred_boxes`` and ``aux_outputs``), the others' are those of the call without them.
    """

    def __init__(self, config: DeformableDETRConfig) -> None:
        super().__init__()
        self.config = config
        hidden_dim = config.hidden_dim
        self.num_feature_levels = config.num_feature_levels
        self.transformer = DeformableTransformer(
            d_model=hidden_dim,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            num_feature_levels=config.num_feature_levels,
            dec_n_points=config.dec_n_points,
            enc_n_points=config.enc_n_points,
            two_stage=config.two_stage,
            two_stage_num_proposals=config.num_queries,
        )
        class_embed = nn.Linear(hidden_dim, config.num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not config.two_stage:
            self.query_embed = nn.Embedding(config.num_queries, hidden_dim * 2)  # position, content

        # The last stages of the ResNet (C3-C5 at most); levels beyond them are stride-2 convs.
        return_layers = ("layer2", "layer3", "layer4")[-min(config.num_feature_levels, 3) :]
        backbone = ResNetBackbone(
            config.backbone, config.dilation, return_layers, norm=config.backbone_norm
        )
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)
            )
            for channels in backbone.num_channels
        )
        in_channels = backbone.num_channels[-1]
        for _ in range(config.num_feature_levels - len(backbone.num_channels)):
            # Extra levels: stride-2 convs, the first on C5, the next on the previous extra level.
            self.input_proj.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(32, hidden_dim),
                )
            )
            in_channels = hidden_dim
        position_embedding = build_position_encoding(
            config.position_embedding, hidden_dim, offset=-0.5
        )
        self.backbone = Joiner(backbone, position_embedding)

        # Initialisation as the original: a prior of 0.01 for every class, boxes start at the
        # reference point with a small size.
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        # One head per decoder layer (plus one for the encoder's proposals, two-stage): shared
        # weights, or independent ones for box refinement.
        num_pred = config.dec_layers + (1 if config.two_stage else 0)
        shared = not config.with_box_refine
        if shared:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
        self.class_embed = _repeat(class_embed, num_pred, shared)
        self.bbox_embed = _repeat(bbox_embed, num_pred, shared)
        if config.with_box_refine:
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        if config.two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.zeros_(box_embed.layers[-1].bias[2:])

        # Attribute order of the original (state_dict keys in its order): transformer, heads,
        # query embedding, input projections, backbone.
        for name in ("class_embed", "bbox_embed", "query_embed", "input_proj", "backbone"):
            if name in self._modules:
                self._modules[name] = self._modules.pop(name)

    def forward(
        self,
        images: Tensor,
        mask: Tensor | None = None,
        denoising: DenoisingQueries | None = None,
    ) -> dict:
        if mask is None:
            mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        features, masks, positions = self.backbone(images, mask)
        srcs = [proj(feature) for proj, feature in zip(self.input_proj, features)]
        masks, positions = list(masks), list(positions)
        for level in range(len(features), self.num_feature_levels):
            src = self.input_proj[level](features[-1] if level == len(features) else srcs[-1])
            level_mask = resize_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            positions.append(self.backbone[1](level_mask).to(src.dtype))

        query_embed = None if self.config.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, positions, query_embed, denoising
        )  # hs: [L, B, Q, C] (denoising queries first, when given)

        outputs_classes, outputs_coords = [], []
        for layer in range(hs.shape[0]):
            # Layer l predicts relative to the references it received.
            reference = init_reference if layer == 0 else inter_references[layer - 1]
            delta = self.bbox_embed[layer](hs[layer])  # [B, Q, 4] in inverse-sigmoid space
            coord = refine_boxes(delta, reference)
            outputs_classes.append(self.class_embed[layer](hs[layer]))  # [B, Q, num_classes]
            outputs_coords.append(coord.sigmoid())  # [B, Q, 4] normalised cx, cy, w, h

        if denoising is None:
            out = self.layer_outputs(outputs_classes, outputs_coords)
        else:  # the denoising queries' predictions apart from the object queries'
            dn = denoising.num_queries
            out = self.layer_outputs(
                [c[:, dn:] for c in outputs_classes], [b[:, dn:] for b in outputs_coords]
            )
            out["dn_outputs"] = self.layer_outputs(
                [c[:, :dn] for c in outputs_classes], [b[:, :dn] for b in outputs_coords]
            )
        if self.config.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out

    def layer_outputs(self, classes: list[Tensor], coords: list[Tensor]) -> dict:
        """The final layer's logits and boxes, and with ``aux_loss`` every earlier layer's."""
        out = {"pred_logits": classes[-1], "pred_boxes": coords[-1]}
        if self.config.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(classes[:-1], coords[:-1])
            ]
        return out
