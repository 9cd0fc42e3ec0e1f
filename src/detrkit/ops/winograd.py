"""3x3 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3), for fp32 on a CPU.

A direct 3x3 convolution spends 9 multiply-adds per output pixel, input channel and output channel.
F(4x4, 3x3) computes each 4x4 tile of the output from the 6x6 input patch around it with 36
products per channel pair, 2.25 per output pixel: 4x fewer. The products are 36 matrix
multiplications ``[tiles, C_in] @ [C_in, C_out]``, which run at the machine's matrix-multiply rate;
the transforms around them are additions and small constant multiples (csrc/winograd_cpu.cpp).

The price is rounding: the transforms' constants (up to 8, and 1/24 in the weights') make an fp32
result's error several times a direct convolution's. At 256 channels, relative to the largest
output: about 1e-5, against 2e-6 for oneDNN's direct convolution on an AVX2 CPU and 3e-7 on an
AVX-512 one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.ops._extension import load_extension, required_extension

# G of F(4x4, 3x3), for the points 0, -1, 1, -2, 2 and infinity: U = G w G^T.
_WEIGHT_TRANSFORM = (
    (1 / 4, 0.0, 0.0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0.0, 0.0, 1.0),
)


def winograd_weight(weight: Tensor) -> Tensor:
    """The transformed weights ``G w G^T`` of a ``[C_out, C_in, 3, 3]`` kernel, as the 36 matrices
    ``[36, C_in, C_out]`` of :func:`winograd_conv2d`; computed in float64 and rounded once."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight needs a [C_out, C_in, 3, 3] kernel, got {weight.shape}")
    transform = torch.tensor(_WEIGHT_TRANSFORM, dtype=torch.float64, device=weight.device)
    transformed = torch.einsum("ai,oxij,bj->abxo", transform, weight.double(), transform)
    out_channels, in_channels = weight.shape[:2]
    return transformed.reshape(36, in_channels, out_channels).to(weight.dtype).contiguous()


def winograd_conv2d(input: Tensor, transformed_weight: Tensor, bias: Tensor) -> Tensor:
    """``conv2d(input, weight, bias, stride=1, padding=1)`` for a 3x3 ``weight``, computed by
    F(4x4, 3x3).

    Args:
        input: ``[N, C_in, H, W]`` float32 on the CPU; channels-last memory avoids a copy.
        transformed_weight: ``winograd_weight(weight)``, ``[36, C_in, C_out]``.
        bias: ``[C_out]``.

    Returns:
        ``[N, C_out, H, W]`` in channels-last memory. Not differentiable.
    """
    if input.dim() != 4 or transformed_weight.shape[:2] != (36, input.shape[1]):
        raise ValueError(
            f"winograd_conv2d: input [N, C_in, H, W] and transformed_weight [36, C_in, C_out] "
            f"must agree, got {tuple(input.shape)} and {tuple(transformed_weight.shape)}"
        )
    extension = required_extension("winograd")
    batch, _, height, width = input.shape
    pixels = input.permute(0, 2, 3, 1).contiguous()  # [N, H, W, C_in]; a view if channels-last
    planes = extension.winograd_input_transform(pixels)  # [36, P, C_in], P tiles of 4x4
    products = torch.bmm(planes, transformed_weight)  # [36, P, C_out]
    output = extension.winograd_output_transform(products, bias, batch, height, width)
    return output.permute(0, 3, 1, 2)  # [N, C_out, H, W] over [N, H, W, C_out] memory


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 :class:`~torch.nn.Conv2d` that computes its inference forward by
    :func:`winograd_conv2d`: fp32 CPU inputs with gradients off. Anything else (training, another
    dtype or device) runs the usual convolution.

    The transformed weights are computed when it is made and when a state dict is loaded into it
    (they are not saved in the state dict, which keeps ``Conv2d``'s): change the weights in any
    other way, and call :meth:`refresh`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(
            in_channels, out_channels, 3, padding=1, bias=bias, device=device, dtype=dtype
        )
        self.refresh()
        self.register_load_state_dict_post_hook(WinogradConv2d._refresh_after_loading)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> WinogradConv2d:
        """The convolution ``conv`` (its very parameters, shared), computed by Winograd."""
        if not is_winograd_compatible(conv):
            raise ValueError(
                f"WinogradConv2d needs a 3x3, stride-1, padding-1, ungrouped convolution, got {conv}"
            )
        module = cls(
            conv.in_channels,
            conv.out_channels,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        module.weight, module.bias = conv.weight, conv.bias
        module.refresh()
        return module.train(conv.training)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recomputes the transformed weights (and the bias the kernel adds) from the parameters."""
        bias = self.bias if self.bias is not None else self.weight.new_zeros(self.out_channels)
        self.register_buffer("transformed_weight", winograd_weight(self.weight), persistent=False)
        self.register_buffer("winograd_bias", bias.detach().clone(), persistent=False)

    def _refresh_after_loading(self, incompatible_keys) -> None:
        self.refresh()

    def forward(self, input: Tensor) -> Tensor:
        if (
            not torch.is_grad_enabled()
            and input.device.type == "cpu"
            and input.dtype == self.transformed_weight.dtype == torch.float32
            and load_extension() is not None
        ):
            return winograd_conv2d(input, self.transformed_weight, self.winograd_bias)
        return super().forward(input)


def is_winograd_compatible(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution :class:`WinogradConv2d` computes: 3x3, stride 1,
    padding 1 with zeros, no dilation, no groups."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )
