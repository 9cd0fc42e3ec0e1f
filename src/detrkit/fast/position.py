"""The sine position encoding, kept between calls where it depends on the map's size alone."""

from __future__ import annotations

import torch
from torch import Tensor

from detrkit.fast.deformable_attention import may_have_padding
from detrkit.models.position_encoding import PositionEmbeddingSine

# Map sizes whose encoding is kept, the most recent first out last.
KEPT_SIZES = 8


class FastPositionEmbeddingSine(PositionEmbeddingSine):
    """Where no pixel of the mask is padded, every image's encoding is the same and depends only
    on the map's height and width: it is computed once for each size (by the reference's own
    forward, so the values are the same) and kept for later calls, for the last
    :data:`KEPT_SIZES` sizes. The batch, and every call at that size, share its memory (an
    expanded view); a kept encoding written in place since is computed again. Masks with
    padding, empty batches, masks off the CPU, and calls while tracing, compiling or exporting,
    run the reference's computation."""

    reference_class = PositionEmbeddingSine

    def forward(self, mask: Tensor) -> Tensor:
        if mask.shape[0] == 0 or may_have_padding(mask):
            return super().forward(mask)
        # Created here, not in __init__: the fast module takes over the reference's state as is.
        kept = self.__dict__.setdefault("_kept", {})
        # Everything the encoding depends on: the map's size and the encoding's settings.
        settings = (self.num_pos_feats, self.temperature, self.normalize, self.scale)
        key = (*mask.shape[1:], mask.device, *settings, self.offset, self.eps)
        entry = kept.pop(key, None)  # re-inserted last: the most recently used
        if entry is None or entry[0]._version != entry[1]:
            # Outside inference mode: an inference tensor keeps no version counter to tell a
            # write by a caller.
            with torch.inference_mode(False):
                encoding = super().forward(mask[:1])  # [1, 2F, H, W]
            entry = (encoding, encoding._version)
        kept[key] = entry
        while len(kept) > KEPT_SIZES:
            kept.pop(next(iter(kept)))
        return entry[0].expand(mask.shape[0], -1, -1, -1)
