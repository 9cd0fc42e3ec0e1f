"""Fixtures and pytest hooks only: what tests share otherwise is in helpers.py."""

from __future__ import annotations

import pytest
import torch

from helpers import padded_batch


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch()
