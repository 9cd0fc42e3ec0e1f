"""detrkit's parameter names and shapes are exactly those of the official checkpoints.

The official layouts are read from ../shared/reference, next to the repository root (CI has it);
there is no copy in the repository, and a checkout without that directory fails these tests.
"""

from __future__ import annotations

import pytest

from detrkit import build_model
from helpers import shared_reference_file

PRESETS = [
    "detr_r50",
    "detr_r50_dc5",
    "detr_r101",
    "deformable_detr",
    "deformable_detr_single_scale",
    "deformable_detr_refine",
    "deformable_detr_two_stage",
]


def read_keys(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("preset", PRESETS)
def test_state_dict_equals_official_layout(preset):
    model = build_model(preset, num_classes=91)
    ours = [f"{name} {tuple(t.shape)}" for name, t in model.state_dict().items()]
    assert ours == read_keys(shared_reference_file(f"{preset}.keys"))


def test_the_shared_reference_directory_has_every_preset():
    """Fails once, saying what is missing, where the directory or a preset's file is not there."""
    for preset in PRESETS:
        assert shared_reference_file(f"{preset}.keys").stat().st_size > 0, preset
