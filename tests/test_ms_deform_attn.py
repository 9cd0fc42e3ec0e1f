"""Multi-scale deformable attention: every implementation against the grid_sample reference."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from detrkit.ops import (
    _extension,
    attention_implementation,
    auto_implementation,
    dispatch,
    fused_kernel_available,
    ms_deform_attn,
    ms_deform_attn_projected,
    ms_deform_attn_reference,
    projected_kernel_applies,
)
from helpers import (
    ATTENTION_CASES,
    ATTENTION_RESULTS,
    BAD_INPUTS,
    FOUR_LEVELS,
    STARTS,
    assert_close_fp32,
    make_inputs,
    needs_fused,
    needs_onnx,
    set_input,
)

# The fused CPU kernel is tested wherever it runs: a machine where it cannot be built fails its
# tests (needs_fused, helpers.py), unless DETRKIT_ALLOW_NO_KERNELS=1.
IMPLEMENTATIONS = ["reference", pytest.param("cpu", marks=needs_fused)]

# The Triton kernels run on CUDA tensors only; without a GPU they are checked in Triton's
# interpreter instead (test_triton_kernels_match_reference_in_the_interpreter).
GPU_IMPLEMENTATIONS = (
    ["triton"] if torch.cuda.is_available() and dispatch.triton_available() else []
)


def on_device_of(implementation: str, tensors):
    """``tensors`` moved to the device that ``implementation`` runs on."""
    device = "cuda" if implementation in GPU_IMPLEMENTATIONS else "cpu"
    return [t.to(device) for t in tensors]


def output_and_grads(inputs, implementation: str, grad_seed: int = 1) -> list[Tensor]:
    """Output and the gradients of value, sampling_locations and attention_weights."""
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_weights)]
    output = ms_deform_attn(
        leaves[0],
        spatial_shapes,
        level_start_index,
        leaves[1],
        leaves[2],
        implementation=implementation,
    )
    generator = torch.Generator().manual_seed(grad_seed)
    grad_output = torch.randn(output.shape, generator=generator).to(output)
    output.backward(grad_output)
    return [output.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_fp32_matches_reference(implementation: str, case: str):
    inputs = make_inputs(**ATTENTION_CASES[case])
    expected = output_and_grads(inputs, "reference")
    actual = output_and_grads(inputs, implementation)
    for name, a, e in zip(ATTENTION_RESULTS, actual, expected):
        assert_close_fp32(a, e, name)


@needs_fused
def test_backward_splits_queries_when_heads_are_fewer_than_threads():
    # One (n, m) pair and 4 threads: the kernel cuts the queries into chunks with private
    # grad_value buffers, a path the other tests (8 heads) do not take.
    inputs = make_inputs(FOUR_LEVELS, batch=1, heads=1, channels=8, queries=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        actual = output_and_grads(inputs, "cpu")
    finally:
        torch.set_num_threads(threads)
    expected = output_and_grads(inputs, "reference")
    for name, a, e in zip(ATTENTION_RESULTS, actual, expected):
        assert_close_fp32(a, e, name)


# The fused kernel reads low-precision inputs exactly, computes in fp32 and rounds only its
# results, so each result is the fp32 answer within half an ulp of its format: a relative 2**-8
# for bf16 (8 significant bits) and 2**-11 for fp16, on top of the fp32 noise of
# assert_close_fp32 (which matters where results cancel to nearly zero).
LOW_PRECISION_RTOL = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("implementation", GPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_gpu_fp32_matches_reference(implementation: str, case: str):
    inputs = [t.cuda() for t in make_inputs(**ATTENTION_CASES[case], queries=70)]
    expected = output_and_grads(inputs, "reference")
    actual = output_and_grads(inputs, implementation)
    for name, a, e in zip(ATTENTION_RESULTS, actual, expected):
        assert_close_fp32(a, e, name)


# 16 s, for kernels that only a GPU runs: in `make test-full`, which a GPU session runs.
@pytest.mark.full
@pytest.mark.skipif(not dispatch.triton_available(), reason="Triton is not installed")
def test_triton_kernels_match_reference_in_the_interpreter():
    """The GPU kernels' arithmetic, run on the CPU by Triton's interpreter: forward and backward
    of every case above, a partial block of queries, fp64, bf16 and fp16 values with fp32
    locations, NaN and rows past value (triton_interpreter_check.py)."""
    script = Path(__file__).with_name("triton_interpreter_check.py")
    result = subprocess.run(
        [sys.executable, script.name],
        cwd=script.parent,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == len(ATTENTION_CASES) + 6, result.stdout


@pytest.mark.skipif(not dispatch.triton_available(), reason="Triton is not installed")
@pytest.mark.parametrize(
    "value_dtype, coordinate_dtype", [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")]
)
def test_triton_kernels_compile_for_an_h100(value_dtype: str, coordinate_dtype: str):
    """What the interpreter cannot check: that Triton compiles both kernels down to machine code
    for a GPU (an H100, sm_90, with the ptxas that Triton ships), which needs no GPU present;
    also for bf16 values with fp32 locations and weights, as the models pass them."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from detrkit.ops import ms_deform_attn_triton

    kernels = {
        ms_deform_attn_triton._forward_kernel: ms_deform_attn_triton.FORWARD_CONFIG,
        ms_deform_attn_triton._backward_kernel: ms_deform_attn_triton.BACKWARD_CONFIG,
    }
    for kernel, config in kernels.items():
        constants = {"BLOCK_Q": config.block_q, "BLOCK_D": 32, "ACC": tl.float32}
        signature, constexprs = {}, {}
        for index, param in enumerate(kernel.params):
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[(index,)] = constants[param.name]
            elif param.name in ("shapes_ptr", "starts_ptr"):
                signature[param.name] = "*i64"
            elif param.name.startswith("grad_") and param.name != "grad_out_ptr":
                signature[param.name] = "*fp32"  # the backward's fp32 accumulators
            elif param.name in ("loc_ptr", "attn_ptr"):
                signature[param.name] = f"*{coordinate_dtype}"
            elif param.name.endswith("_ptr"):  # value, output and grad_output
                signature[param.name] = f"*{value_dtype}"
            else:
                signature[param.name] = "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps}
        )
        assert compiled.asm["cubin"], kernel.__name__


@pytest.mark.skipif(not dispatch.triton_available(), reason="Triton is not installed")
def test_triton_backward_alerts_in_deterministic_mode():
    """Its atomic additions are not deterministic: like torch's own such operators, it raises
    under torch.use_deterministic_algorithms(True) and warns with warn_only=True."""
    from detrkit.ops.ms_deform_attn_triton import alert_not_deterministic

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        alert_not_deterministic()  # nothing to say
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            alert_not_deterministic()
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="warn_only=True"):
            alert_not_deterministic()
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_triton_needs_cuda_tensors():
    with pytest.raises(ValueError, match="implementation='triton' needs CUDA tensors"):
        ms_deform_attn(*make_inputs(FOUR_LEVELS), implementation="triton")


LOW_PRECISION_IMPLEMENTATIONS = IMPLEMENTATIONS[1:] + GPU_IMPLEMENTATIONS


@pytest.mark.parametrize("implementation", LOW_PRECISION_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", LOW_PRECISION_RTOL, ids=str)
def test_low_precision_matches_fp32_reference(dtype: torch.dtype, implementation: str):
    device = "cpu" if implementation == "cpu" else "cuda"
    inputs = [t.to(device) for t in make_inputs(FOUR_LEVELS, channels=32, dtype=dtype)]
    actual = output_and_grads(inputs, implementation)
    # The same (already rounded) inputs and grad_output, in fp32.
    upcast = [t.float() if t.is_floating_point() else t for t in inputs]
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = upcast
    leaves = [t.requires_grad_() for t in (value, sampling_locations, attention_weights)]
    output = ms_deform_attn_reference(value, spatial_shapes, level_start_index, *leaves[1:])
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    output.backward(grad_output.to(dtype).float().to(device))
    expected = [output.detach()] + [leaf.grad for leaf in leaves]
    for name, a, e in zip(ATTENTION_RESULTS, actual, expected):
        assert a.dtype == dtype
        assert_close_fp32(a.float(), e, name, rtol=LOW_PRECISION_RTOL[dtype])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + GPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", LOW_PRECISION_RTOL, ids=str)
@pytest.mark.parametrize("case", ["four_levels", "four_levels_odd_channels"])
def test_low_precision_values_with_fp32_locations(
    dtype: torch.dtype, implementation: str, case: str
):
    """bf16/fp16 values with fp32 locations and weights (as the models pass them under autocast)
    give exactly the fp32 computation on the same numbers, rounded once to the values' dtype,
    gradients included. The fused kernels read the narrow values as they are and accumulate in
    fp32; for the reference the dispatcher converts them (this checks that it does, and the
    result dtypes). On a GPU the Triton backward's atomic additions sum grad_value in any order,
    so there it may differ by an ulp of the format (the interpreter check compares it exactly)."""
    value, shapes, starts, locations, weights = on_device_of(
        implementation, make_inputs(**ATTENTION_CASES[case])
    )
    value = value.to(dtype)
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(
        value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], generator=generator
    ).to(value)
    results = []
    for narrow_value, rounded in ((value, lambda t: t), (value.float(), lambda t: t.to(dtype))):
        leaves = [t.detach().requires_grad_() for t in (narrow_value, locations, weights)]
        output = rounded(
            ms_deform_attn(
                leaves[0], shapes, starts, leaves[1], leaves[2], implementation=implementation
            )
        )
        output.backward(grad_output)
        results.append([output.detach()] + [leaf.grad for leaf in leaves])
    mixed, wide = results
    for name, actual, expected, expected_dtype in zip(
        ATTENTION_RESULTS, mixed, wide, [dtype, dtype, torch.float32, torch.float32]
    ):
        assert actual.dtype == expected_dtype, name
        if implementation == "triton" and name == "grad_value":
            assert_close_fp32(actual.float(), expected.float(), name, LOW_PRECISION_RTOL[dtype])
        elif dtype == torch.float16 and name == "output":
            # Bit for bit on the AMX Xeon; on an AMD EPYC (AVX-512, no FP16 arithmetic) the
            # compiler's conversion of the fp32 sum to fp16 can differ by one ulp.
            torch.testing.assert_close(
                actual, expected.to(expected_dtype), rtol=2**-10, atol=2**-24, msg=name
            )
        else:
            torch.testing.assert_close(
                actual, expected.to(expected_dtype), rtol=0, atol=0, msg=name
            )


def test_locations_may_be_fp32_only_with_low_precision_values():
    value, shapes, starts, locations, weights = make_inputs(FOUR_LEVELS)
    # A wrong implementation is named with the dtype the caller passed.
    with pytest.raises(ValueError, match=r"dtype torch\.bfloat16"):
        ms_deform_attn(
            value.bfloat16(), shapes, starts, locations, weights, implementation="triton"
        )
    with pytest.raises(ValueError, match="sampling_locations must have value's dtype"):
        ms_deform_attn(value.double(), shapes, starts, locations, weights)
    with pytest.raises(ValueError, match="attention_weights must have sampling_locations' dtype"):
        ms_deform_attn(value.bfloat16(), shapes, starts, locations, weights.bfloat16())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + GPU_IMPLEMENTATIONS)
def test_gradcheck_float64(implementation: str):
    inputs = make_inputs(
        [(3, 4), (2, 2)], batch=2, heads=2, channels=3, queries=3, points=2, dtype=torch.float64
    )
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = on_device_of(
        implementation, inputs
    )

    def attention(value, sampling_locations, attention_weights):
        return ms_deform_attn(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            implementation=implementation,
        )

    leaves = [t.requires_grad_() for t in (value, sampling_locations, attention_weights)]
    assert torch.autograd.gradcheck(attention, leaves, eps=1e-6, atol=1e-6)


def every_other(tensor: Tensor, dim: int) -> Tensor:
    """A view equal to tensor, taking every other element of a twice larger one along dim."""
    shape = list(tensor.shape)
    shape[dim] *= 2
    larger = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    view = larger.narrow(dim, 0, shape[dim]).unflatten(dim, (-1, 2)).select(dim + 1, 0)
    view.copy_(tensor)
    return view


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + GPU_IMPLEMENTATIONS)
def test_non_contiguous_inputs(implementation: str):
    inputs = on_device_of(implementation, make_inputs(FOUR_LEVELS, channels=8))
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    strided = (
        value.transpose(2, 3).contiguous().transpose(2, 3),  # same values, permuted strides
        every_other(spatial_shapes, 0),
        every_other(level_start_index, 0),
        every_other(sampling_locations, 4),
        attention_weights.permute(4, 0, 1, 2, 3).contiguous().permute(1, 2, 3, 4, 0),
    )
    assert not any(t.is_contiguous() for t in strided)
    expected = output_and_grads(inputs, "reference")
    actual = output_and_grads(strided, implementation)
    for name, a, e in zip(ATTENTION_RESULTS, actual, expected):
        assert_close_fp32(a, e, name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + GPU_IMPLEMENTATIONS)
def test_nan_location_propagates(implementation: str):
    inputs = on_device_of(implementation, make_inputs(FOUR_LEVELS))
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    sampling_locations[0, 1, 2, 3, 0, 1] = float("nan")
    output = ms_deform_attn(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        implementation=implementation,
    ).unflatten(-1, (8, -1))  # [N, Lq, M, D]
    assert output[0, 1, 2].isnan().all()
    output[0, 1, 2] = 0
    assert not output.isnan().any()


def test_auto_picks_the_fused_kernel_of_the_device():
    expected = "cpu" if fused_kernel_available() else "reference"
    assert auto_implementation("cpu", torch.float32) == expected
    assert auto_implementation("cpu", torch.bfloat16) == expected
    # Triton on a GPU it compiles for; without one there is nothing to run it on.
    expected = "triton" if GPU_IMPLEMENTATIONS else "reference"
    if GPU_IMPLEMENTATIONS and torch.cuda.get_device_capability() < (7, 0):
        expected = "reference"
    assert auto_implementation("cuda", torch.float16) == expected
    assert auto_implementation("meta", torch.float32) == "reference"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_invalid_inputs_name_the_argument(case: str):
    corrupt, name = BAD_INPUTS[case]
    inputs = corrupt(make_inputs(FOUR_LEVELS))
    with pytest.raises(ValueError, match=name):
        ms_deform_attn(*inputs)


def test_checks_never_read_level_sizes_off_the_cpu():
    """On a GPU, reading spatial_shapes or level_start_index makes the host wait for all queued
    work. Meta tensors have no values: any read fails, so passing the checks shows none."""
    from detrkit.ops._validation import check_ms_deform_attn_inputs

    inputs = [t.to("meta") for t in make_inputs(FOUR_LEVELS)]
    check_ms_deform_attn_inputs(*inputs)
    # Checks of shapes and dtypes still apply.
    with pytest.raises(ValueError, match="level_start_index"):
        check_ms_deform_attn_inputs(*set_input(STARTS, lambda t: t[:-1])(inputs))


def test_invalid_implementation():
    with pytest.raises(ValueError, match="implementation"):
        ms_deform_attn(*make_inputs(FOUR_LEVELS), implementation="cuda")


class TinyAttention(nn.Module):
    """A minimal module around the op: a value projection, the op, and an output projection."""

    def __init__(self, spatial_shapes: Tensor, level_start_index: Tensor, heads: int, dim: int):
        super().__init__()
        self.heads = heads
        self.implementation = "auto"
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.register_buffer("spatial_shapes", spatial_shapes)
        self.register_buffer("level_start_index", level_start_index)

    def forward(self, x: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
        value = self.value_proj(x).unflatten(-1, (self.heads, -1))  # [N, S, M, D]
        output = ms_deform_attn(
            value,
            self.spatial_shapes,
            self.level_start_index,
            sampling_locations,
            attention_weights,
            implementation=self.implementation,
        )  # [N, Lq, M*D]
        return self.output_proj(output)


def tiny_module_and_inputs():
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = make_inputs(
        FOUR_LEVELS, heads=4, channels=8
    )
    torch.manual_seed(0)
    module = TinyAttention(spatial_shapes, level_start_index, heads=4, dim=32)
    x = value.flatten(2)  # [N, S, M*D]
    return module, (x, sampling_locations, attention_weights)


@pytest.mark.parametrize(
    "implementation", [pytest.param("cpu", marks=needs_fused), *GPU_IMPLEMENTATIONS]
)
def test_torch_compile_fullgraph_matches_eager(implementation: str):
    module, inputs = tiny_module_and_inputs()
    inputs = on_device_of(implementation, inputs)
    module.implementation = implementation
    module.to(inputs[0].device)
    compiled = torch.compile(module, fullgraph=True, backend="inductor")

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in inputs]
        module.zero_grad()
        output = fn(*leaves)
        output.square().sum().backward()
        grads = [leaf.grad for leaf in leaves] + [p.grad.clone() for p in module.parameters()]
        return [output.detach(), *grads]

    for a, e in zip(run(compiled), run(module)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_fused
def test_torch_export():
    module, inputs = tiny_module_and_inputs()
    exported = torch.export.export(module, inputs)
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "detrkit.ms_deform_attn_forward.default" in targets
    torch.testing.assert_close(exported.module()(*inputs), module(*inputs))


@needs_fused
def test_torch_export_of_bf16_values_with_fp32_locations():
    """The op's fake implementation gives the output value's dtype for mixed inputs, so a traced
    graph agrees with eager."""
    module, (x, locations, weights) = tiny_module_and_inputs()
    module.to(torch.bfloat16)
    inputs = (x.bfloat16(), locations, weights)
    exported = torch.export.export(module, inputs)
    eager = module(*inputs)
    assert eager.dtype == torch.bfloat16
    torch.testing.assert_close(exported.module()(*inputs), eager, rtol=0, atol=0)


def test_onnx_op_runs_the_reference_and_its_gradient():
    """In PyTorch the "onnx" implementation is the reference behind one custom op, gradient
    included, so that ms_deform_attn's contract holds for it too."""
    inputs = make_inputs(FOUR_LEVELS, channels=32)
    for actual, expected in zip(
        output_and_grads(inputs, "onnx"), output_and_grads(inputs, "reference")
    ):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


class OnnxAttention(nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, locations, weights):
        return ms_deform_attn(
            value, spatial_shapes, level_start_index, locations, weights, implementation="onnx"
        )


# (batch, level sizes, queries): the export's, then other batches, sizes, queries and level sizes
# (one level 1 pixel high), one of them a batch of 3.
ONNX_CASES = [
    (2, [(12, 14), (6, 7), (3, 4), (2, 2)], 9),
    (1, [(20, 27), (10, 14), (5, 7), (3, 4)], 40),
    (3, [(9, 5), (5, 3), (3, 2), (1, 1)], 7),
    (1, [(31, 8), (16, 4), (8, 2), (4, 1)], 1),
]


@needs_onnx
@pytest.mark.parametrize("opset", ["oldest", "newest"])
def test_onnx_graph_is_grid_sample_and_matches_reference_at_other_sizes(opset: str):
    """The "onnx" op exported with its translation: standard operators with GridSample per
    level, traced once, and on ONNX Runtime within 1e-5 of the reference at other batches, level
    sizes and query counts, with points off the maps (make_inputs: locations in [-0.2, 1.2])."""
    import onnxruntime

    from detrkit.deploy import MIN_OPSET, newest_opset
    from detrkit.ops import onnx_translation_table

    def inputs(batch, shapes, queries, seed):
        return make_inputs(
            shapes, batch=batch, heads=3, channels=4, queries=queries, points=2, seed=seed
        )

    names = ["value", "spatial_shapes", "level_start_index", "locations", "weights"]
    batch, length, queries = (torch.export.Dim(name) for name in ("batch", "length", "queries"))
    program = torch.onnx.export(
        OnnxAttention(),
        inputs(*ONNX_CASES[0], seed=0),
        dynamo=True,
        input_names=names,
        dynamic_shapes=(
            {0: batch, 1: length},
            None,
            None,
            {0: batch, 1: queries},
            {0: batch, 1: queries},
        ),
        opset_version=MIN_OPSET if opset == "oldest" else newest_opset(),
        custom_translation_table=onnx_translation_table(),
        optimize=True,
        verbose=False,
    )
    model = program.model_proto
    operators = [node.op_type for node in model.graph.node]
    assert operators.count("GridSample") == 4
    assert {node.domain for node in model.graph.node} == {""} and not model.functions
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for seed, case in enumerate(ONNX_CASES):
        tensors = inputs(*case, seed=seed)
        (actual,) = session.run(None, dict(zip(names, (t.numpy() for t in tensors))))
        expected = ms_deform_attn_reference(*tensors)
        torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=0, atol=1e-5)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    # A fresh cache over the real loader, so the real (built) kernel stays untouched.
    monkeypatch.setattr(
        dispatch, "load_extension", functools.cache(_extension.load_extension.__wrapped__)
    )
    inputs = make_inputs(FOUR_LEVELS)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found") as record:
        first = ms_deform_attn(*inputs)
        second = ms_deform_attn(*inputs)
    assert len([w for w in record if "could not be built" in str(w.message)]) == 1
    expected = ms_deform_attn_reference(*inputs)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="could not be built"):
        ms_deform_attn(*inputs, implementation="cpu")


@pytest.mark.parametrize("name", ["deformable", "deformable_refine"])
def test_deformable_detr_runs_under_bf16_autocast(name):
    """`detrkit train --amp bf16` and users' own autocast: the softmaxed attention weights come
    out in bf16 while the sampling locations stay float32; the attention takes both, forward and
    backward, and the boxes stay near fp32's."""
    from helpers import tiny_model

    model = tiny_model(name)
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    with torch.no_grad():
        expected = model(images, mask)["pred_boxes"]
    # eval mode: no dropout, so the outputs compare with fp32's; gradients flow all the same.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images, mask)
    outputs["pred_logits"].float().sum().backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for n, p in model.named_parameters()
        if "attention_weights" in n or "sampling_offsets" in n
    )
    # bf16 keeps 8 bits of mantissa: boxes in [0, 1] agree to a few hundredths.
    assert (outputs["pred_boxes"].float() - expected).abs().max() < 0.05


def projected_inputs(levels: list[tuple[int, int]], heads: int, channels: int, points: int, dtype):
    """value, shapes, starts, reference points and a projection (offsets of a few pixels, some
    reaching off the maps, then logits) for ms_deform_attn_projected."""
    g = torch.Generator().manual_seed(3)
    value, shapes, starts, _, _ = make_inputs(levels, heads=heads, channels=channels, dtype=dtype)
    batch, queries, count = value.shape[0], 9, heads * len(levels) * points
    coordinates = torch.float64 if dtype == torch.float64 else torch.float32
    reference = torch.rand(batch, queries, len(levels), 2, generator=g).to(coordinates)
    offsets = torch.randn(batch, queries, count * 2, generator=g) * 3
    logits = torch.randn(batch, queries, count, generator=g) * 4
    return value, shapes, starts, reference, torch.cat([offsets, logits], -1).to(dtype)


def projected_by_the_reference(value, shapes, starts, reference, projection):
    """The reference's own steps: softmax of the logits, reference + offsets / (W, H), then the
    grid_sample attention, in the coordinates' dtype."""
    batch, queries, width = projection.shape
    heads, levels = value.shape[2], shapes.shape[0]
    points = width // (3 * heads * levels)
    offsets, logits = projection.to(reference.dtype).split([width // 3 * 2, width // 3], -1)
    weights = logits.reshape(batch, queries, heads, -1).softmax(-1)
    weights = weights.view(batch, queries, heads, levels, points)
    normalizer = shapes.flip(-1).to(reference.dtype)  # [L, 2] (W, H)
    locations = (
        reference[:, :, None, :, None, :]
        + offsets.view(batch, queries, heads, levels, points, 2)
        / normalizer[None, None, None, :, None, :]
    )
    return ms_deform_attn_reference(value.to(reference.dtype), shapes, starts, locations, weights)


# (levels, heads, channels, points): 3 points per head (part of a vector, the kernel's scalar
# softmax), 16 (one vector: Deformable DETR's 4 levels x 4 points) and 32 (two).
PROJECTED_CASES = {
    "3 points": ([(6, 11)], 2, 5, 3),
    "16 points": (FOUR_LEVELS, 8, 32, 4),
    "32 points, odd channels": (FOUR_LEVELS, 3, 45, 8),
    # More than 16 but not whole vectors, and more than the vector path keeps (64): the scalar
    # path for the softmax and locations.
    "20 points": (FOUR_LEVELS, 2, 16, 5),
    "80 points": (FOUR_LEVELS, 2, 16, 20),
}


@needs_fused
@pytest.mark.parametrize("case", PROJECTED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_projected_kernel_computes_the_reference_steps(case, dtype):
    inputs = projected_inputs(*PROJECTED_CASES[case], dtype)
    with torch.no_grad():
        got = ms_deform_attn_projected(*inputs)
    expected = projected_by_the_reference(*inputs)
    assert got.dtype == dtype and got.shape == expected.shape
    # fp32: its own exp and summation order; bf16: the output rounded once.
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2**-8}[dtype]
    assert_close_fp32(got.to(expected.dtype), expected, "output", rtol=rtol)


@needs_fused
@pytest.mark.parametrize(
    "bad", ["nan logit", "infinite logit", "nan offset", "nan logit, points off the map"]
)
def test_projected_kernel_poisons_only_the_head_of_a_nan(bad):
    """A NaN or infinite logit and a NaN offset give NaN for their query head, as the reference's
    softmax and grid_sample do, also when every point of the head lies off the map."""
    value, shapes, starts, reference, projection = projected_inputs(
        FOUR_LEVELS, 8, 32, 4, torch.float32
    )
    heads, points = 8, len(FOUR_LEVELS) * 4
    head = 5  # query 2 of image 1
    logit = heads * points * 2 + head * points + 7
    column = {"nan offset": head * points * 2 + 3}.get(bad, logit)
    projection[1, 2, column] = float("inf") if bad == "infinite logit" else float("nan")
    if bad.endswith("off the map"):  # offsets of 1000 pixels
        projection[1, 2, head * points * 2 : (head + 1) * points * 2] = 1000.0
    with torch.no_grad():
        got = ms_deform_attn_projected(value, shapes, starts, reference, projection)
    expected = projected_by_the_reference(value, shapes, starts, reference, projection)
    poisoned = got.view(*got.shape[:2], heads, -1).isnan()
    assert poisoned[1, 2, head].all()  # as the reference: softmax and grid_sample give NaN
    assert expected.view(*got.shape[:2], heads, -1)[1, 2, head].isnan().all()
    poisoned[1, 2, head] = False
    assert not poisoned.any()


@needs_fused
def test_projected_kernel_rejects_inconsistent_inputs():
    value, shapes, starts, reference, projection = projected_inputs(
        FOUR_LEVELS, 8, 32, 4, torch.float32
    )
    cases = {
        "value must be": (value[0], shapes, starts, reference, projection),
        "level_start_index must be": (value, shapes, starts[:-1], reference, projection),
        "reference_points must be": (value, shapes, starts, reference[:, :, :2], projection),
        "projection must be": (value, shapes, starts, reference, projection[..., :-1]),
        "projection must be in value's dtype": (
            value,
            shapes,
            starts,
            reference,
            projection.double(),
        ),
        "reference_points must be in value's accumulation dtype": (
            value.bfloat16(),
            shapes,
            starts,
            reference.bfloat16(),
            projection.bfloat16(),
        ),
        "sum of H \\* W": (value, shapes + 1, starts, reference, projection),
    }
    for message, inputs in cases.items():
        with pytest.raises(RuntimeError, match=message):
            ms_deform_attn_projected(*inputs)
    # Level sizes of another integer type: named, as ms_deform_attn names them.
    with pytest.raises(ValueError, match="spatial_shapes must be int64"):
        ms_deform_attn_projected(value, shapes.int(), starts, reference, projection)
    with pytest.raises(ValueError, match="level_start_index must be int64"):
        ms_deform_attn_projected(value, shapes, starts.int(), reference, projection)


def test_projected_kernel_applies_only_to_cpu_inference_of_points():
    value, _, _, reference, projection = projected_inputs(FOUR_LEVELS, 8, 32, 4, torch.float32)
    with torch.no_grad():
        assert projected_kernel_applies(value, reference, projection) == fused_kernel_available()
        # Boxes as reference points (two-stage, refinement), other dtypes, the reference chosen.
        assert not projected_kernel_applies(value, reference.repeat(1, 1, 1, 2), projection)
        assert not projected_kernel_applies(
            value.bfloat16(), reference.bfloat16(), projection.bfloat16()
        )
        assert not projected_kernel_applies(value, reference, projection.double())
        with attention_implementation("reference"):
            assert not projected_kernel_applies(value, reference, projection)
    # A gradient wanted: the separate operators, which autograd follows.
    assert not projected_kernel_applies(value.requires_grad_(), reference, projection)
