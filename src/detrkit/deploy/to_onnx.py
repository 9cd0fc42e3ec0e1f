"""ONNX export with torch.onnx's dynamo exporter, dynamic batch, height and width."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

import torch

from detrkit.deploy.errors import ExportError, missing_onnx_packages
from detrkit.deploy.graph import AXIS_NAMES, ExportedDetector, check_dynamic
from detrkit.ops import onnx_translation_table

# torch.onnx's exporter writes opset 18 and later natively; asked for older ones it runs ONNX's
# version converter, which turns these graphs into invalid ones (at 17, a Split that ONNX Runtime
# rejects). Deformable DETR's attention is ONNX GridSample, which needs opset 16 or later.
MIN_OPSET = 18
DEFAULT_OPSET = 18
# From opset 23 on, torch.onnx writes attention as ONNX's Attention operator, which ONNX Runtime
# (1.32) fails to run for these models' masked attention (a shape error), so no such export
# could be verified. Later opsets are beyond the exporter.
NEWEST_RUNNABLE_OPSET = 22


def exporter_opset() -> int:
    """The newest opset the installed torch.onnx writes."""
    from torch.onnx import _constants

    return getattr(_constants, "ONNX_MAX_OPSET", NEWEST_RUNNABLE_OPSET)


def newest_opset() -> int:
    """The newest opset an export can be made and verified with, here."""
    return min(exporter_opset(), NEWEST_RUNNABLE_OPSET)


def require_onnx() -> None:
    """Raises ModuleNotFoundError naming the ``export`` extra when an ONNX package is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise missing_onnx_packages(error) from None


def check_opset(opset: int, name: str = "opset") -> None:
    """Raises ValueError for an opset older than the exported operators need, or newer than
    the installed exporter writes and ONNX Runtime runs: before any work is done. ``name``
    is the option's name in the message."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ValueError(f"{name} must be a whole number, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(
            f"{name} {opset} is too old: detrkit's ONNX exports need opset {MIN_OPSET} or later "
            "(torch.onnx writes 18 and up; converted to older opsets, its graphs are invalid)"
        )
    newest, exporter = newest_opset(), exporter_opset()
    if opset > newest:
        why = f"torch.onnx {torch.__version__.split('+')[0]} writes none later than {exporter}"
        if exporter > NEWEST_RUNNABLE_OPSET:
            why += (
                f", and ONNX Runtime cannot run the Attention operator it writes from opset "
                f"{NEWEST_RUNNABLE_OPSET + 1} on"
            )
        raise ValueError(
            f"{name} {opset} is too new: detrkit can export opsets {MIN_OPSET} to {newest} here "
            f"({why})"
        )


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress and logs constant-folding notes; keep the console for
    detrkit's own messages."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(
    graph: ExportedDetector,
    size: tuple[int, int],
    opset: int,
    metadata: dict,
    attention_op: str = "gridsample",
):
    """Traces ``graph`` into an ``onnx_ir`` model with named dynamic axes and ``metadata``;
    ``attention_op`` is the form of deformable attention (see detrkit.ops.onnx_translation_table).
    """
    require_onnx()
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph,
                graph.example_inputs(size),
                dynamo=True,
                dynamic_shapes=graph.dynamic_shapes(),
                input_names=graph.input_names,
                output_names=graph.output_names,
                opset_version=opset,
                optimize=True,
                # Deformable attention as GridSample per level or detrkit's node
                # (detrkit.ops.ms_deform_attn_onnx).
                custom_translation_table=onnx_translation_table(attention_op),
            )
    except Exception as error:
        raise ExportError(f"torch.onnx could not export the model: {error}") from error
    if program.exported_program is not None:
        check_dynamic(program.exported_program, graph.input_names, "torch.onnx")
    model = program.model
    _name_axes(model)
    linear_layers_as_gemm(model)
    model.metadata_props.update(metadata)
    return model


def linear_layers_as_gemm(model) -> int:
    """Rewrites, in ``model``'s graph (onnx_ir), each linear layer on tokens, ``MatMul(x, W)``
    then ``Add(_, b)`` with x ``[B, S, K]`` and W, b weights, as ``Gemm`` on ``[B * S, K]``
    between two Reshapes: the same values, with the bias added inside the matrix product
    instead of in a pass of its own over the output (ONNX Runtime fuses the two only for 2-D
    inputs). Additions that are the graph's outputs keep their names and are left as they are.
    Returns the number of layers rewritten."""
    import numpy as np
    import onnx_ir as ir

    def constant(values: list[int]):
        return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64))})

    graph = model.graph
    rewritten = 0
    for matmul in list(graph):
        if matmul.op_type != "MatMul" or matmul.domain != "":
            continue
        x, weight = matmul.inputs
        uses = list(matmul.outputs[0].uses())
        if not (
            weight is not None
            and weight.const_value is not None
            and weight.shape is not None
            and len(weight.shape) == 2
            and x.shape is not None
            and len(x.shape) == 3
            and len(uses) == 1
            and uses[0].node.op_type == "Add"
            and uses[0].node.domain == ""
        ):
            continue
        add = uses[0].node
        bias = add.inputs[1 - uses[0].idx]
        if add.outputs[0].is_graph_output() or bias is None or bias.const_value is None:
            continue
        if bias.shape is None or list(bias.shape) != [weight.shape[1]]:
            continue
        k, n = weight.shape
        flat_shape = constant([-1, k])
        flat = ir.node("Reshape", [x, flat_shape.outputs[0]])  # [B * S, K]
        gemm = ir.node("Gemm", [flat.outputs[0], weight, bias])  # [B * S, N]
        leading = ir.node("Shape", [x], attributes={"start": 0, "end": -1})  # [B, S]
        columns = constant([n])
        shape = ir.node("Concat", [leading.outputs[0], columns.outputs[0]], attributes={"axis": 0})
        output = ir.node("Reshape", [gemm.outputs[0], shape.outputs[0]])  # [B, S, N]
        nodes = [flat_shape, flat, gemm, leading, columns, shape, output]
        for index, node in enumerate(nodes):
            node.name = f"{matmul.name}_gemm_{index}"
        graph.insert_before(matmul, nodes)
        add.outputs[0].replace_all_uses_with(output.outputs[0])
        graph.remove([add, matmul], safe=True)
        rewritten += 1
    return rewritten


def _name_axes(model) -> None:
    """Replaces the tracer's symbol names (s31, s14, ...) of the inputs' dynamic axes with
    ``batch``, ``height`` and ``width`` on the graph's inputs and outputs; raises ExportError
    when the export fixed one of them."""
    import onnx_ir as ir

    renames = {}
    for value in model.graph.inputs:
        for axis, (dim, name) in enumerate(zip(value.shape, AXIS_NAMES[value.name])):
            if name is None:
                continue
            if not isinstance(dim, ir.SymbolicDim):
                raise ExportError(
                    f"the ONNX export fixed axis {axis} ({name}) of {value.name} to {dim}; the "
                    "model's code specialises on it"
                )
            if isinstance(dim.value, str):
                renames[dim.value] = name
    # Whole symbols, and symbols inside an output's size expression: a panoptic model's
    # pred_masks is "(((height - 1)//4)) + 1" high, that is ceil(height / 4).
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b") if renames else None

    def rename(dim):
        if not isinstance(dim, ir.SymbolicDim) or not isinstance(dim.value, str) or not symbol:
            return dim
        return ir.SymbolicDim(symbol.sub(lambda found: renames[found.group(1)], dim.value))

    for value in [*model.graph.inputs, *model.graph.outputs]:
        value.shape = ir.Shape([rename(d) for d in value.shape])


def save_onnx(model, tmp: Path) -> None:
    """Writes one self-contained .onnx file (weights inside: every detrkit model is under the
    2 GB protobuf limit) to ``tmp``, a temporary file of write_atomically."""
    import onnx_ir as ir

    ir.save(model, tmp, format="protobuf")  # whatever the suffix
