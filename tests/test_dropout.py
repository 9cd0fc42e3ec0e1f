"""The fused CPU dropout (detrkit.ops.dropout), the attention that uses it in training, and the
backbone's on-the-fly batch-norm folding (detrkit.fast), each against what it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FrozenBatchNorm2d

from detrkit.fast import optimize_for_training
from detrkit.fast.attention import FastMultiheadAttention as MultiheadAttention
from detrkit.fast.backbone import FastBasicBlock, FastBottleneck, FastResNetBackbone, conv_norm
from detrkit.models.backbone import ResNetBackbone
from detrkit.ops import dropout, fast_dropout, relu_dropout
from detrkit.ops.fast_dropout import fused_dropout, fused_relu_dropout
from detrkit.ops.feed_forward import (
    fused_relu_dropout_mlp,
    fused_relu_dropout_mlp_backward,
    relu_dropout_mlp,
    uses_fused_mlp,
)
from helpers import frozen_norm, needs_fused


def keep_factors(shape, p: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    """What the fused kernel multiplies each element by: 1 / (1 - p) where kept, else 0."""
    return fused_dropout(torch.ones(shape, dtype=dtype), p, torch.tensor(seed))


@needs_fused
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drops_the_requested_fraction_and_scales_the_rest(p):
    x = torch.rand(1_000_003) + 0.5  # odd size: the last element is a pair of its own
    y = fused_dropout(x, p, torch.tensor(7))
    kept = y != 0
    dropped_fraction = 1 - kept.double().mean().item()
    assert abs(dropped_fraction - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


@needs_fused
def test_mask_is_independent_per_element_and_a_function_of_the_seed():
    shape = (64, 1000)
    a, b = keep_factors(shape, 0.5, 1), keep_factors(shape, 0.5, 2)
    assert torch.equal(a, keep_factors(shape, 0.5, 1))
    assert not torch.equal(a, b)
    # Neighbouring elements (the two halves of one hash) and rows are uncorrelated.
    kept = (a != 0).double().flatten()
    for lag in (1, 2, shape[1]):
        correlation = torch.corrcoef(torch.stack([kept[:-lag], kept[lag:]]))[0, 1]
        assert abs(correlation) < 0.02, lag


def splitmix_keep(numel: int, p: float, seed: int) -> torch.Tensor:
    """The keep rule of csrc/dropout_cpu.cpp, written out in numpy: element 2k reads the low and
    2k + 1 the high 32 bits of SplitMix64's output for counter k + 1."""
    import numpy as np

    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as in C
        counters = np.arange(1, (numel + 1) // 2 + 1, dtype=np.uint64)
        z = np.uint64(seed % 2**64) + counters * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    halves = np.stack([z & np.uint64(0xFFFFFFFF), z >> np.uint64(32)], axis=1).reshape(-1)
    return torch.from_numpy(halves[:numel] >= np.uint64(round(p * 2**32)))


@needs_fused
@pytest.mark.parametrize("numel", [1, 7, 2048, 4097, 100_001])
def test_mask_is_the_documented_hash_of_seed_and_index(numel):
    # Sizes around the kernel's chunks of 2,048 elements, and odd ones (a last half pair).
    for seed in (0, -3, 2**62 + 12345):
        kept = keep_factors(numel, 0.3, seed) != 0
        assert torch.equal(kept, splitmix_keep(numel, 0.3, seed)), seed


@needs_fused
def test_result_does_not_depend_on_the_thread_count():
    x = torch.randn(300_001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fused_relu_dropout(x, 0.3, torch.tensor(5))
        torch.set_num_threads(max(2, threads))
        several = fused_relu_dropout(x, 0.3, torch.tensor(5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, several)


@needs_fused
def test_non_contiguous_input_is_masked_by_logical_position():
    x = torch.randn(40, 30)
    seed = torch.tensor(3)
    torch.testing.assert_close(
        fused_dropout(x.t(), 0.2, seed), fused_dropout(x.t().contiguous(), 0.2, seed)
    )


@needs_fused
def test_relu_dropout_is_relu_then_the_same_dropout():
    x = torch.randn(5, 301, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(11)
    fused = fused_relu_dropout(x, 0.25, seed)
    reference = F.relu(x) * keep_factors(x.shape, 0.25, 11, torch.float64)
    torch.testing.assert_close(fused, reference, rtol=0, atol=0)
    grad = torch.randn_like(x)
    (fused_grad,) = torch.autograd.grad(fused, x, grad)
    (reference_grad,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(fused_grad, reference_grad)


@needs_fused
def test_relu_dropout_backward_blocks_non_finite_gradients_where_nothing_passed():
    # float32 over many elements: the kernel's vectorised path, and its tail (1,003 % 8 = 3).
    x = torch.randn(3, 1003, requires_grad=True)
    output = fused_relu_dropout(x, 0.2, torch.tensor(4))
    grad = torch.randn_like(x)
    blocked = output == 0  # negative inputs and dropped elements
    grad[blocked] = torch.tensor([float("inf"), float("nan")]).repeat(x.numel())[
        : int(blocked.sum())
    ]
    (input_grad,) = torch.autograd.grad(output, x, grad)
    assert torch.equal(input_grad[blocked], torch.zeros(int(blocked.sum())))
    torch.testing.assert_close(input_grad[~blocked], grad[~blocked] * (1 / 0.8), rtol=0, atol=0)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_mlp_is_the_two_layers_around_relu_dropout(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 301, 24, dtype=dtype, requires_grad=True)
    linear1, linear2 = nn.Linear(24, 40, dtype=dtype), nn.Linear(40, 16, dtype=dtype)
    params = [linear1.weight, linear1.bias, linear2.weight, linear2.bias]
    seed = torch.tensor(21)
    fused = fused_relu_dropout_mlp(x, *params, 0.3, seed)[0]
    reference = linear2(fused_relu_dropout(linear1(x), 0.3, seed))
    assert fused.shape == (2, 301, 16)
    torch.testing.assert_close(fused, reference)
    grad = torch.randn_like(fused)
    fused_grads = torch.autograd.grad(fused, [x, *params], grad)
    reference_grads = torch.autograd.grad(reference, [x, *params], grad)
    for name, ours, theirs in zip(["x", "w1", "b1", "w2", "b2"], fused_grads, reference_grads):
        torch.testing.assert_close(ours, theirs, msg=name)


@needs_fused
def test_fused_mlp_gradients_and_op_registration():
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    params = [
        torch.randn(shape, dtype=torch.float64, requires_grad=True)
        for shape in [(9, 5), (9,), (4, 9), (4,)]
    ]
    seed = torch.tensor(5)
    # Through the output alone (hidden's gradient None, as in the models) and through both.
    assert torch.autograd.gradcheck(
        lambda *args: fused_relu_dropout_mlp(*args, 0.3, seed)[0], (x, *params)
    )
    assert torch.autograd.gradcheck(
        lambda *args: fused_relu_dropout_mlp(*args, 0.3, seed), (x, *params)
    )
    torch.library.opcheck(fused_relu_dropout_mlp, (x, *params, 0.3, seed))
    # The backward operator has no gradient of its own (no double backward).
    x, params = x.detach(), [param.detach() for param in params]
    hidden = fused_relu_dropout_mlp(x, *params, 0.3, seed)[1]
    grad = torch.randn(3, 7, 4, dtype=torch.float64)
    for grad_hidden in (None, torch.randn_like(hidden)):
        args = (grad, x, params[0], params[2], hidden, 0.3, grad_hidden)
        torch.library.opcheck(fused_relu_dropout_mlp_backward, args)


@needs_fused
def test_fused_mlp_steps_aside_where_it_would_change_what_runs():
    x = torch.randn(10, 8)
    linear1, linear2 = nn.Linear(8, 12), nn.Linear(12, 8)
    assert uses_fused_mlp(x, linear1, linear2, 0.1)
    assert not uses_fused_mlp(x, linear1, linear2, 0.0)
    assert not uses_fused_mlp(x, nn.Linear(8, 12, bias=False), linear2, 0.1)
    assert not uses_fused_mlp(x.double(), linear1, linear2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_fused_mlp(x, linear1, linear2, 0.1)
    calls = []
    handle = linear2.register_forward_hook(lambda module, args, output: calls.append(output))
    assert not uses_fused_mlp(x, linear1, linear2, 0.1)
    relu_dropout_mlp(x, linear1, linear2, 0.1)
    handle.remove()
    assert len(calls) == 1  # the hook ran: the layers were called


@needs_fused
def test_gradients_and_op_registration():
    x = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(123)
    assert torch.autograd.gradcheck(lambda t: fused_dropout(t, 0.3, seed), (x,))
    assert torch.autograd.gradcheck(lambda t: fused_relu_dropout(t, 0.3, seed), (x,))
    # Fake (meta) kernels, autograd registration and schema, as torch.compile relies on them.
    torch.library.opcheck(fused_dropout, (x, 0.3, seed))
    torch.library.opcheck(fused_relu_dropout, (x, 0.3, seed))


@needs_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_their_dtype_and_mask(dtype):
    x = torch.randn(1000)
    y = fused_dropout(x.to(dtype), 0.4, torch.tensor(9))
    assert y.dtype == dtype
    reference = x * keep_factors(x.shape, 0.4, 9)
    assert torch.equal(y != 0, reference != 0)
    torch.testing.assert_close(y.float(), reference, rtol=1e-2, atol=1e-2)


@needs_fused
def test_manual_seed_makes_dropout_repeatable():
    x = torch.randn(10_000)
    torch.manual_seed(0)
    first = (dropout(x, 0.1), relu_dropout(x, 0.1))
    torch.manual_seed(0)
    second = (dropout(x, 0.1), relu_dropout(x, 0.1))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(dropout(x, 0.1), dropout(x, 0.1))


def test_falls_back_to_torch_where_the_kernel_does_not_apply(monkeypatch):
    x = torch.randn(1000)
    assert torch.equal(dropout(x, 0.1, training=False), x)
    assert torch.equal(relu_dropout(x, 0.1, training=False), F.relu(x))
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    # Without the extension (no compiler), torch's dropout runs: same mask as F.dropout.
    monkeypatch.setattr(fast_dropout, "fused_kernel_available", lambda: False)
    torch.manual_seed(3)
    expected = F.dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3), expected)


def test_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4, dropout=1e-12, batch_first=True)
    reference = nn.MultiheadAttention(32, 4, dropout=1e-12, batch_first=True)
    reference.load_state_dict(ours.state_dict())
    query, key = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, 8:] = True
    # Training mode with (practically) no dropout: our own math against torch's, with gradients.
    for mode in (True, False):
        ours.train(mode)
        reference.train(mode)
        mine = ours(query, key, key, key_padding_mask=padding, need_weights=False)[0]
        theirs = reference(query, key, key, key_padding_mask=padding, need_weights=False)[0]
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    ours.train()
    reference.train()
    mine = ours(query, key, key, key_padding_mask=padding, need_weights=False)[0]
    theirs = reference(query, key, key, key_padding_mask=padding, need_weights=False)[0]
    mine_grads = torch.autograd.grad(mine.square().sum(), list(ours.parameters()))
    their_grads = torch.autograd.grad(theirs.square().sum(), list(reference.parameters()))
    for a, b in zip(mine_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_fused
def test_attention_dropout_is_applied_and_unbiased():
    torch.manual_seed(0)
    attention = MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    query, key = torch.randn(1, 5, 16), torch.randn(1, 9, 16)
    attention.eval()
    expected = attention(query, key, key, need_weights=False)[0]
    attention.train()
    with torch.no_grad():
        draws = torch.stack([attention(query, key, key, need_weights=False)[0] for _ in range(800)])
    assert not torch.allclose(draws[0], expected, atol=1e-3)  # something was dropped
    # Dropout scales what it keeps by 1 / (1 - p): the average over draws is the eval output.
    torch.testing.assert_close(draws.mean(0), expected, rtol=0, atol=0.06)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_conv_norm_folds_a_frozen_norm_exactly(conv_bias):
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=conv_bias)
    norm = frozen_norm(16, generator)
    x = torch.randn(2, 8, 12, 10, generator=generator, requires_grad=True)
    folded = conv_norm(conv, norm, x)
    reference = norm(conv(x))
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn(reference.shape, generator=generator)
    wrt = [x, *conv.parameters()]
    for a, b in zip(
        torch.autograd.grad(folded, wrt, grad), torch.autograd.grad(reference, wrt, grad)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("ours", "theirs", "planes"),
    [(FastBottleneck, tv_resnet.Bottleneck, 8), (FastBasicBlock, tv_resnet.BasicBlock, 32)],
)
def test_blocks_compute_what_torchvision_blocks_compute(ours, theirs, planes):
    generator = torch.Generator().manual_seed(1)
    downsample = nn.Sequential(nn.Conv2d(16, planes * ours.expansion, 1, stride=2, bias=False))
    downsample.append(frozen_norm(planes * ours.expansion, generator))
    block = ours(16, planes, stride=2, downsample=downsample, norm_layer=FrozenBatchNorm2d)
    for name, module in block.named_children():
        if isinstance(module, FrozenBatchNorm2d):
            setattr(block, name, frozen_norm(module.weight.numel(), generator))
    reference = theirs(16, planes, stride=2, downsample=downsample, norm_layer=FrozenBatchNorm2d)
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 16, 9, 11, generator=generator)
    torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-5)


def test_backbone_matches_torchvision_resnet_in_training():
    """The whole ResNet-50 body, frozen norms with non-trivial statistics, gradients included."""
    generator = torch.Generator().manual_seed(2)
    backbone = optimize_for_training(ResNetBackbone("resnet50", return_layers=("layer2", "layer4")))
    assert isinstance(backbone, FastResNetBackbone)
    for module in backbone.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.load_state_dict(frozen_norm(module.weight.numel(), generator).state_dict())
    reference = tv_resnet.resnet50(norm_layer=FrozenBatchNorm2d)
    reference.load_state_dict(backbone.body.state_dict(), strict=False)
    # In float64, so that only a difference in the computation, not rounding, shows.
    backbone.double().train()
    reference.double()
    images = torch.randn(1, 3, 64, 96, generator=generator, dtype=torch.float64)
    features, _ = backbone(images, torch.zeros(1, 64, 96, dtype=torch.bool))
    x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
    expected = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(reference, name)(x)
        if name in ("layer2", "layer4"):
            expected.append(x)
    # Random statistics make activations grow through the 16 blocks (to ~1e5 at layer4), so the
    # comparison is relative to each tensor's largest value.
    for mine, theirs in zip(features, expected):
        assert_close_relative(mine, theirs, 1e-12)
    loss = sum((f / f.detach().abs().max()).square().mean() for f in features)
    reference_loss = sum((f / f.detach().abs().max()).square().mean() for f in expected)
    trained = [n for n, p in backbone.body.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith(("layer2", "layer3", "layer4")) for n in trained)
    mine = torch.autograd.grad(loss, [backbone.body.get_parameter(n) for n in trained])
    theirs = torch.autograd.grad(reference_loss, [reference.get_parameter(n) for n in trained])
    for name, a, b in zip(trained, mine, theirs):
        assert_close_relative(a, b, 1e-9, name)


def assert_close_relative(actual, expected, tolerance: float, name: str = "") -> None:
    scale = expected.abs().max()
    error = (actual - expected).abs().max() / scale
    assert error < tolerance, f"{name}: largest difference {error:.2e} of the largest value"


@needs_fused
def test_training_step_through_the_fused_ops_compiles():
    """torch.compile (fullgraph) traces the ops and their backward; the seed is drawn inside the
    graph, so every compiled call drops a different set."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))

    def loss(x):
        hidden = relu_dropout(mlp[0](x), 0.2)
        fused = relu_dropout_mlp(x, mlp[0], mlp[1], 0.2)
        return dropout(mlp[1](hidden), 0.2).square().sum() + fused.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    x = torch.randn(64, 16)
    first = compiled(x)
    first.backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    assert all(g.abs().sum() > 0 for g in grads)
    assert compiled(x).item() != first.item()
