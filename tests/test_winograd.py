"""Winograd F(4x4, 3x3) convolutions (detrkit.ops.winograd) and their use by
optimize_for_inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import detrkit
from detrkit.ops import WinogradConv2d, winograd_conv2d, winograd_weight
from detrkit.ops.winograd import is_winograd_compatible
from helpers import needs_fused


def exact_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), weight.double(), bias.double(), padding=1)


@needs_fused
@pytest.mark.parametrize(
    "batch, in_channels, out_channels, height, width",
    [
        (1, 64, 64, 32, 40),  # whole tiles, whole channel blocks
        (2, 5, 7, 9, 11),  # partial tiles at the bottom and right, partial channel blocks
        (3, 17, 33, 1, 6),  # a one-row image: most of each patch is padding
        (1, 3, 2, 4, 1),
    ],
)
def test_matches_a_direct_convolution(batch, in_channels, out_channels, height, width):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator) / in_channels**0.5
    bias = torch.randn(out_channels, generator=generator)
    expected = exact_conv(x, weight, bias)
    # The scale of fp32 rounding in a sum of products: the same convolution of absolute values.
    # A bound in it does not depend on how accurate this machine's direct convolution is (the
    # oneDNN kernels of an AVX-512 Xeon err 6x less than those of an AVX2 EPYC).
    scale = exact_conv(x.abs(), weight.abs(), bias.abs()).max()
    epsilon = torch.finfo(torch.float32).eps

    for layout in (torch.contiguous_format, torch.channels_last):
        got = winograd_conv2d(x.to(memory_format=layout), winograd_weight(weight), bias)
        assert got.shape == expected.shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        error = (got.double() - expected).abs().max()
        # F(4x4, 3x3)'s constants (up to 8) grow fp32 rounding: measured up to 15 eps * scale.
        assert error <= 32 * epsilon * scale and error < 1e-4 * expected.abs().max()


@needs_fused
def test_the_module_computes_the_convolution_it_was_made_from():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    x = torch.randn(2, 16, 13, 10)
    module = WinogradConv2d.from_conv(conv)
    assert module.weight is conv.weight and module.bias is None  # shared, not copied
    assert list(module.state_dict()) == list(conv.state_dict())  # checkpoints are unchanged
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x), atol=5e-5, rtol=0)
        conv.weight.mul_(2)
        assert not torch.allclose(module(x), conv(x), atol=1e-3)  # stale transformed weights
        module.refresh()
        torch.testing.assert_close(module(x), conv(x), atol=5e-5, rtol=0)
        before = module(x)
        module.load_state_dict({"weight": -conv.weight})  # loading refreshes them too
        torch.testing.assert_close(module(x), -before, atol=5e-5, rtol=0)


@needs_fused
def test_training_and_other_dtypes_run_the_usual_convolution(monkeypatch):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    module = WinogradConv2d.from_conv(conv)
    x = torch.randn(1, 8, 12, 12)
    calls = []
    monkeypatch.setattr(
        "detrkit.ops.winograd.winograd_conv2d", lambda *args: calls.append(args) or conv(args[0])
    )
    out = module(x)  # gradients on: the kernels have no backward, so the usual convolution runs
    assert out.grad_fn is not None and not calls
    out.sum().backward()
    assert conv.weight.grad is not None
    with torch.no_grad():
        module.double()(x.double())
        module.float()
        module(x)
    assert len(calls) == 1


def test_only_3x3_stride_1_padding_1_convolutions_qualify():
    assert is_winograd_compatible(nn.Conv2d(4, 4, 3, padding=1))
    for conv in (
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
        nn.Conv2d(4, 4, 1),
        nn.Conv2d(4, 4, 3),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    ):
        assert not is_winograd_compatible(conv)
        with pytest.raises(ValueError, match="3x3, stride-1, padding-1"):
            WinogradConv2d.from_conv(conv)
    with pytest.raises(ValueError, match=r"\[C_out, C_in, 3, 3\]"):
        winograd_weight(torch.randn(4, 4, 5, 5))
    with pytest.raises(ValueError, match="must agree"):
        winograd_conv2d(torch.randn(1, 3, 8, 8), torch.randn(36, 4, 4), torch.zeros(4))


@needs_fused
def test_optimize_for_inference_uses_it_for_the_resnet_on_a_cpu_in_fp32():
    torch.manual_seed(0)
    model = detrkit.build_model(
        "detr_r50", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64
    ).eval()

    def winograd_convolutions(module: nn.Module) -> int:
        return sum(isinstance(m, WinogradConv2d) for m in module.modules())

    optimized = detrkit.optimize_for_inference(model)
    # ResNet-50: the 3x3 convolutions of 16 bottlenecks, less the 3 that downsample (stride 2).
    assert winograd_convolutions(optimized) == 13
    assert winograd_convolutions(model) == 0  # the model passed in is untouched
    assert winograd_convolutions(detrkit.optimize_for_inference(model, winograd=False)) == 0
    assert winograd_convolutions(detrkit.optimize_for_inference(model, "bf16")) == 0
    # Unfolded frozen norms run their convolutions without calling them: no Winograd there.
    unfolded = detrkit.optimize_for_inference(model, fold_batchnorm=False)
    assert winograd_convolutions(unfolded) == 0

    # The backbone's features (what Winograd changes) stay within fp32 rounding of the model's.
    images = torch.randn(1, 3, 96, 128)
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    with torch.inference_mode():
        expected = model.backbone[0](images, mask)[0][-1]
        got = optimized.backbone[0](images, mask)[0][-1]
        without = detrkit.optimize_for_inference(model, winograd=False).backbone[0]
        direct = without(images, mask)[0][-1]
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 1e-5 * scale
    assert not torch.equal(got, direct)  # Winograd really ran: it rounds differently
