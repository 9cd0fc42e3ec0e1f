"""Batches of one aspect ratio (less padding): the sampler's rules and what it saves."""

from __future__ import annotations

import torch

from detrkit.data import AugmentationConfig, DigitsDetection, make_val_transforms
from detrkit.engine.datasets import (
    ASPECT_EDGES,
    EVAL_RATIO_SPREAD,
    EpochBatches,
    aspect_groups,
    aspect_ratios,
    make_loader,
)


def batches_of(sampler: EpochBatches, epoch: int, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    return batches


def test_grouped_batches_hold_one_group_and_every_item_once():
    ratios = [(0.55, 1.0, 1.9)[i % 3] for i in range(23)]
    groups = aspect_groups(ratios)
    assert groups[:3] == [1, 4, 8]
    sampler = EpochBatches(range(23), 4, seed=5, shuffle=True, ratios=ratios)
    first = batches_of(sampler, 0)
    assert sorted(i for batch in first for i in batch) == list(range(23))
    assert all(len({groups[i] for i in batch}) == 1 for batch in first)
    assert all(len(batch) == 4 for batch in first[:-3])  # at most one short batch per group
    assert batches_of(sampler, 0) == first  # fixed by (seed, epoch)
    assert batches_of(sampler, 1) != first
    assert batches_of(sampler, 0, start=2) == first[2:]  # a resumed epoch
    # In order (evaluation): sorted by ratio, consecutive ones together.
    unshuffled = EpochBatches(range(23), 4, seed=5, shuffle=False, ratios=ratios)
    assert batches_of(unshuffled, 0)[:2] == [[0, 3, 6, 9], [12, 15, 18, 21]]


def test_evaluation_batches_hold_only_nearly_equal_aspect_ratios():
    ratios = [1.0, 1.5, 1.01, 1.0, 1.04, 1.49, 1.0, 1.02]
    sampler = EpochBatches(range(8), 3, seed=0, shuffle=False, ratios=ratios)
    batches = batches_of(sampler, 0)
    assert sorted(i for batch in batches for i in batch) == list(range(8))
    # Sorted by ratio; a batch closes when full or when the next ratio is too far from its first.
    assert batches == [[0, 3, 6], [2, 7], [4], [5, 1]]
    for batch in batches:
        assert max(ratios[i] for i in batch) <= min(ratios[i] for i in batch) * EVAL_RATIO_SPREAD


def batches_of_processes(ratios: list[float], batch_size: int, shuffle: bool) -> list[list[int]]:
    """The batches of epoch 1 of three processes together, after checking that each process has
    as many and that together they hold every item."""
    shares = [
        batches_of(EpochBatches(range(len(ratios)), batch_size, 0, shuffle, 3, rank, ratios), 1)
        for rank in range(3)
    ]
    assert len({len(share) for share in shares}) == 1
    assert {i for share in shares for batch in share for i in batch} == set(range(len(ratios)))
    return [batch for share in shares for batch in share]


def test_grouped_batches_give_every_process_the_same_number_of_steps():
    ratios = [0.7] * 9 + [1.0] * 5 + [1.5]
    groups = aspect_groups(ratios)
    batches = batches_of_processes(ratios, 2, shuffle=True)
    assert all(len({groups[i] for i in batch}) == 1 for batch in batches)


def test_aspect_groups_follow_each_images_shape_and_cut_the_padding():
    dataset = DigitsDetection("val", 24, seed=3)
    groups = aspect_groups(aspect_ratios(dataset))
    edges = torch.tensor(ASPECT_EDGES)
    for index, group in enumerate(groups):
        height, width = dataset[index][0].shape[-2:]
        assert group == int(torch.bucketize(torch.tensor(width / height), edges))

    resized = DigitsDetection(
        "val", 24, seed=3, transforms=make_val_transforms(AugmentationConfig().scaled(0.2))
    )

    def padding(group_by_aspect: bool) -> float:
        loader = make_loader(resized, 4, 0, False, 0, group_by_aspect=group_by_aspect)
        loader.batch_sampler.set_epoch(0)
        padded = sum(int(mask.sum()) for _, mask, _ in loader)
        total = sum(mask.numel() for _, mask, _ in loader)
        return padded / total

    assert padding(True) < 0.5 * padding(False)


def test_evaluation_batches_shared_by_processes_cover_every_item_in_equal_counts():
    ratios = [1.0, 1.5, 1.01, 1.0, 1.04, 1.49, 1.0, 1.02, 0.7, 0.71]
    for batch in batches_of_processes(ratios, 3, shuffle=False):
        spread = max(ratios[i] for i in batch) / min(ratios[i] for i in batch)
        assert spread <= EVAL_RATIO_SPREAD
