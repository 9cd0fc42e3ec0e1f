"""detrkit's parameter names and shapes are exactly those of the official checkpoints."""

from __future__ import annotations

import pytest

from detrkit import build_model
from helpers import REFERENCE_DIR, SHARED_REFERENCE_DIR


def read_keys(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    "preset",
    [
        "detr_r50",
        "detr_r50_dc5",
        "detr_r101",
        "deformable_detr",
        "deformable_detr_single_scale",
        "deformable_detr_refine",
        "deformable_detr_two_stage",
    ],
)
def test_state_dict_equals_official_layout(preset):
    model = build_model(preset, num_classes=91)
    ours = [f"{name} {tuple(t.shape)}" for name, t in model.state_dict().items()]
    assert ours == read_keys(REFERENCE_DIR / f"{preset}.keys")


def test_reference_copies_match_shared_files():
    if not SHARED_REFERENCE_DIR.is_dir():
        pytest.skip("the shared reference directory is not next to this checkout")
    for shared in SHARED_REFERENCE_DIR.glob("*.keys"):
        assert (REFERENCE_DIR / shared.name).read_text() == shared.read_text(), shared.name
