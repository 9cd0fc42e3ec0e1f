"""Multi-scale deformable attention as one custom op that ONNX export writes as ``GridSample``, or
as one node of detrkit's own.

In PyTorch, ``detrkit::ms_deform_attn_onnx`` computes what the reference does (and its gradient).
Its ONNX translation, :func:`onnx_translation_table`, which torch.onnx's exporter takes as
``custom_translation_table``, has two forms:

- ``"gridsample"``, which every runtime runs, samples each level with ONNX ``GridSample`` (opset
  16 and later): ``value`` is cut into levels with ``Slice`` and ``Reshape`` whose bounds are
  read from the ``spatial_shapes`` and ``level_start_index`` inputs inside the graph, so the
  graph takes any image size and batch. Runtimes execute ``GridSample`` with their own kernels
  (OpenVINO's is JIT compiled), measured faster than the gather decomposition of
  :mod:`ms_deform_attn_portable` (docs/performance.md gives the numbers). The grid is laid out
  ``[N * M, P, Lq, 2]``, so that the samples, ``[N * M, D, P, Lq]``, are weighted and summed
  over the points along whole rows of queries rather than rows of P.
- ``"detrkit"`` writes the op as one ``ai.detrkit::MultiScaleDeformableAttention`` node with the
  op's five inputs and its output, which ONNX Runtime and OpenVINO run with detrkit's libraries
  loaded (:mod:`detrkit.ops.runtime_ops`): the samples are never written out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detrkit.ops.ms_deform_attn_reference import ms_deform_attn_reference

# The node of the "detrkit" form, run by csrc/onnxruntime_ops.cpp and csrc/openvino_ops.cpp.
ONNX_DOMAIN = "ai.detrkit"
ONNX_OP = "MultiScaleDeformableAttention"
ATTENTION_OPS = ("gridsample", "detrkit")


@torch.library.custom_op("detrkit::ms_deform_attn_onnx", mutates_args=())
def ms_deform_attn_onnx(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same contract and result as :func:`detrkit.ops.ms_deform_attn_reference` (which it runs);
    one node of a traced graph, which ONNX export writes with :func:`onnx_translation_table`."""
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn_onnx.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    # The reference's own gradient, recomputed: this op exists for export, and training runs
    # the fused kernels or the reference itself.
    value, shapes, starts, locations, weights = ctx.saved_tensors
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    with torch.enable_grad():
        output = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    grads = torch.autograd.grad(output, leaves, grad_output)
    return grads[0], None, None, grads[1], grads[2]


ms_deform_attn_onnx.register_autograd(_backward, setup_context=_setup_context)


def onnx_translation_table(attention_op: str = "gridsample") -> dict:
    """``{op: translation}`` for ``torch.onnx.export(..., custom_translation_table=...)``: writes
    ``detrkit::ms_deform_attn_onnx`` as opset-18 operators (GridSample, Slice, Reshape, Mul,
    ReduceSum), which the exporter converts to the opset asked for, or with ``attention_op=
    "detrkit"`` as one node of detrkit's domain. Needs onnxscript."""
    if attention_op not in ATTENTION_OPS:
        raise ValueError(
            f"attention_op must be one of {', '.join(ATTENTION_OPS)}, got {attention_op!r}"
        )
    translate = _translate if attention_op == "gridsample" else _translate_to_detrkit_op
    return {torch.ops.detrkit.ms_deform_attn_onnx.default: translate}


def _detrkit_op_schema():
    """The ONNX schema of detrkit's node, registered with onnx once (onnxscript writes only
    operators whose schema it finds)."""
    import onnx
    from onnx.defs import OpSchema

    if not onnx.defs.has(ONNX_OP, ONNX_DOMAIN):
        parameter = OpSchema.FormalParameter
        onnx.defs.register_schema(
            OpSchema(
                ONNX_OP,
                ONNX_DOMAIN,
                1,
                doc="Multi-scale deformable attention (Deformable DETR); see detrkit.ops.",
                inputs=[
                    parameter("value", "T"),  # [N, S, M, D]
                    parameter("spatial_shapes", "tensor(int64)"),  # [L, 2] (H, W)
                    parameter("level_start_index", "tensor(int64)"),  # [L]
                    parameter("sampling_locations", "T"),  # [N, Lq, M, L, P, 2] in [0, 1]
                    parameter("attention_weights", "T"),  # [N, Lq, M, L, P]
                ],
                outputs=[parameter("output", "T")],  # [N, Lq, M * D]
                type_constraints=[("T", ["tensor(float)"], "float32 values and locations")],
            )
        )
    return onnx.defs.get_schema(ONNX_OP, 1, ONNX_DOMAIN)


def _translate_to_detrkit_op(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    from onnxscript import values

    opset = values.Opset(ONNX_DOMAIN, 1)
    node = values.Op(opset, ONNX_OP, _detrkit_op_schema())
    return node(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _static_dims(tensor, axes: tuple[int, ...], name: str) -> list[int]:
    dims = [tensor.shape[axis] for axis in axes]
    if not all(isinstance(dim, int) for dim in dims):
        raise ValueError(
            f"ONNX export of deformable attention needs static sizes of {name} on axes {axes}, "
            f"got shape {tensor.shape}"
        )
    return dims


def _translate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The ONNX graph of the op, traced by onnxscript. Heads (M), channels (D), levels (L) and
    points (P) are the model's and fixed; the batch (N), the positions (S) and the queries (Lq)
    and every level's (H, W) are read from the inputs in the graph."""
    from onnxscript import opset18 as op

    M, D = _static_dims(value, (2, 3), "value")
    (L,) = _static_dims(spatial_shapes, (0,), "spatial_shapes")
    (P,) = _static_dims(sampling_locations, (4,), "sampling_locations")

    def ints(*values: int):
        return op.Constant(value_ints=list(values))

    batch = op.Shape(value, start=0, end=1)
    queries = op.Shape(sampling_locations, start=1, end=2)
    images = op.Mul(batch, ints(M))  # N * M: GridSample's batch, one image per head
    # [N, S, M, D] -> [N, M, D, S]: each level's positions become a [D, H, W] image per head.
    columns = op.Transpose(value, perm=[0, 2, 3, 1])
    # GridSample's [-1, 1] with align_corners=0 puts pixel centres at (i + 0.5) / size, as the
    # locations do. [N, Lq, M, L, P, 2] -> [N, M, L, P, Lq, 2]
    grids = op.Sub(op.Mul(sampling_locations, 2.0), 1.0)
    grids = op.Transpose(grids, perm=[0, 2, 3, 4, 1, 5])
    weights = op.Transpose(attention_weights, perm=[0, 2, 3, 4, 1])  # [N, M, L, P, Lq]
    grid_shape = op.Concat(images, ints(P), queries, ints(2), axis=0)
    weight_shape = op.Concat(images, ints(1, P), queries, axis=0)

    output = None
    for level in range(L):
        index = op.Constant(value_int=level)
        size = op.Gather(spatial_shapes, index, axis=0)  # [H, W]
        start = op.Gather(level_start_index, ints(level), axis=0)
        end = op.Add(start, op.ReduceProd(size, keepdims=1))
        image = op.Slice(columns, start, end, ints(3))  # [N, M, D, H * W]
        image = op.Reshape(image, op.Concat(images, ints(D), size, axis=0))  # [N * M, D, H, W]
        grid = op.Reshape(op.Gather(grids, index, axis=2), grid_shape)  # [N * M, P, Lq, 2]
        samples = op.GridSample(
            image, grid, mode="bilinear", padding_mode="zeros", align_corners=0
        )  # [N * M, D, P, Lq]
        weight = op.Reshape(op.Gather(weights, index, axis=2), weight_shape)  # [N * M, 1, P, Lq]
        level_sum = op.ReduceSum(op.Mul(samples, weight), ints(2), keepdims=0)  # [N * M, D, Lq]
        output = level_sum if output is None else op.Add(output, level_sum)
    # [N * M, D, Lq] -> [N, M * D, Lq] -> [N, Lq, M * D]
    output = op.Reshape(output, op.Concat(batch, ints(M * D), queries, axis=0))
    return op.Transpose(output, perm=[0, 2, 1])
