"""The sine position encoding kept between calls (detrkit.fast.position) against the reference."""

from __future__ import annotations

import torch

from detrkit.fast.position import KEPT_SIZES, FastPositionEmbeddingSine
from detrkit.fast.substitution import adopt
from detrkit.models.position_encoding import PositionEmbeddingSine


def pair(offset: float = 0.0):
    reference = PositionEmbeddingSine(64, normalize=True, offset=offset)
    return reference, adopt(
        PositionEmbeddingSine(64, normalize=True, offset=offset), FastPositionEmbeddingSine
    )


def test_each_call_is_the_references():
    for offset in (0.0, -0.5):
        reference, fast = pair(offset)
        padded = torch.zeros(2, 9, 13, dtype=torch.bool)
        padded[1, 6:, :] = True
        padded[1, :, 10:] = True
        for mask in (
            torch.zeros(1, 9, 13, dtype=torch.bool),
            torch.zeros(3, 9, 13, dtype=torch.bool),
            padded,
        ):
            for _ in range(2):  # computed, then kept
                got = fast(mask)
                assert torch.equal(got, reference(mask)), (offset, mask.shape)
                assert got.shape == (mask.shape[0], 128, 9, 13)


def test_an_encoding_written_in_place_is_computed_again():
    reference, fast = pair()
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    fast(mask).flatten(2).transpose(1, 2).add_(1.0)  # through views, as a caller might
    assert torch.equal(fast(mask), reference(mask))


def test_only_the_last_sizes_are_kept():
    reference, fast = pair()
    for size in range(1, KEPT_SIZES + 5):
        mask = torch.zeros(1, size, size + 1, dtype=torch.bool)
        assert torch.equal(fast(mask), reference(mask))
    assert len(fast._kept) == KEPT_SIZES
    kept_sizes = [key[:2] for key in fast._kept]
    assert kept_sizes == [(size, size + 1) for size in range(5, KEPT_SIZES + 5)]


def test_kept_under_inference_mode_too():
    """Deployments run under inference_mode, whose tensors keep no version counter: the kept
    encoding is made outside it, so writes are still seen."""
    reference, fast = pair()
    mask = torch.zeros(2, 6, 4, dtype=torch.bool)
    with torch.inference_mode():
        first, second = fast(mask), fast(mask)
        assert first.data_ptr() == second.data_ptr()  # kept, not computed again
        second[0, 0, 0, 0] = 100.0
        assert torch.equal(fast(mask), reference(mask))


def test_an_empty_batch_is_not_kept():
    reference, fast = pair()
    for batch in (0, 2):
        mask = torch.zeros(batch, 5, 7, dtype=torch.bool)
        assert torch.equal(fast(mask), reference(mask))


def test_the_settings_are_part_of_what_is_kept():
    reference, fast = pair()
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    fast(mask)
    for module in (reference, fast):
        module.temperature, module.offset = 20.0, -0.5
    assert torch.equal(fast(mask), reference(mask))
