"""Turning raw detector outputs into detections in image coordinates."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from detrkit.models.config import ModelConfig
from detrkit.models.kinds import CLASSIFICATIONS, kind_of


class PostProcess(nn.Module):
    """Scores, labels and absolute xyxy boxes in each image's original size.

    ``"softmax"`` (DETR): softmax over classes with "no object" dropped; every query gives one
    detection, its best class. ``"sigmoid"`` (Deformable DETR): independent class probabilities;
    the ``num_select`` best (query, class) pairs over all queries and classes.
    """

    def __init__(self, classification: str = "softmax", num_select: int = 100) -> None:
        super().__init__()
        if classification not in CLASSIFICATIONS:
            raise ValueError(
                f"classification must be one of {CLASSIFICATIONS}, got {classification!r}"
            )
        self.classification = classification
        self.num_select = num_select

    @classmethod
    def for_config(cls, config: ModelConfig) -> PostProcess:
        """The post-processing of the original code for this kind of model."""
        return cls(kind_of(config).classification)

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """
        Args:
            outputs: the model's output (``pred_logits`` ``[B, Q, C(+1)]``, ``pred_boxes`` ``[B, Q, 4]``).
            target_sizes: ``[B, 2]`` each image's original (height, width).

        Returns:
            per image a dict of ``scores`` ``[K]``, ``labels`` ``[K]``, ``boxes`` ``[K, 4]`` xyxy
            and ``queries`` ``[K]`` (the object query each came from), sorted by query (softmax,
            K = Q) or by score (sigmoid, K = num_select).
        """
        found = self.batched(outputs, target_sizes)
        return [dict(zip(found, values)) for values in zip(*found.values())]

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """``pred_logits`` ``[B, Q, C(+1)]`` -> the probability of every class ``[B, Q, C]``
        ("no object" dropped)."""
        logits = logits.float()
        if self.classification == "softmax":
            return logits.softmax(-1)[..., :-1]
        return logits.sigmoid()

    @torch.no_grad()
    def batched(self, outputs: dict, target_sizes: Tensor) -> dict[str, Tensor]:
        """:meth:`forward` for the whole batch at once: ``scores``, ``labels``, ``queries``
        ``[B, K]`` and ``boxes`` ``[B, K, 4]``. Never splits the batch, so that an exported graph
        keeps its batch size dynamic."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        # shape[0], not len(): len() must return an int, which fixes a traced batch size.
        if logits.shape[0] != target_sizes.shape[0]:
            raise ValueError(
                f"target_sizes has {target_sizes.shape[0]} entries for a batch of {logits.shape[0]}"
            )
        boxes = box_convert(boxes, "cxcywh", "xyxy")  # [B, Q, 4] normalised
        prob = self.class_probabilities(logits)  # [B, Q, C]
        if self.classification == "softmax":
            scores, labels = prob.max(-1)  # [B, Q]
            query = torch.arange(logits.shape[1], device=logits.device).expand_as(labels)
        else:
            batch, _, num_classes = logits.shape
            prob = prob.view(batch, -1)  # [B, Q*C]
            k = min(self.num_select, prob.shape[1])
            scores, index = torch.topk(prob, k, dim=1)  # [B, K]
            labels = index % num_classes
            query = index // num_classes
            boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))  # [B, K, 4]
        height, width = target_sizes.to(boxes.device).float().unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)  # [B, 4]
        boxes = boxes * scale[:, None, :]
        return {"scores": scores, "labels": labels, "boxes": boxes, "queries": query}
