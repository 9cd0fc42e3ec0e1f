"""The mask losses of DETR's panoptic models: sigmoid focal and dice on matched queries.

A matched query's mask logits (stride 4) are upsampled bilinearly to its target mask's size,
the batch's padded size, and compared pixel by pixel; both losses are summed over the matched
queries and divided by the number of target boxes, as the box losses are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """``1 - (2 |P n T| + 1) / (|P| + |T| + 1)`` per mask, ``P`` the sigmoid of ``logits``
    ``[N, HW]``, ``T`` the binary ``targets`` ``[N, HW]``; summed and divided by ``num_boxes``.
    The 1s keep empty masks finite."""
    probabilities = logits.sigmoid()
    numerator = 2 * (probabilities * targets).sum(1)
    denominator = probabilities.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def padded_target_masks(targets: list[dict]) -> Tensor:
    """Every image's ``masks`` ``[n_i, H_i, W_i]`` zero-padded to ``[B, max n_i, H, W]``, the
    batch's largest size, as the images are."""
    masks = [t["masks"] for t in targets]
    count = max(m.shape[0] for m in masks)
    height = max(m.shape[1] for m in masks)
    width = max(m.shape[2] for m in masks)
    padded = masks[0].new_zeros((len(masks), count, height, width))
    for image, m in enumerate(masks):
        padded[image, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return padded


def mask_losses(
    pred_masks: Tensor,
    targets: list[dict],
    indices: list[tuple[Tensor, Tensor]],
    num_boxes: float,
    focal_alpha: float = 0.25,
) -> dict[str, Tensor]:
    """``loss_mask`` (sigmoid focal, mean over pixels) and ``loss_dice`` of the matched queries.

    ``pred_masks`` ``[B, Q, h, w]`` logits; ``targets`` with ``masks`` ``[n_i, H_i, W_i]``;
    ``indices`` the matcher's (query indices, target indices) per image."""
    batch = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(indices)])
    queries = torch.cat([query for query, _ in indices])
    matched = torch.cat([target for _, target in indices])
    source = pred_masks[batch, queries]  # [N, h, w]
    target = padded_target_masks(targets)[batch, matched].to(source)  # [N, H, W]
    source = F.interpolate(
        source[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0].flatten(1)  # [N, H*W]
    target = target.flatten(1)
    focal = sigmoid_focal_loss(source, target, alpha=focal_alpha, gamma=2, reduction="none")
    return {
        "loss_mask": focal.mean(1).sum() / num_boxes,
        "loss_dice": dice_loss(source, target, num_boxes),
    }
