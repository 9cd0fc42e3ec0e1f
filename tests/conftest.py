"""Fixtures and pytest hooks only: what tests share otherwise is in helpers.py."""

from __future__ import annotations

import pytest
import torch

from helpers import padded_batch, require_fused_kernels


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Tests marked needs_fused (helpers.py) fail, rather than skip, where the fused CPU kernels
    # cannot be built, unless DETRKIT_ALLOW_NO_KERNELS=1. Built here, on the first such test, not
    # at collection.
    if item.get_closest_marker("fused_kernels") is not None:
        require_fused_kernels()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch()
