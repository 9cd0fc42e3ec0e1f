from __future__ import annotations

from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
SHARED_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"

# A model small enough to train a few steps in seconds: every module of the real one is there.
TINY_MODEL = {
    "hidden_dim": 64,
    "nheads": 2,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 64,
    "num_queries": 8,
    "num_feature_levels": 2,
}


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two differently sized random images padded into one batch (the second has padding)."""
    from detrkit import pad_images

    generator = torch.Generator().manual_seed(seed)
    images = [
        torch.randn(3, 128, 160, generator=generator),
        torch.randn(3, 96, 120, generator=generator),
    ]
    return pad_images(images)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch()


def small_detr(**overrides):
    """A DETR-R50 with a small transformer: fast, but every kind of module is present."""
    from detrkit import build_model

    options = dict(enc_layers=2, dec_layers=3, num_queries=12, num_classes=7, dim_feedforward=64)
    options.update(overrides)
    torch.manual_seed(0)
    return build_model("detr_r50", **options)
