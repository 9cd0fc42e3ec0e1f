"""Checks the Triton kernels of multi-scale deformable attention on the CPU, in Triton's
interpreter, against the grid_sample reference: forward and backward, every case of
test_ms_deform_attn.py, partial query blocks, points off the map, fp64, NaN, and level
sizes that reach past value.

Run by test_ms_deform_attn.py in a subprocess, because TRITON_INTERPRET must be set before the
kernels are defined: ``TRITON_INTERPRET=1 python tests/triton_interpreter_check.py``. Exits
non-zero with the mismatch on failure; prints one line per case on success.
"""

from __future__ import annotations

import os

import torch

from detrkit.ops import ms_deform_attn_reference
from helpers import ATTENTION_CASES, ATTENTION_RESULTS, FOUR_LEVELS, assert_close_fp32, make_inputs

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
from detrkit.ops import ms_deform_attn_triton  # noqa: E402  (after the check above)


def reference_output_and_grads(inputs, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_weights)]
    output = ms_deform_attn_reference(leaves[0], spatial_shapes, level_start_index, *leaves[1:])
    output.backward(grad_output)
    return [output.detach()] + [leaf.grad for leaf in leaves]


def triton_output_and_grads(inputs, grad_output):
    output = ms_deform_attn_triton.forward(*inputs)
    return [output, *ms_deform_attn_triton.backward(*inputs, grad_output)]


def check(name: str, inputs, compare) -> None:
    generator = torch.Generator().manual_seed(1)
    N, _, M, D = inputs[0].shape
    shape = (N, inputs[3].shape[1], M * D)
    grad_output = torch.randn(shape, generator=generator).to(inputs[0].dtype)
    expected = reference_output_and_grads(inputs, grad_output)
    actual = triton_output_and_grads(inputs, grad_output)
    for what, a, e in zip(ATTENTION_RESULTS, actual, expected):
        assert a.dtype == e.dtype, f"{name} {what}: dtype {a.dtype}, expected {e.dtype}"
        compare(a, e, f"{name} {what}")
    print(f"{name}: ok")


def check_narrow_values_with_fp32_locations() -> None:
    """bf16 / fp16 values with fp32 locations and weights, as the models pass them: the kernels'
    fp32 results on the same numbers, with output and grad_value rounded once (the interpreter
    runs programs in turn, so even the atomic additions sum in the same order). The fp32
    gradients must match exactly; so must the fp16 results. The interpreter truncates fp32 to
    bf16 where a GPU rounds to nearest (and torch does), so bf16 results may be an ulp apart."""
    for dtype in (torch.bfloat16, torch.float16):
        value, *rest = make_inputs(FOUR_LEVELS, heads=2, channels=32)
        value = value.to(dtype)
        grad_output = torch.randn(value.shape[0], rest[2].shape[1], 64).to(dtype)
        mixed = triton_output_and_grads((value, *rest), grad_output)
        wide = triton_output_and_grads((value.float(), *rest), grad_output.float())
        for what, a, e in zip(ATTENTION_RESULTS, mixed, wide):
            narrow = what in ("output", "grad_value")
            expected = e.to(dtype) if narrow else e
            assert a.dtype == expected.dtype, f"{dtype} {what}: dtype {a.dtype}"
            ulp = 2**-7 if narrow and dtype == torch.bfloat16 else 0
            torch.testing.assert_close(a, expected, rtol=ulp, atol=0, msg=f"{dtype} {what}")
    print("narrow_values_fp32_locations: ok")


def main() -> None:
    # Two heads where a case leaves the default of eight: the interpreter runs every program in
    # turn, and heads only multiply programs that index the same way.
    for case, options in ATTENTION_CASES.items():
        check(case, make_inputs(**{"heads": 2, **options}), assert_close_fp32)
    # 70 queries: a full block of 64 and a partial one.
    check("two_blocks", make_inputs([(6, 11)], heads=2, queries=70), assert_close_fp32)
    # The decoder's sampling before projection: one head reading all 256 channels.
    check(
        "one_head_256_channels", make_inputs(FOUR_LEVELS, heads=1, channels=256), assert_close_fp32
    )
    check(
        "float64",
        make_inputs(FOUR_LEVELS, heads=2, channels=3, dtype=torch.float64),
        lambda a, e, name: torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name),
    )
    check_narrow_values_with_fp32_locations()
    inputs = make_inputs(FOUR_LEVELS, heads=3)
    inputs[3][0, 1, 2, 3, 0, 1] = float("nan")
    output = ms_deform_attn_triton.forward(*inputs).unflatten(-1, (3, -1))  # [N, Lq, M, D]
    assert output[0, 1, 2].isnan().all(), "a NaN location must poison its query and head"
    output[0, 1, 2] = 0
    assert not output.isnan().any(), "a NaN location must not reach other queries or heads"
    print("nan: ok")

    # Level sizes are not checked against value on a GPU: rows past value must read zeros
    # (not memory past the tensor) and take no gradient, as if value went on with zero rows.
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(FOUR_LEVELS, heads=2)
    shifted = level_start_index + 5  # the last level's rows now run past value
    longer = torch.cat([value, value.new_zeros(value.shape[0], 5, *value.shape[2:])], 1)
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    for what, past, within in zip(
        ATTENTION_RESULTS,
        triton_output_and_grads((value, spatial_shapes, shifted, locations, weights), grad_output),
        triton_output_and_grads((longer, spatial_shapes, shifted, locations, weights), grad_output),
    ):
        within = within[:, : value.shape[1]] if what == "grad_value" else within
        torch.testing.assert_close(past, within, rtol=0, atol=0, msg=f"rows past value: {what}")
    print("rows_past_value: ok")


if __name__ == "__main__":
    main()
