"""Deployment: exporting detectors to ONNX and to ``torch.export`` programs, each checked against
PyTorch before it is written.

>>> import detrkit
>>> detrkit.export(detrkit.load("runs/demo/checkpoint.pth"), "digits.onnx")
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from detrkit.checkpoints.finite import require_finite_weights
from detrkit.data.images import MAX_SIZE, SHORT_SIDE
from detrkit.deploy.errors import ExportError
from detrkit.deploy.graph import ExportedDetector
from detrkit.deploy.metadata import export_metadata
from detrkit.deploy.runtime import ExportedModel, file_format
from detrkit.deploy.sizes import check_export_size, feature_strides
from detrkit.deploy.to_onnx import (
    DEFAULT_OPSET,
    MIN_OPSET,
    check_opset,
    export_onnx,
    newest_opset,
    require_onnx,
    save_onnx,
)
from detrkit.deploy.to_program import export_program, save_program
from detrkit.deploy.verify import verification_checks, verify_file
from detrkit.fast import adopt, substitute, to_reference
from detrkit.fast.deformable_attention import FastMSDeformAttn
from detrkit.files import remove_temporaries, write_atomically
from detrkit.models import ModelConfig
from detrkit.models.deformable_attention import MSDeformAttn
from detrkit.ops import (
    ATTENTION_OPS,
    RuntimeLibraryError,
    attention_implementation,
    auto_implementation,
    onnxruntime_library,
)

FORMATS = ("onnx", "torch")

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "MIN_OPSET",
    "ExportError",
    "ExportResult",
    "ExportedModel",
    "export",
    "file_format",
    "newest_opset",
]


@dataclass
class ExportResult:
    """What :func:`export` wrote and how it was checked."""

    path: Path
    format: str
    metadata: dict[str, str]
    # The largest absolute difference from PyTorch of each output; post-processed, "boxes" is in
    # pixels, from the matching detection, and "labels" counts detections without a match (0);
    # "pred_masks" (panoptic models) is in mask logits, post-processed from the matching detection.
    # Empty when not verified.
    differences: dict[str, float] = field(default_factory=dict)
    # (batch, height, width) of each check: the export's size, then a larger one.
    verified_shapes: list[tuple[int, int, int]] = field(default_factory=list)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    *,
    opset: int = DEFAULT_OPSET,
    attention_op: str = "gridsample",
    with_postprocess: bool = False,
    with_mask: bool = True,
    size: tuple[int, int] = (800, 1066),
    num_select: int = 100,
    resize: tuple[int | None, int] = (SHORT_SIDE, MAX_SIZE),
    verify: bool = True,
    tolerance: float = 1e-4,
    overwrite: bool = False,
) -> ExportResult:
    """Exports a detrkit model to ``path``: ONNX (``format="onnx"``) or a torch.export program
    (``format="torch"``, a .pt2 file for ``torch.export.load``, after ``import detrkit``).

    The graph takes ``images`` ``[B, 3, H, W]`` (normalised) and, with ``with_mask``, ``mask``
    ``[B, H, W]``, with B, H and W dynamic, and returns ``pred_logits`` and ``pred_boxes``. With
    ``with_postprocess`` it also takes ``orig_sizes`` ``[B, 2]`` and returns ``scores``,
    ``labels`` and absolute xyxy ``boxes`` (the ``num_select`` best for Deformable DETR). DETR's
    panoptic models add ``pred_masks`` ``[B, Q, ceil(H/4), ceil(W/4)]``, the mask logits of each
    query (or detection) at stride 4, verified like the rest (see :mod:`detrkit.deploy.graph`).

    ``attention_op`` is how an ONNX export writes Deformable DETR's attention: ``"gridsample"``
    (ONNX GridSample per level, which every runtime runs) or ``"detrkit"`` (one
    ``ai.detrkit::MultiScaleDeformableAttention`` node, which ONNX Runtime and OpenVINO run
    1.6x to 2.7x faster with detrkit's library loaded, see :mod:`detrkit.ops.runtime_ops`;
    :class:`ExportedModel` loads it).

    ``size`` is the (H, W) traced with: every feature map must be at least 2x2 there, so each side at
    least the coarsest stride plus one (DETR 33, DC5 17, four-level Deformable DETR 65), and
    two-stage needs as many encoder positions as queries (113x113 for 300); a smaller size is
    an :class:`ExportError` stating the smallest (see :mod:`detrkit.deploy.sizes`).

    The file records what a deployer needs (ONNX metadata; a JSON member of the .pt2 archive;
    see :func:`detrkit.deploy.metadata.export_metadata`): detrkit's version, the preset, the
    class names and the dataset's category ids, the normalisation, the padding and ``resize``,
    the ``(short side, max size)`` images are resized to before the model (default 800 and
    1333; a ``detrkit train`` run's image scale of them for its checkpoints, as
    :func:`detrkit.inference.detector.training_image_scale` reads it; short side None keeps
    images as they are). :class:`ExportedModel` reads them back.

    With ``verify`` the file is run (ONNX Runtime or torch.export.load) on one image at the
    export's size and on a batch of 3 images of a larger size, one padded, and compared with
    PyTorch; an output that differs by more than ``tolerance`` raises :class:`ExportError` and
    nothing is written. Two-stage queries may change places where their proposal scores tie
    within ``tolerance`` (see :func:`detrkit.deploy.verify.compare`). Non-finite weights, or
    PyTorch outputs, raise NonFiniteError (a ValueError).

    An existing file at ``path`` is an ExportError unless ``overwrite``; the file is written
    whole or not at all (a link at ``path`` is replaced, not followed), and a full disk or
    another failure to write raises :class:`detrkit.files.WriteError` naming it.

    The model is copied (to CPU, float32, eval mode), never changed.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose 'onnx' or 'torch'")
    if format == "onnx":
        check_opset(opset)
        require_onnx()
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, ModelConfig):
        raise TypeError("export() takes a detrkit model (one built by build_model or load)")
    check_attention_op(attention_op, format, config, verify)
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < math.inf):
        raise ValueError(f"tolerance must be a finite number above 0, got {tolerance!r}")
    size = tuple(size)
    resize = check_resize(resize)
    check_export_size(model, size)
    path = Path(path)
    check_writable(path, overwrite)
    require_finite_weights(model, f"the model to export to {path}")
    # Temporaries of this file that an export killed mid-write left behind (up to the size of
    # the export each); nothing else writes this file now.
    remove_temporaries(path.parent, path.name)

    # requires_grad on every weight: tracing a matmul with frozen weights checks the input's
    # strides, which fixes the batch size of the decoder's attention to the export's.
    source = copy.deepcopy(model).to("cpu", torch.float32).eval().requires_grad_(True)
    # Exports return the last layer's predictions only: leave the other layers' out of the graph,
    # in every module that reads the config (a panoptic model's detector, under ``detr``, too;
    # with one decoder layer its empty list of earlier layers would be a node that torch.export
    # saves but cannot load).
    for module in source.modules():
        if isinstance(getattr(module, "config", None), ModelConfig):
            module.config = dataclasses.replace(module.config, aux_loss=False)
    # Exports trace the reference computation on the whole batch: optimize_for_inference's fast
    # modules (chunked MLPs and batches, reordered decoder attention, Winograd convolutions that
    # are an extension's kernels, in-place residual additions) go back to the reference ones.
    # Folded batch norms stay folded. Deformable attention's sampling is traced in its fast form
    # (one product for offsets and weights; the locations broadcast over an innermost axis of
    # L * P * 2, not of 2), which ONNX Runtime computes several times faster; the file is still
    # verified against the reference modules.
    source = to_reference(source)
    graph = ExportedDetector(source, with_mask, with_postprocess, num_select).eval()
    fast_sampling = {MSDeformAttn: lambda module: adopt(module, FastMSDeformAttn)}
    traced = ExportedDetector(
        substitute(copy.deepcopy(source), fast_sampling), with_mask, with_postprocess, num_select
    ).eval()
    metadata = export_metadata(config, graph.input_names, graph.output_names, resize)
    write = _trace(traced, format, size, opset, metadata, attention_op)
    result = ExportResult(path, format, metadata)

    def write_and_verify(target: Path) -> None:
        write(target)
        if verify:
            checks = verification_checks(graph.input_names, size, max(feature_strides(source)))
            try:
                result.differences = verify_file(target, graph, checks, tolerance)
            except ExportError as error:
                # Name the file the user asked for, not the temporary one being checked.
                message = str(error).replace(str(target), str(path)).removeprefix(f"{path}: ")
                raise ExportError(f"{path}: the export does not verify: {message}") from None
            except RuntimeError as error:
                # PyTorch's own run failing: not a failure to write, as write_atomically would
                # report a RuntimeError.
                reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                raise ExportError(f"{path}: the export could not be verified: {reason}") from None
            result.verified_shapes = [
                (len(inputs["images"]), *inputs["images"].shape[-2:]) for inputs in checks
            ]

    # A full disk or another failure to write: WriteError (an OSError) naming the file, the
    # previous file left as it was.
    write_atomically(path, write_and_verify)
    return result


def check_attention_op(
    attention_op: str,
    format: str,
    config: ModelConfig,
    verify: bool,
    name: str = "attention_op",
    unverified: str = "verify=False",
) -> None:
    """Raises ValueError for an ``attention_op`` that is unknown, or that would change nothing
    (detrkit's node for a torch.export program or for a model without deformable attention),
    and, when the export is to be verified, ExportError when detrkit's ONNX Runtime library
    cannot be built to verify with. ``name`` and ``unverified`` are the option and the way to
    skip verification, as the caller spells them."""
    if attention_op not in ATTENTION_OPS:
        raise ValueError(f"{name} must be one of {', '.join(ATTENTION_OPS)}, got {attention_op!r}")
    if attention_op == "gridsample":
        return
    if format != "onnx":
        raise ValueError(f"{name} {attention_op} is for ONNX exports, not {format!r}")
    if config.model_type != "deformable_detr":
        raise ValueError(
            f"{name} {attention_op} writes Deformable DETR's attention; a {config.model_type} "
            "model has none"
        )
    if verify:
        try:
            onnxruntime_library()  # built now, before the tracing, to verify with
        except RuntimeLibraryError as error:
            raise ExportError(
                f"{name} {attention_op}: the export cannot be verified, as {error} (or pass "
                f"{unverified} to write the file unverified)"
            ) from None


def _trace(
    graph: ExportedDetector,
    format: str,
    size: tuple[int, int],
    opset: int,
    metadata: dict,
    attention_op: str,
) -> Callable[[Path], None]:
    """Exports ``graph`` in ``format``; returns the function that writes it to a path."""
    if format == "onnx":
        # ONNX has no deformable attention operator: the "onnx" op is written as GridSample per
        # level, or as detrkit's own node (see detrkit.ops.ms_deform_attn_onnx).
        with attention_implementation("onnx"):
            model = export_onnx(graph, size, opset, metadata, attention_op)
        return lambda tmp: save_onnx(model, tmp)
    # torch.export keeps the fused kernel, through its fake implementation, where it is built.
    fused = auto_implementation("cpu", torch.float32) == "cpu"
    with attention_implementation("cpu" if fused else "portable"):
        program = export_program(graph, size)
    return lambda tmp: save_program(program, tmp, metadata)


def check_resize(resize) -> tuple[int | None, int]:
    """``resize`` as ``(short side or None, max size)``; ValueError unless they are positive
    integers (the short side may be None)."""
    try:
        short_side, max_size = resize
    except (TypeError, ValueError):
        raise ValueError(f"resize must be (short side, max size), got {resize!r}") from None
    for name, value in (("short side", short_side), ("max size", max_size)):
        if value is None and name == "short side":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"resize's {name} must be a positive integer, got {value!r}")
    return (None if short_side is None else int(short_side)), int(max_size)


def check_writable(path: Path, overwrite: bool = False) -> None:
    """Raises ExportError when ``path`` cannot be written, or holds a file (or a link) and not
    ``overwrite``, before any work is done."""
    if path.is_dir() and not path.is_symlink():
        raise ExportError(f"{path} is a directory; give the path of the file to write")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: the directory {path.parent} does not exist")
    if os.path.lexists(path) and not overwrite:
        raise ExportError(f"{path} already exists; pass overwrite=True to replace it")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as error:
        raise ExportError(f"{path}: cannot write in {path.parent}: {error}") from None
