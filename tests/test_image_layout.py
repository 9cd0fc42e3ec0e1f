"""Images into channels-last bf16 in one pass (detrkit.ops.to_channels_last) against torch's two
copies."""

from __future__ import annotations

import pytest
import torch

from detrkit.ops import to_channels_last
from detrkit.ops._extension import load_extension


def kernel_available() -> bool:
    extension = load_extension()
    return extension is not None and extension.image_layout_kernel_available()


def torchs(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return images.to(dtype).contiguous(memory_format=torch.channels_last)


def images(*shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 300
    flat = x.view(-1)
    # Values whose bf16 rounding is a tie (to even), and the special ones.
    flat[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, float("inf"), float("-inf")])[: flat.numel()]
    if flat.numel() > 4:
        flat[4] = float("nan")
    # Subnormals, which the CPU's own conversion to bf16 would flush to zero.
    flat[5:9] = torch.tensor([1.01e-39, -1.01e-39, 1.166e-38, 2.755e-40])[
        : max(0, flat.numel() - 5)
    ]
    return x


@pytest.mark.skipif(not kernel_available(), reason="no AVX-512 BF16 here")
@pytest.mark.parametrize(
    "shape", [(1, 3, 800, 1066), (2, 3, 5, 17), (1, 3, 1, 1), (3, 3, 7, 16), (1, 3, 2, 31)]
)
def test_one_pass_is_torchs_two_copies(shape):
    x = images(*shape)
    with torch.inference_mode():
        got = to_channels_last(x, torch.bfloat16)
    expected = torchs(x, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    # NaN at the same places, every other value the same bits.
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


# Inputs the kernel does not take: torch's copies run, with the same result.
FALLBACKS = {
    "fp32 wanted": (lambda x: x, torch.float32),
    "four channels": (lambda x: torch.cat([x, x[:, :1]], 1), torch.bfloat16),
    "not contiguous": (lambda x: x[..., ::2], torch.bfloat16),
    "a gradient wanted": (lambda x: x.requires_grad_(), torch.bfloat16),
    "bf16 already": (lambda x: x.bfloat16(), torch.bfloat16),
}


@pytest.mark.parametrize("change, dtype", FALLBACKS.values(), ids=FALLBACKS.keys())
def test_other_inputs_get_torchs_copies(change, dtype):
    x = change(torch.randn(2, 3, 6, 20))
    got = to_channels_last(x, dtype)
    expected = torchs(x, dtype)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.requires_grad == x.requires_grad
