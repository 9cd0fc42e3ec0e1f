"""Denoising queries (Li et al., DN-DETR, 2022): extra decoder inputs for training only.

Noised copies of the ground-truth objects enter the decoder beside the object queries, and each is
trained to give back the object it was made from. The detectors take them as an input
(``model(images, mask, denoising=...)``): the decoder runs over ``cat(denoising queries, object
queries)`` under :attr:`DenoisingQueries.attn_mask`, and the outputs of the denoising part come
back apart, as ``outputs["dn_outputs"]``. How the queries are made (the noise, the label
embedding) belongs to training: :mod:`detrkit.loss.denoising`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DenoisingQueries:
    """``D = groups * group_size`` denoising queries per image, group after group.

    Attributes:
        content: the queries' content ``[B, D, C]`` (the decoder's ``tgt``).
        position: their positional query ``[B, D, C]`` (``query_pos``).
        reference: Deformable DETR only: their reference points ``[B, D, 2]`` or boxes
            ``[B, D, 4]`` (normalised; as many coordinates as the object queries' references).
        attn_mask: ``[B, D + Q, D + Q]``, True where a query may not attend to a key, over the
            decoder's whole sequence (denoising queries first, then the ``Q`` object queries).
        groups, group_size: the queries come in ``groups`` groups of ``group_size`` (the batch's
            largest object count; smaller images' groups are padded).
        batch_index, query_index, target_index: ``[T]`` each: query ``query_index[i]`` of image
            ``batch_index[i]`` is a noised copy of that image's object ``target_index[i]`` (the
            padding queries are not listed). The model ignores them; the loss reads them.
    """

    content: Tensor
    position: Tensor
    reference: Tensor | None
    attn_mask: Tensor
    groups: int
    group_size: int
    batch_index: Tensor
    query_index: Tensor
    target_index: Tensor

    @property
    def num_queries(self) -> int:
        """``D``: the denoising queries per image, padding included."""
        return self.groups * self.group_size


def denoising_attention_mask(
    counts: list[int], groups: int, num_queries: int, device: torch.device | str = "cpu"
) -> Tensor:
    """The self-attention mask of DN-DETR: ``[B, D + Q, D + Q]`` boolean, True = blocked.

    ``counts``: each image's object count; every group has ``max(counts)`` slots, the first
    ``counts[b]`` of them image ``b``'s objects. The object queries see each other only (so they
    compute what they compute without denoising); a denoising query sees its own group and the
    object queries, never another group (which would give away the answer). Padding slots are
    seen by no query but themselves.
    """
    size = max(counts, default=0)
    dn = groups * size
    total = dn + num_queries
    group = torch.arange(dn, device=device) // max(size, 1)
    blocked = torch.zeros(total, total, dtype=torch.bool, device=device)
    blocked[dn:, :dn] = True  # object queries do not see the denoising part
    blocked[:dn, :dn] = group[:, None] != group[None, :]  # nor one group another
    slot = torch.arange(dn, device=device) % max(size, 1)
    padding = slot[None, :] >= torch.tensor(counts, device=device)[:, None]  # [B, D]
    padding = torch.cat([padding, padding.new_zeros(len(counts), num_queries)], 1)  # [B, D + Q]
    blocked = blocked[None] | padding[:, None, :]
    # A padding query still sees itself: a row with every key blocked would give NaN.
    return blocked & ~torch.eye(total, dtype=torch.bool, device=device)
