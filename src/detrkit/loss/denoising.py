"""Denoising training (Li et al., DN-DETR, 2022): noised ground truth as extra decoder queries.

Each training step, :class:`Denoiser` makes ``groups`` noised copies of every image's objects:
labels flipped to a random class with probability ``label_noise``, box centres moved by up to
``box_noise`` times half the box's size and widths and heights scaled by a factor in
``[1 - box_noise, 1 + box_noise]``. The copies go into the decoder as
:class:`~detrkit.models.denoising.DenoisingQueries` (content: an embedding of the noised label;
position: of the noised box), and :class:`~detrkit.loss.criterion.SetCriterion` trains each to
give back its object, with no matching. Only training uses them: the model's weights and its
checkpoints are those of a model trained without.

The embeddings are this module's own parameters, trained beside the model's and kept in the
training checkpoint (not in the model's state dict). A two-stage Deformable DETR positions the
noised boxes as it positions its proposals (``pos_trans`` of the box's sine embedding, as
DN-Deformable-DETR); DETR and the other Deformable DETRs, whose queries have learned positions,
get them from a small MLP of the same sine embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.models.config import DeformableDETRConfig, DETRSegmentationConfig, ModelConfig
from detrkit.models.deformable_transformer import DeformableTransformer, inverse_sigmoid
from detrkit.models.denoising import DenoisingQueries, denoising_attention_mask
from detrkit.models.heads import MLP

# DN-DETR's defaults: 5 groups, label noise 0.2, box noise 0.4.
DEFAULT_GROUPS = 5
DEFAULT_LABEL_NOISE = 0.2
DEFAULT_BOX_NOISE = 0.4


class Denoiser(nn.Module):
    """Makes the denoising queries of a batch for a model of config ``config``.

    ``label_embed``: ``num_classes + 1`` embeddings (the last for padding slots); ``position``
    (all but two-stage Deformable DETR): the MLP from a box's sine embedding to a positional
    query.
    """

    def __init__(
        self,
        config: ModelConfig,
        groups: int = DEFAULT_GROUPS,
        label_noise: float = DEFAULT_LABEL_NOISE,
        box_noise: float = DEFAULT_BOX_NOISE,
    ) -> None:
        super().__init__()
        if isinstance(config, DETRSegmentationConfig):
            raise ValueError(
                "denoising trains detectors (DETR, Deformable DETR), not a panoptic model: "
                "train its detector with denoising first, then the mask head without"
            )
        if groups < 1:
            raise ValueError(f"denoising groups must be at least 1, got {groups}")
        if not 0 <= label_noise <= 1:
            raise ValueError(f"label noise must be in [0, 1], got {label_noise}")
        if not 0 <= box_noise < 1:
            raise ValueError(f"box noise must be in [0, 1), got {box_noise}")
        self.groups = groups
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.num_classes = config.num_classes
        self.num_queries = config.num_queries
        self.deformable = isinstance(config, DeformableDETRConfig)
        self.two_stage = self.deformable and config.two_stage
        hidden_dim = config.hidden_dim
        self.label_embed = nn.Embedding(config.num_classes + 1, hidden_dim)
        if not self.two_stage:
            self.position = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)

    def noised(self, labels: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """``labels`` ``[...]`` and ``boxes`` ``[..., 4]`` (normalised cx, cy, w, h) with noise."""
        flip = torch.rand(labels.shape, device=labels.device) < self.label_noise
        random_labels = torch.randint_like(labels, 0, self.num_classes)
        labels = torch.where(flip, random_labels, labels)
        centre, size = boxes[..., :2], boxes[..., 2:]
        shift = (torch.rand_like(centre) * 2 - 1) * self.box_noise * size / 2
        scale = 1 + (torch.rand_like(size) * 2 - 1) * self.box_noise
        boxes = torch.cat([centre + shift, size * scale], -1).clamp(0, 1)
        return labels, boxes

    def forward(self, model: nn.Module, targets: list[dict]) -> DenoisingQueries | None:
        """The denoising queries for ``targets`` (one dict per image, ``labels`` ``[N]`` and
        ``boxes`` ``[N, 4]``) to decode with ``model`` (the detector of the config this
        denoiser was made for; two-stage, its ``pos_trans`` positions them). None when the
        batch holds no object."""
        counts = [len(target["labels"]) for target in targets]
        size = max(counts, default=0)
        if size == 0:
            return None
        device = self.label_embed.weight.device
        batch, groups = len(targets), self.groups
        # Every group holds `size` slots per image: its objects, then padding.
        labels = torch.full((batch, size), self.num_classes, dtype=torch.long, device=device)
        boxes = torch.full((batch, size, 4), 0.5, device=device)
        for index, (target, count) in enumerate(zip(targets, counts)):
            labels[index, :count] = target["labels"].to(device)
            boxes[index, :count] = target["boxes"].to(device, torch.float32)
        labels = labels[:, None].expand(-1, groups, -1)
        boxes = boxes[:, None].expand(-1, groups, -1, -1)
        noised_labels, noised_boxes = self.noised(labels, boxes)
        is_object = labels < self.num_classes
        noised_labels = torch.where(is_object, noised_labels, labels)  # padding stays padding
        noised_labels = noised_labels.reshape(batch, groups * size)  # [B, D]
        noised_boxes = noised_boxes.reshape(batch, groups * size, 4)  # [B, D, 4]

        content = self.label_embed(noised_labels)  # [B, D, C]
        hidden_dim = content.shape[-1]
        sine = DeformableTransformer.get_proposal_pos_embed(
            inverse_sigmoid(noised_boxes), hidden_dim // 2
        )  # [B, D, 2C]
        if self.two_stage:  # as the proposals: the positional half of pos_trans's output
            transformer = model.transformer
            position = transformer.pos_trans_norm(transformer.pos_trans(sine))[..., :hidden_dim]
            reference = noised_boxes
        else:
            position = self.position(sine)
            # Deformable DETR's object queries have reference points: the noised centres.
            reference = noised_boxes[..., :2] if self.deformable else None

        image, group, slot = torch.nonzero(is_object, as_tuple=True)
        return DenoisingQueries(
            content=content,
            position=position,
            reference=reference,
            attn_mask=denoising_attention_mask(counts, groups, self.num_queries, device),
            groups=groups,
            group_size=size,
            batch_index=image,
            query_index=group * size + slot,
            target_index=slot,
        )
