"""Checking an exported file against PyTorch on inputs unlike the ones it was traced with."""

from __future__ import annotations

import torch
from torch import Tensor

from detrkit.deploy.errors import ExportError
from detrkit.deploy.graph import ExportedDetector
from detrkit.deploy.runtime import ExportedModel


def verification_size(size: tuple[int, int]) -> tuple[int, int]:
    """An image size other than the export's, about an eighth larger (and odd for the usual,
    even, export sizes, so that every feature stride rounds)."""
    height, width = size
    return height + height // 8 + 5, width + width // 8 + 3


def verification_inputs(
    input_names: list[str], size: tuple[int, int], batch: int = 3, seed: int = 1
) -> dict[str, Tensor]:
    """Random normalised images of ``size``; with a mask, the last image is padded at the right
    and the bottom (zero pixels, True in the mask), as a batch of differently sized images is."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if "mask" in input_names:
        mask[-1, (height * 3) // 4 :] = True
        mask[-1, :, (width * 2) // 3 :] = True
        images = images.masked_fill(mask[:, None], 0.0)
    # Detections are reported in each image's own pixels, some other size than the input's.
    orig_sizes = torch.tensor([[height * 2 + 7 * i, width * 2 - 5 * i] for i in range(batch)])
    values = {"images": images, "mask": mask, "orig_sizes": orig_sizes}
    return {name: values[name] for name in input_names}


@torch.no_grad()
def pytorch_outputs(graph: ExportedDetector, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """What PyTorch computes for ``inputs``, by output name."""
    outputs = graph(*(inputs[name] for name in graph.input_names))
    return dict(zip(graph.output_names, outputs))


def compare(
    expected: dict[str, Tensor],
    actual: dict[str, Tensor],
    tolerance: float = 1e-4,
    orig_sizes: Tensor | None = None,
) -> dict[str, float]:
    """The largest absolute difference of every output; raises ExportError naming the first
    output that differs by more than ``tolerance`` (boxes in pixels: ``tolerance`` times the
    largest image side)."""
    for name, value in expected.items():
        if actual[name].shape != value.shape:
            raise ExportError(
                f"{name} has shape {tuple(actual[name].shape)} in the export, "
                f"{tuple(value.shape)} in PyTorch"
            )
    if "scores" in expected:
        return _compare_detections(expected, actual, tolerance, orig_sizes)
    differences = {}
    for name, value in expected.items():
        differences[name] = _max_difference(value, actual[name])
        if differences[name] > tolerance:
            raise ExportError(
                f"{name} differs from PyTorch by {differences[name]:.2e} (max abs), more than "
                f"the tolerance {tolerance:.0e}"
            )
    return differences


def _max_difference(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _compare_detections(
    expected: dict[str, Tensor], actual: dict[str, Tensor], tolerance: float, orig_sizes: Tensor
) -> dict[str, float]:
    """Post-processed outputs. Scores must agree position by position. Each exported detection
    must have PyTorch's label and box at its position or, where scores (nearly) tie and their
    order is arbitrary, at a position whose score is within ``tolerance``. "boxes" is the largest
    box difference (pixels) from the matching detection; "labels" counts unmatched ones."""
    box_tolerance = tolerance * float(orig_sizes.max())
    score_difference = _max_difference(expected["scores"], actual["scores"])
    if score_difference > tolerance:
        raise ExportError(
            f"scores differ from PyTorch by {score_difference:.2e} (max abs), more than "
            f"the tolerance {tolerance:.0e}"
        )
    box_difference, unmatched = 0.0, 0
    for image in range(len(expected["scores"])):
        scores, labels = expected["scores"][image], expected["labels"][image]  # [K]
        # [K exported, K PyTorch]: which PyTorch detection each exported one may stand for
        close_score = (scores[None, :] - actual["scores"][image][:, None]).abs() <= tolerance
        same_position = torch.eye(len(scores), dtype=torch.bool)
        admissible = (labels[None, :] == actual["labels"][image][:, None]) & (
            close_score | same_position
        )
        box_gap = (expected["boxes"][image][None] - actual["boxes"][image][:, None]).abs()
        box_gap = box_gap.amax(-1).double().masked_fill(~admissible, float("inf"))
        best = box_gap.amin(1)  # [K] each exported detection's closest admissible match
        unmatched += int((best > box_tolerance).sum())
        if best.numel() and (best <= box_tolerance).any():
            box_difference = max(box_difference, best[best <= box_tolerance].max().item())
    if unmatched:
        raise ExportError(
            f"{unmatched} detections have no counterpart in PyTorch's with the same label, a "
            f"score within {tolerance:.0e} and a box within {box_tolerance:.2g} px"
        )
    return {"scores": score_difference, "boxes": box_difference, "labels": float(unmatched)}


def verify_file(
    path,
    graph: ExportedDetector,
    inputs: dict[str, Tensor],
    tolerance: float = 1e-4,
) -> dict[str, float]:
    """Runs the exported file and ``graph`` (PyTorch) on ``inputs`` and compares them."""
    exported = ExportedModel(path)
    actual = exported(**inputs)
    expected = pytorch_outputs(graph, inputs)
    return compare(expected, actual, tolerance, inputs.get("orig_sizes"))
