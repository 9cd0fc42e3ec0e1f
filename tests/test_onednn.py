"""detrkit.ops.onednn: bias and ReLU fused into bf16 convolutions and linear layers on CPUs."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from detrkit.ops import onednn


# oneDNN's fused operators are torch's own (nothing of detrkit's is compiled for them), and the
# torch that `make test` installs (pinned in the Makefile) has them, as PyTorch's x86 CPU builds
# do. detrkit reaches them by private names (mkldnn::_convolution_pointwise and
# _linear_pointwise); were a torch upgrade to rename or drop them, bf16 inference would silently
# lose its fusion. So their absence fails here instead of skipping these tests, and there is no
# opt-out (DETRKIT_ALLOW_NO_KERNELS is for detrkit's own compiled kernels only).
def test_this_torch_has_onednns_fused_operators():
    assert onednn._operators() is not None, (
        f"torch {torch.__version__} lacks oneDNN's fused operators (mkldnn available: "
        f"{torch.backends.mkldnn.is_available()}): detrkit.ops.onednn falls back to the usual "
        "operators, and bf16 inference loses its fusion"
    )


def operators_run(fn) -> set[str]:
    """The names of the oneDNN fused operators that ``fn()`` calls."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        fn()
    names = {event.name for event in profiler.events()}
    return {name for name in names if "_pointwise" in name}


def bf16_layers(seed: int = 0) -> tuple[nn.Conv2d, nn.Linear]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1).bfloat16()
    linear = nn.Linear(24, 40).bfloat16()
    return conv, linear


def test_fused_forms_match_the_plain_operators_in_bf16():
    conv, linear = bf16_layers()
    images = torch.randn(2, 16, 19, 23).bfloat16().contiguous(memory_format=torch.channels_last)
    tokens = torch.randn(3, 50, 24).bfloat16()
    with torch.inference_mode():
        assert operators_run(lambda: onednn.conv2d_relu(conv, images)) == {
            "mkldnn::_convolution_pointwise"
        }
        assert operators_run(lambda: onednn.linear(linear, tokens)) == {"mkldnn::_linear_pointwise"}
        # ReLU commutes with rounding: the convolution is the same kernel, bit for bit.
        torch.testing.assert_close(
            onednn.conv2d_relu(conv, images), conv(images).relu(), rtol=0, atol=0
        )
        # A residual block's end adds the shortcut to the fp32 accumulator, before rounding.
        shortcut = torch.randn(2, 24, 10, 12).bfloat16()
        assert operators_run(lambda: onednn.conv2d_add_relu(conv, images, shortcut)) == {
            "mkldnn::_convolution_pointwise"
        }
        wide = F.conv2d(images.float(), conv.weight.float(), conv.bias.float(), 2, 1)
        torch.testing.assert_close(
            onednn.conv2d_add_relu(conv, images, shortcut).float(),
            (wide + shortcut.float()).relu(),
            rtol=2**-7,
            atol=1e-2,
        )
        # The bias joins the fp32 accumulator instead of the rounded product: within bf16
        # rounding of the fp32 result.
        expected = F.linear(tokens.float(), linear.weight.float(), linear.bias.float())
        for relu in (False, True):
            actual = onednn.linear(linear, tokens, relu=relu)
            assert actual.dtype == torch.bfloat16 and actual.shape == (3, 50, 40)
            wanted = expected.relu() if relu else expected
            torch.testing.assert_close(actual.float(), wanted, rtol=2**-7, atol=1e-2)


def test_plain_operators_run_outside_bf16_inference():
    conv, linear = bf16_layers()
    images = torch.randn(1, 16, 9, 11)
    tokens = torch.randn(4, 24)
    fp32_conv, fp32_linear = conv.float(), linear.float()
    with torch.inference_mode():  # fp32: no faster fused, so the usual operators
        assert operators_run(lambda: onednn.conv2d_relu(fp32_conv, images)) == set()
        shortcut = torch.randn(1, 24, 5, 6)
        assert operators_run(lambda: onednn.conv2d_add_relu(fp32_conv, images, shortcut)) == set()
        assert operators_run(lambda: onednn.linear(fp32_linear, tokens, relu=True)) == set()
    conv, linear = bf16_layers()
    # With autograd on, the usual operators, and gradients flow.
    output = onednn.linear(linear, tokens.bfloat16(), relu=True)
    output.float().sum().backward()
    assert linear.weight.grad is not None
    with torch.inference_mode():
        # Autocast to another dtype, an unbatched image and a broadcast shortcut: the usual path.
        with torch.autocast("cpu", dtype=torch.float16):
            assert onednn.conv2d_relu(conv, images.bfloat16()).dtype == torch.float16
        assert operators_run(lambda: onednn.conv2d_relu(conv, images[0].bfloat16())) == set()
        bias_like = torch.randn(1, 24, 1, 1).bfloat16()

        def broadcast():
            return onednn.conv2d_add_relu(conv, images.bfloat16(), bias_like)

        assert operators_run(broadcast) == set()
        expected = (conv(images.bfloat16()) + bias_like).relu()
        torch.testing.assert_close(broadcast(), expected, rtol=0, atol=0)
    # A module with hooks is called, so the hooks run.
    calls = []
    conv.register_forward_hook(lambda *_: calls.append("conv"))
    with torch.inference_mode():
        assert operators_run(lambda: onednn.conv2d_relu(conv, images.bfloat16())) == set()
    assert calls == ["conv"]


def test_the_in_place_residual_end_writes_into_the_shortcut():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 24, 1).bfloat16().to(memory_format=torch.channels_last)
    cl = torch.channels_last
    images = torch.randn(2, 16, 9, 11).bfloat16().contiguous(memory_format=cl)
    shortcut = torch.randn(2, 24, 9, 11).bfloat16().contiguous(memory_format=cl)
    with torch.inference_mode():
        expected = onednn.conv2d_add_relu(conv, images, shortcut)
        accumulator = shortcut.clone()
        names = operators_run(lambda: onednn.conv2d_add_relu_(conv, images, accumulator.clone()))
        assert names == {"mkldnn::_convolution_pointwise_"}
        result = onednn.conv2d_add_relu_(conv, images, accumulator)
        # The same fused kernel with the sum read from the output's memory: bit for bit.
        assert result.data_ptr() == accumulator.data_ptr()
        torch.testing.assert_close(result, expected, rtol=0, atol=0)
        # A shortcut it cannot take as the output (another layout, dtype or shape): fresh memory,
        # the shortcut untouched.
        for other in (
            shortcut.contiguous(),
            shortcut.float().contiguous(memory_format=cl),
            shortcut[:, :, :1].contiguous(memory_format=cl),
        ):
            before = other.clone()
            result = onednn.conv2d_add_relu_(conv, images, other)
            assert result.data_ptr() != other.data_ptr()
            torch.testing.assert_close(other, before, rtol=0, atol=0)
        torch.testing.assert_close(
            onednn.conv2d_add_relu_(conv, images, shortcut.contiguous()), expected, rtol=0, atol=0
        )


def reorders_run(fn) -> int:
    """How many weights ``fn()`` reorders into oneDNN's blocked layout."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        fn()
    return sum("reorder" in event.name for event in profiler.events())


def plain_fused(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The fused convolution given the plain weight (oneDNN reorders it on this call)."""
    arguments = (conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
    return torch.ops.mkldnn._convolution_pointwise(x, *arguments, "relu", [], "")


def test_packed_weights_give_the_plain_weights_results_at_every_size():
    """A convolution weight is packed for the first input's size and serves others; the products
    are the same kernels, bit for bit, as with the plain weight. A projection of some rows of a
    linear map is that part of the whole map's product."""
    cl = torch.channels_last
    torch.manual_seed(2)
    convs = [
        nn.Conv2d(16, 24, 3, padding=1).bfloat16().to(memory_format=cl),
        nn.Conv2d(16, 24, 1, stride=2).bfloat16().to(memory_format=cl),
    ]
    linear = nn.Linear(24, 40).bfloat16()
    with torch.inference_mode():
        for conv in convs:
            for size in ((19, 23), (5, 4), (31, 30)):
                images = torch.randn(2, 16, *size).bfloat16().contiguous(memory_format=cl)
                expected = plain_fused(conv, images)
                torch.testing.assert_close(
                    onednn.conv2d_relu(conv, images), expected, rtol=0, atol=0
                )
                torch.testing.assert_close(
                    onednn.conv2d(conv, images).relu(), expected, rtol=0, atol=0
                )
        for tokens in (50, 3, 400):
            x = torch.randn(2, tokens, 24).bfloat16()
            expected = torch.ops.mkldnn._linear_pointwise(
                x, linear.weight, linear.bias, "none", [], ""
            )
            torch.testing.assert_close(onednn.linear(linear, x), expected, rtol=0, atol=0)
            part = onednn.projection(x, linear.weight, linear.bias, 8, 32)
            torch.testing.assert_close(part, expected[..., 8:32], rtol=0, atol=0)


# Ways a weight changes: written in place (an optimizer step, load_state_dict), through a view,
# its data replaced, cast there and back (the bf16 storage freed and a new one made, perhaps at
# the old address).
CHANGES = {
    "in place": lambda layer: layer.weight.mul_(-1),
    "through a view": lambda layer: layer.weight.detach()[:2].add_(1),
    "data replaced": lambda layer: setattr(layer.weight, "data", layer.weight.data * 2),
    "cast": lambda layer: (layer.float().weight.mul_(3), layer.bfloat16()),
    "load_state_dict": lambda layer: layer.load_state_dict(
        {k: v + 1 for k, v in layer.state_dict().items()}
    ),
}


@pytest.mark.parametrize("kind", ["convolution", "linear"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_weight_is_packed_once_and_again_whenever_it_changes(change, kind):
    conv, linear = bf16_layers(3)
    layer = conv if kind == "convolution" else linear
    images = torch.randn(1, 16, 9, 11).bfloat16()
    tokens = torch.randn(2, 7, 24).bfloat16()

    def run(layer: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            if kind == "linear":
                return onednn.linear(layer, tokens)
            return onednn.conv2d_relu(layer, images)

    assert reorders_run(lambda: run(layer)) == 1
    assert reorders_run(lambda: run(layer)) == 0  # the packed copy is kept
    before = run(layer)
    with torch.no_grad():
        CHANGES[change](layer)
    assert reorders_run(lambda: run(layer)) == 1  # packed again
    after = run(layer)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, run(copy.deepcopy(layer)), rtol=0, atol=0)


def test_weights_made_in_inference_mode_are_never_packed():
    """Tensors made under inference_mode keep no version counter, so a change made in place
    there could not be seen: such weights go to oneDNN as they are, which reorders them on every
    call itself."""
    with torch.inference_mode():
        conv, _ = bf16_layers(6)
        images = torch.randn(1, 16, 9, 11).bfloat16()
        before = onednn.conv2d_relu(conv, images)
        assert reorders_run(lambda: onednn.conv2d_relu(conv, images)) == 0
        assert operators_run(lambda: onednn.conv2d_relu(conv, images)) == {
            "mkldnn::_convolution_pointwise"
        }
        conv.weight.mul_(-1)
        after = onednn.conv2d_relu(conv, images)
        expected = plain_fused(conv, images)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    assert not torch.equal(after, before)


def test_a_packed_copy_lives_as_long_as_its_weight():
    conv, _ = bf16_layers(4)
    with torch.inference_mode():
        onednn.conv2d_relu(conv, torch.randn(1, 16, 9, 11).bfloat16())
    weight = weakref.ref(conv.weight)
    key = id(conv.weight)
    assert onednn._PACKED[key].weight() is conv.weight
    del conv
    gc.collect()
    assert weight() is None
    assert key not in onednn._PACKED


def test_a_packed_copy_does_not_keep_a_replaced_weight_alive():
    """Cast (or moved) after a packed call and not run since, a weight's old memory is freed."""
    conv, _ = bf16_layers(7)
    with torch.inference_mode():
        onednn.conv2d_relu(conv, torch.randn(1, 16, 9, 11).bfloat16())
    old = weakref.ref(conv.weight.untyped_storage())
    conv.float()
    gc.collect()
    assert old() is None


def test_projection_is_the_linear_map_of_its_rows_outside_bf16_inference():
    torch.manual_seed(5)
    weight, bias, x = torch.randn(48, 16), torch.randn(48), torch.randn(2, 7, 16)
    with torch.inference_mode():
        assert operators_run(lambda: onednn.projection(x, weight, bias, 16, 32)) == set()
        torch.testing.assert_close(
            onednn.projection(x, weight, bias, 16, 32),
            F.linear(x, weight[16:32], bias[16:32]),
            rtol=0,
            atol=0,
        )
    # With autograd on, in bf16: the usual operator, and gradients reach the weight.
    weight = weight.bfloat16().requires_grad_()
    onednn.projection(x.bfloat16(), weight, None, 0, 16).float().sum().backward()
    assert weight.grad is not None and weight.grad[16:].abs().max() == 0


def test_a_stacked_product_is_its_layers_side_by_side_and_follows_each():
    """Deformable attention's offsets and logits: one product of the two layers' weights, packed
    once, packed again when either weight changes."""
    torch.manual_seed(8)
    first, second = nn.Linear(24, 40).bfloat16(), nn.Linear(24, 8).bfloat16()
    tokens = torch.randn(2, 9, 24).bfloat16()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return onednn.stacked_linear(tokens, (first, second))

    def expected() -> torch.Tensor:
        weight = torch.cat([first.weight, second.weight])
        bias = torch.cat([first.bias, second.bias])
        with torch.inference_mode():
            return torch.ops.mkldnn._linear_pointwise(tokens, weight, bias, "none", [], "")

    assert reorders_run(run) == 1
    assert reorders_run(run) == 0
    torch.testing.assert_close(run(), expected(), rtol=0, atol=0)
    for layer in (second, first):
        with torch.no_grad():
            layer.weight.mul_(-2)
        assert reorders_run(run) == 1
        torch.testing.assert_close(run(), expected(), rtol=0, atol=0)
    # In fp32, and with autograd: the layers' own products, side by side.
    first.float(), second.float()
    x = tokens.float().requires_grad_()
    stacked = onednn.stacked_linear(x, (first, second))
    torch.testing.assert_close(stacked, torch.cat([first(x), second(x)], -1), rtol=1e-6, atol=1e-6)
    stacked.sum().backward()
    assert first.weight.grad is not None and second.weight.grad is not None
