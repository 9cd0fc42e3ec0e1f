"""DETR: a ResNet, a transformer and set prediction heads (Carion et al., 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.models.backbone import Joiner, ResNetBackbone
from detrkit.models.config import DETRConfig
from detrkit.models.denoising import DenoisingQueries
from detrkit.models.heads import MLP
from detrkit.models.position_encoding import build_position_encoding
from detrkit.models.transformer import Transformer


class DETR(nn.Module):
    """Detects up to ``num_queries`` objects per image.

    Call ``model(images, mask)`` with ``images`` ``[B, 3, H, W]`` normalised with ImageNet mean/std
    and ``mask`` ``[B, H, W]`` True on padding (None: no padding). Returns ``pred_logits``
    ``[B, Q, num_classes + 1]`` (the last is "no object"), ``pred_boxes`` ``[B, Q, 4]`` (normalised
    cx, cy, w, h) and, with ``aux_loss``, ``aux_outputs``: the same for every earlier decoder layer.
    In training, ``denoising`` (:class:`~detrkit.models.denoising.DenoisingQueries`) adds
    denoising queries to the decoder; their predictions come as ``dn_outputs``, the others' are
    those of the call without them.
    """

    def __init__(self, config: DETRConfig) -> None:
        super().__init__()
        self.config = config
        hidden_dim = config.hidden_dim
        # Attribute order follows the original, so state_dict keys come out in its order too.
        self.transformer = Transformer(
            d_model=hidden_dim,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            normalize_before=config.pre_norm,
        )
        self.class_embed = nn.Linear(hidden_dim, config.num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(config.num_queries, hidden_dim)
        backbone = ResNetBackbone(
            config.backbone, config.dilation, return_layers=("layer4",), norm=config.backbone_norm
        )
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        position_embedding = build_position_encoding(config.position_embedding, hidden_dim)
        self.backbone = Joiner(backbone, position_embedding)

    def forward(
        self,
        images: Tensor,
        mask: Tensor | None = None,
        denoising: DenoisingQueries | None = None,
    ) -> dict:
        if mask is None:
            mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        features, masks, positions = self.backbone(images, mask)
        src = self.input_proj(features[-1])  # [B, C, H/32, W/32]
        query_embed = self.query_embed.weight
        hs, _ = self.transformer(src, masks[-1], query_embed, positions[-1], denoising)
        if denoising is None:
            return self.heads(hs)
        dn = denoising.num_queries  # the denoising queries come first
        out = self.heads(hs[:, :, dn:])
        out["dn_outputs"] = self.heads(hs[:, :, :dn])
        return out

    def heads(self, hs: Tensor) -> dict:
        """Class logits and boxes of every decoder layer's outputs ``hs`` ``[L, B, Q, C]``."""
        outputs_class = self.class_embed(hs)  # [L, B, Q, num_classes + 1]
        outputs_coord = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4] normalised cx, cy, w, h
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.config.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1])
            ]
        return out
