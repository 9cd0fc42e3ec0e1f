"""The residual addition with its LayerNorm in one pass (detrkit.ops.add_layer_norm) against
torch's two operators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detrkit.ops import add_layer_norm
from helpers import needs_fused


def norm_and_inputs(channels: int, dtype: torch.dtype, rows: tuple[int, ...] = (3, 37)):
    g = torch.Generator().manual_seed(0)
    norm = nn.LayerNorm(channels, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g))
        norm.bias.copy_(torch.randn(channels, generator=g))
    x = torch.randn(*rows, channels, generator=g) * 3 + 1
    residual = torch.randn(*rows, channels, generator=g)
    return norm.to(dtype), x.to(dtype), residual.to(dtype)


@needs_fused
@pytest.mark.parametrize("channels", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_one_pass_is_torchs_addition_then_norm(channels, dtype):
    norm, x, residual = norm_and_inputs(channels, dtype)
    with torch.no_grad():
        got = add_layer_norm(x, residual, norm)
        expected = norm(x + residual)  # torch rounds the sum to dtype before the norm too
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.bfloat16:
        # fp32 statistics summed in another order: at most one bf16 step apart, rarely.
        step = expected.float().abs().clamp(min=2**-8) * 2**-7
        assert ((got.float() - expected.float()).abs() <= step).all()
        assert (got == expected).float().mean() > 0.9
    else:
        # Up to a few rounding steps of the normalised values, which are of order one.
        tolerance = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@needs_fused
def test_writes_into_the_rows_it_is_given():
    norm, x, residual = norm_and_inputs(32, torch.float32, rows=(10,))
    out = torch.full((25, 32), 7.0)
    with torch.no_grad():
        returned = add_layer_norm(x, residual, norm, out[5:15])
        expected = norm(x + residual)
    assert returned.data_ptr() == out[5:15].data_ptr()
    torch.testing.assert_close(out[5:15], expected, rtol=1e-6, atol=1e-6)
    assert (out[:5] == 7).all() and (out[15:] == 7).all()


def watched(norm: nn.Module) -> nn.Module:
    norm.register_forward_hook(lambda module, args, output: None)
    return norm


# Each case the kernel does not take, and torch's operators run instead: (what, setup).
FALLBACKS = {
    "a gradient wanted": lambda n, x, r: (n, x.requires_grad_(), r),
    "channels not whole vectors": lambda n, x, r: (
        nn.LayerNorm(24),
        x[..., :24].contiguous(),
        r[..., :24].contiguous(),
    ),
    "a hooked norm": lambda n, x, r: (watched(n), x, r),
    "a norm without affine parameters": lambda n, x, r: (
        nn.LayerNorm(32, elementwise_affine=False),
        x,
        r,
    ),
    "mixed dtypes": lambda n, x, r: (n, x, r.bfloat16()),
    "broadcast residual": lambda n, x, r: (n, x, r[:1]),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_other_cases_run_torchs_operators(case, monkeypatch):
    norm, x, residual = FALLBACKS[case](*norm_and_inputs(32, torch.float32))
    from detrkit.ops import layer_norm

    monkeypatch.setattr(layer_norm, "load_extension", lambda: pytest.fail("kernel used"))
    with torch.set_grad_enabled(x.requires_grad):
        got = add_layer_norm(x, residual, norm)
        expected = norm(x + residual)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if x.requires_grad:
        (grad,) = torch.autograd.grad(got.sum() * 2, x)
        assert grad.abs().sum() > 0


def test_out_of_another_shape_is_refused_and_the_fallback_writes_out():
    norm, x, residual = norm_and_inputs(32, torch.float32, rows=(10,))
    with pytest.raises(ValueError, match="out must have x's shape"):
        add_layer_norm(x, residual, norm, torch.empty(2, 10, 32))
    out = torch.zeros(10, 32)
    x.requires_grad_()
    returned = add_layer_norm(x, residual, norm, out)  # autograd: torch's operators, into out
    assert returned is out
    torch.testing.assert_close(out, norm(x + residual), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.sum() * 2, x)
    assert grad.abs().sum() > 0
