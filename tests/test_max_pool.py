"""detrkit's max pooling kernel for channels-last CPU tensors against PyTorch's max pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import detrkit
from detrkit.fast import optimize_for_inference
from detrkit.fast.backbone import FastMaxPool2d
from detrkit.ops import max_pool2d
from detrkit.ops._extension import load_extension
from helpers import needs_fused

pytestmark = needs_fused


def channels_last(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator).to(dtype)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "padding"),
    [
        ((1, 64, 40, 53), 3, 2, 1),  # the ResNet stem's pool, odd and even sides
        ((2, 5, 9, 8), 3, 2, 1),  # channels that fill no vector
        ((2, 48, 9, 8), 3, 2, 1),  # three vectors
        ((2, 16, 7, 7), 2, 2, 0),
        ((1, 8, 6, 9), 3, 1, 1),
        ((1, 3, 5, 4), (3, 2), (2, 1), (1, 0)),
        ((3, 4, 1, 1), 1, 1, 0),
    ],
)
def test_equals_pytorchs_max_pooling(dtype, shape, kernel, stride, padding):
    x = channels_last(*shape, dtype=dtype)
    expected = F.max_pool2d(x, kernel, stride, padding)
    actual = load_extension().max_pool2d_channels_last(
        x, *F._pair(kernel), *F._pair(stride), *F._pair(padding)
    )
    assert actual.dtype == dtype and actual.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(actual, expected)
    assert torch.equal(max_pool2d(x, kernel, stride, padding), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels", [4, 32])  # one by one; whole vectors of 16
def test_nan_and_infinities_come_out_as_pytorchs(dtype, channels):
    x = channels_last(1, channels, 6, 6, dtype=dtype)
    x[0, 0, 2, 3] = float("nan")  # inside several windows
    x[0, 1] = float("-inf")  # a whole channel at -inf: padding must not win
    x[0, 2, 0, 0] = float("inf")
    expected = F.max_pool2d(x, 3, 2, 1)
    actual = max_pool2d(x, 3, 2, 1)
    assert actual.isnan().sum() > 0
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.nan_to_num(), expected.nan_to_num())


def test_what_the_kernel_does_not_take_runs_pytorchs():
    """Other layouts and tensors that need a gradient give PyTorch's result (and gradient)."""
    x = torch.randn(2, 3, 9, 10)  # contiguous, not channels-last
    assert torch.equal(max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
    leaf = channels_last(2, 3, 9, 10).requires_grad_()
    max_pool2d(leaf, 3, 2, 1).sum().backward()
    reference = leaf.detach().clone().requires_grad_()
    F.max_pool2d(reference, 3, 2, 1).sum().backward()
    assert torch.equal(leaf.grad, reference.grad)
    with pytest.raises(RuntimeError, match="max_pool2d_channels_last"):
        load_extension().max_pool2d_channels_last(x, 3, 3, 2, 2, 1, 1)  # not channels-last


def test_the_module_keeps_the_references_other_configurations():
    x = channels_last(1, 4, 9, 9)
    for options in (dict(ceil_mode=True), dict(dilation=2), dict(return_indices=True)):
        fast = FastMaxPool2d(3, 2, 1, **options)
        reference = torch.nn.MaxPool2d(3, 2, 1, **options)
        for a, b in zip(
            torch.atleast_1d(*[fast(x)] if not options.get("return_indices") else fast(x)),
            torch.atleast_1d(
                *[reference(x)] if not options.get("return_indices") else reference(x)
            ),
        ):
            assert torch.equal(a, b), options


def test_optimize_for_inference_uses_it_in_the_stem_on_a_cpu():
    model = detrkit.build_model("detr_r50", backbone="resnet18", enc_layers=1, dec_layers=1)
    for precision in ("fp32", "bf16"):
        fast = optimize_for_inference(model, precision)
        pools = [type(m) for m in fast.modules() if isinstance(m, torch.nn.MaxPool2d)]
        assert pools == [FastMaxPool2d], precision
    # Compiled models keep PyTorch's pool: the kernel is no graph operator.
    compiled = optimize_for_inference(model, "fp32", compile=True)
    assert FastMaxPool2d not in {type(m) for m in compiled._orig_mod.modules()}
