"""Checking an exported file against PyTorch on inputs unlike the ones it was traced with."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from detrkit.checkpoints.finite import NonFiniteError, non_finite_names
from detrkit.deploy.errors import ExportError
from detrkit.deploy.graph import ExportedDetector
from detrkit.deploy.runtime import ExportedModel


def verification_size(size: tuple[int, int], stride: int = 32) -> tuple[int, int]:
    """An image size other than the export's: about an eighth larger, and at least one
    ``stride`` (the coarsest feature stride) more, so that every feature map differs from the
    export's; odd for the usual, even, export sizes, so that every feature stride rounds."""
    height, width = size
    return height + max(height // 8, stride) + 5, width + max(width // 8, stride) + 3


def verification_inputs(
    input_names: list[str],
    size: tuple[int, int],
    batch: int = 3,
    seed: int = 1,
    padded: bool | None = None,
) -> dict[str, Tensor]:
    """Random normalised images of ``size``; with a mask and ``padded`` (default: a batch of
    several), the last image is padded at the right and the bottom (zero pixels, True in the
    mask), as a batch of differently sized images is."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if "mask" in input_names and (batch > 1 if padded is None else padded):
        mask[-1, (height * 3) // 4 :] = True
        mask[-1, :, (width * 2) // 3 :] = True
        images = images.masked_fill(mask[:, None], 0.0)
    # Detections are reported in each image's own pixels, some other size than the input's.
    orig_sizes = torch.tensor([[height * 2 + 7 * i, width * 2 - 5 * i] for i in range(batch)])
    values = {"images": images, "mask": mask, "orig_sizes": orig_sizes}
    return {name: values[name] for name in input_names}


def verification_checks(
    input_names: list[str], size: tuple[int, int], stride: int = 32
) -> list[dict[str, Tensor]]:
    """The inputs an export is verified on: one image at the export's size (the batch traced
    with is 2), and a batch of 3 at a larger size, the last image padded."""
    return [
        verification_inputs(input_names, size, batch=1, seed=1),
        verification_inputs(input_names, verification_size(size, stride), batch=3, seed=2),
    ]


@torch.no_grad()
def pytorch_outputs(
    graph: ExportedDetector, inputs: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor | None]:
    """What PyTorch computes for ``inputs``, by output name, and, for the raw outputs of
    two-stage Deformable DETR, the proposal scores of its queries (see :func:`compare`)."""
    if graph.postprocess is None and getattr(graph.model.config, "two_stage", False):
        outputs = graph.model(*(inputs[name] for name in graph.input_names))
        ranking = outputs["enc_outputs"]["pred_logits"][..., 0]  # [B, S] what top-k ranks
        count = outputs["pred_logits"].shape[1]
        top = ranking.topk(min(count + 1, ranking.shape[1]), dim=1).values  # [B, <= Q + 1]
        left_out = top.new_full((len(top), count + 1 - top.shape[1]), float("-inf"))
        query_scores = torch.cat([top, left_out], 1)  # [B, Q + 1]
        return {name: outputs[name] for name in graph.output_names}, query_scores
    outputs = graph(*(inputs[name] for name in graph.input_names))
    return dict(zip(graph.output_names, outputs)), None


def compare(
    expected: dict[str, Tensor],
    actual: dict[str, Tensor],
    tolerance: float = 1e-4,
    orig_sizes: Tensor | None = None,
    query_scores: Tensor | None = None,
) -> dict[str, float]:
    """The largest absolute difference of every output; raises ExportError naming the first
    output that differs by more than ``tolerance`` (boxes in pixels: ``tolerance`` times the
    largest image side). NaN in the export where PyTorch has a number is a difference.

    With ``query_scores`` ``[B, Q + 1]`` (two-stage Deformable DETR's raw outputs: the proposal
    scores its queries were chosen by, best first, then the best score left out), queries may
    change places where their scores tie within ``tolerance``: the order of near ties is the
    runtime's choice, and the user gets the same set of queries either way."""
    for name, value in expected.items():
        if actual[name].shape != value.shape:
            raise ExportError(
                f"{name} has shape {tuple(actual[name].shape)} in the export, "
                f"{tuple(value.shape)} in PyTorch"
            )
    if "scores" in expected:
        return _compare_detections(expected, actual, tolerance, orig_sizes)
    if query_scores is not None:
        return _compare_ranked_queries(expected, actual, tolerance, query_scores)
    differences = {}
    for name, value in expected.items():
        differences[name] = _max_difference(value, actual[name])
        if not differences[name] <= tolerance:  # NaN included
            raise ExportError(
                f"{name} differs from PyTorch by {differences[name]:.2e} (max abs), more than "
                f"the tolerance {tolerance:.0e}"
            )
    return differences


def _max_difference(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _compare_ranked_queries(
    expected: dict[str, Tensor], actual: dict[str, Tensor], tolerance: float, query_scores: Tensor
) -> dict[str, float]:
    """Raw outputs of queries ranked by proposal score. Each exported query must match a
    PyTorch query, one to one, in every output within ``tolerance``: the one at its position,
    or one whose proposal score ties with that position's. A query without a match is allowed
    only where its position's score ties with the best proposal left out (the runtime took a
    tied proposal that PyTorch left out, and the other way round)."""
    differences = dict.fromkeys(expected, 0.0)
    unmatched = 0
    count = query_scores.shape[1] - 1
    for image in range(len(query_scores)):
        # [Q exported, Q PyTorch]: the largest difference of each pair of queries, per output
        gaps = {
            name: (actual[name][image][:, None].double() - value[image][None].double())
            .abs()
            .flatten(2)
            .amax(-1)
            .nan_to_num(nan=float("inf"))
            for name, value in expected.items()
        }
        scores = query_scores[image].double()  # [Q + 1]
        ranked = scores[:count]
        tied = (ranked[:, None] - ranked[None, :]).abs() <= tolerance
        admissible = tied | torch.eye(count, dtype=torch.bool)
        close = torch.stack(list(gaps.values())).amax(0) <= tolerance
        good = admissible & close  # [Q, Q]
        # A maximum one-to-one matching of good pairs: every bad pair costs 1.
        rows, cols = linear_sum_assignment((~good).double().numpy())
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        matched = good[rows, cols]
        at_edge = (ranked - scores[count]).abs() <= tolerance  # [Q]
        unmatched += int((~matched & ~at_edge[rows]).sum())
        for name, gap in gaps.items():
            if matched.any():
                found = gap[rows[matched], cols[matched]].max().item()
                differences[name] = max(differences[name], found)
    if unmatched:
        raise ExportError(
            f"{unmatched} queries of the export match none of PyTorch's within the tolerance "
            f"{tolerance:.0e} (in {', '.join(expected)}; queries may change places only where "
            "their proposal scores tie within the tolerance)"
        )
    return differences


def _compare_detections(
    expected: dict[str, Tensor], actual: dict[str, Tensor], tolerance: float, orig_sizes: Tensor
) -> dict[str, float]:
    """Post-processed outputs. Scores must agree position by position. Each exported detection
    must have PyTorch's label and box at its position or, where scores (nearly) tie and their
    order is arbitrary, at a position whose score is within ``tolerance``; and, for a panoptic
    model, that detection's ``pred_masks`` within ``tolerance``. "boxes" is the largest box
    difference (pixels) from the matching detection, "pred_masks" the largest mask logit
    difference; "labels" counts unmatched ones. ``queries`` are not compared: two-stage queries
    may change places where their proposal scores tie, their detections unchanged."""
    box_tolerance = tolerance * float(orig_sizes.max())
    score_difference = _max_difference(expected["scores"], actual["scores"])
    if not score_difference <= tolerance:  # NaN included
        raise ExportError(
            f"scores differ from PyTorch by {score_difference:.2e} (max abs), more than "
            f"the tolerance {tolerance:.0e}"
        )
    masks = "pred_masks" in expected
    box_difference, mask_difference, unmatched = 0.0, 0.0, 0
    for image in range(len(expected["scores"])):
        scores, labels = expected["scores"][image], expected["labels"][image]  # [K]
        # [K exported, K PyTorch]: which PyTorch detection each exported one may stand for
        close_score = (scores[None, :] - actual["scores"][image][:, None]).abs() <= tolerance
        same_position = torch.eye(len(scores), dtype=torch.bool)
        admissible = (labels[None, :] == actual["labels"][image][:, None]) & (
            close_score | same_position
        )
        box_gap = (expected["boxes"][image][None] - actual["boxes"][image][:, None]).abs()
        box_gap = box_gap.amax(-1).double().nan_to_num(nan=float("inf"))
        box_gap = box_gap.masked_fill(~admissible, float("inf"))
        if masks:
            mask_gap = _pair_gaps(
                expected["pred_masks"][image], actual["pred_masks"][image], box_gap <= box_tolerance
            )
            box_gap = box_gap.masked_fill(~(mask_gap <= tolerance), float("inf"))
        best, match = box_gap.min(1)  # [K] each exported detection's closest admissible match
        found = best <= box_tolerance
        unmatched += int((~found).sum())
        if found.any():
            box_difference = max(box_difference, best[found].max().item())
            if masks:
                gaps = mask_gap[found.nonzero()[:, 0], match[found]]
                mask_difference = max(mask_difference, gaps.max().item())
    if unmatched:
        also = f", masks within {tolerance:.0e}" if masks else ""
        raise ExportError(
            f"{unmatched} detections have no counterpart in PyTorch's with the same label, a "
            f"score within {tolerance:.0e} and a box within {box_tolerance:.2g} px{also}"
        )
    differences = {"scores": score_difference, "boxes": box_difference, "labels": float(unmatched)}
    if masks:
        differences["pred_masks"] = mask_difference
    return differences


def _pair_gaps(expected: Tensor, actual: Tensor, pairs: Tensor) -> Tensor:
    """``[K exported, K PyTorch]``: the largest difference of the maps ``actual[i]`` and
    ``expected[j]`` (``[K, ...]`` each) for the ``pairs`` that are True, infinity elsewhere
    (NaN too). Only those pairs are computed: all of them would be K times the maps."""
    gaps = torch.full(pairs.shape, float("inf"), dtype=torch.float64)
    rows, cols = pairs.nonzero(as_tuple=True)
    for start in range(0, len(rows), 64):  # near ties can make many pairs: 64 maps at a time
        i, j = rows[start : start + 64], cols[start : start + 64]
        found = (actual[i].double() - expected[j].double()).abs().flatten(1).amax(1)
        gaps[i, j] = found.nan_to_num(nan=float("inf"))
    return gaps


def verify_file(
    path,
    graph: ExportedDetector,
    checks: list[dict[str, Tensor]],
    tolerance: float = 1e-4,
) -> dict[str, float]:
    """Runs the exported file and ``graph`` (PyTorch) on each of ``checks`` (inputs by name) and
    compares them; returns each output's largest difference over all checks. Raises
    NonFiniteError when PyTorch's own outputs hold NaN or infinity (nothing to compare with),
    ExportError when the file cannot run or differs."""
    # PyTorch's outputs first: without finite ones there is nothing to check the file against.
    references = []
    for inputs in checks:
        expected, query_scores = pytorch_outputs(graph, inputs)
        bad = non_finite_names(expected)
        if bad:
            raise NonFiniteError(
                f"the model's own outputs hold NaN or infinity ({', '.join(bad)}) on "
                f"{_describe(inputs)} of random images: there is nothing to verify the export "
                "against"
            )
        references.append((expected, query_scores))
    exported = ExportedModel(path)
    runtime = "ONNX Runtime" if exported.format == "onnx" else "torch.export.load's program"
    differences: dict[str, float] = {}
    for inputs, (expected, query_scores) in zip(checks, references):
        try:
            actual = exported(**inputs)
        except Exception as error:  # whatever the runtime raises for a graph it cannot run
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ExportError(
                f"{runtime} could not run the export on {_describe(inputs)}: {reason}"
            ) from None
        try:
            found = compare(expected, actual, tolerance, inputs.get("orig_sizes"), query_scores)
        except ExportError as error:
            raise ExportError(f"on {_describe(inputs)}: {error}") from None
        for name, value in found.items():
            differences[name] = max(differences.get(name, 0.0), value)
    return differences


def _describe(inputs: dict[str, Tensor]) -> str:
    batch, _, height, width = inputs["images"].shape
    return f"a batch of {batch} at {height}x{width}"
