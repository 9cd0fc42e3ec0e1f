"""Turning raw DETR outputs into detections in image coordinates."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Softmax over classes with "no object" dropped; every query gives one detection, its best
    class. Boxes become absolute xyxy in each image's original size."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """
        Args:
            outputs: the model's output (``pred_logits`` ``[B, Q, C+1]``, ``pred_boxes`` ``[B, Q, 4]``).
            target_sizes: ``[B, 2]`` each image's original (height, width).

        Returns:
            per image a dict of ``scores`` ``[Q]``, ``labels`` ``[Q]``, ``boxes`` ``[Q, 4]`` xyxy.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(
                f"target_sizes has {len(target_sizes)} entries for a batch of {len(logits)}"
            )
        prob = logits.float().softmax(-1)
        scores, labels = prob[..., :-1].max(-1)  # [B, Q]
        height, width = target_sizes.to(boxes.device).float().unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)  # [B, 4]
        boxes = box_convert(boxes.float(), "cxcywh", "xyxy") * scale[:, None, :]  # [B, Q, 4]
        return [
            {"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)
        ]
