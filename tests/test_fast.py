"""Every fast module of detrkit.fast against the reference module it replaces (the oracle), on
random inputs: the same state dict, the same outputs in eval mode (fp32 within 1e-5 of the
largest value; bf16 within BF16_TOLERANCE), and in train mode the same outputs and gradients.

Train mode runs with dropout p = 1e-12: the fused dropout kernels take every p in (0, 1), so
the fast paths run, and at that p neither they nor torch's dropout drop anything (a mask element
is dropped with probability 1e-12), so both sides compute the same function. The masks
themselves are tested against their definition in test_dropout.py.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FrozenBatchNorm2d

import detrkit.fast
from detrkit.fast import (
    adopt,
    optimize_for_inference,
    optimize_for_training,
    substitute,
    to_reference,
)
from detrkit.fast import transformer as fast_transformer
from detrkit.fast.attention import FastMultiheadAttention
from detrkit.fast.backbone import (
    AccumulatingBottleneck,
    FastBasicBlock,
    FastBottleneck,
    FastMaxPool2d,
    FastResNetBackbone,
)
from detrkit.fast.chunking import ChunkedBatches
from detrkit.fast.deformable_attention import (
    FastMSDeformAttn,
    SampleFirstMSDeformAttn,
    sampling_first_costs_less,
)
from detrkit.fast.inference import as_class
from detrkit.fast.position import FastPositionEmbeddingSine
from detrkit.fast.transformer import (
    ChunkedDeformableEncoderLayer,
    FastDeformableDecoderLayer,
    FastDeformableEncoderLayer,
    FastTransformerDecoderLayer,
    FastTransformerEncoderLayer,
)
from detrkit.models import build_model
from detrkit.models.backbone import ResNetBackbone
from detrkit.models.deformable_attention import MSDeformAttn
from detrkit.models.deformable_transformer import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoderLayer,
)
from detrkit.models.position_encoding import PositionEmbeddingSine
from detrkit.models.transformer import TransformerDecoderLayer, TransformerEncoderLayer
from detrkit.ops import Dropout, attention_implementation
from detrkit.ops._extension import load_extension
from helpers import frozen_norm, needs_fused

P = 1e-12  # dropout that runs the fused kernels and drops nothing
C, HEADS, FFN = 32, 4, 64
SHAPES = torch.tensor([[4, 5], [2, 3]])  # two levels: 20 + 6 pixels
START = torch.tensor([0, 20])
PIXELS = 26
QUERIES = 7
FP32_TOLERANCE = 1e-5
# bf16 keeps 8 bits of mantissa (a relative step of 0.4%); a layer's output, normalised or
# summed over 32-64 channels, stays within a few steps of the fp32 one.
BF16_TOLERANCE = 0.03


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def padding_mask(length: int) -> Tensor:
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[1, length - length // 4 :] = True  # the second sequence ends in padding
    return mask


def tokens(length: int, g: torch.Generator) -> Tensor:
    return torch.randn(2, length, C, generator=g)


def points(length: int, size: int, g: torch.Generator) -> Tensor:
    # Some points off the map: references reach past the borders.
    return torch.rand(2, length, 2, size, generator=g) * 1.2 - 0.1


def randomise(module: nn.Module, g: torch.Generator) -> nn.Module:
    """Non-trivial weights: deformable attention starts with zero offset and weight layers, and
    batch norms start as the identity."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * param.shape[-1] ** -0.5)
        for child in list(module.modules()):
            for norm_name, norm in list(child.named_children()):
                if isinstance(norm, FrozenBatchNorm2d):
                    setattr(child, norm_name, frozen_norm(norm.weight.numel(), g))
    return module


def deformable_attention(size: int, g: torch.Generator) -> dict:
    return dict(
        query=tokens(QUERIES, g),
        reference_points=points(QUERIES, size, g),
        input_flatten=tokens(PIXELS, g),
        spatial_shapes=SHAPES,
        level_start_index=START,
        input_padding_mask=padding_mask(PIXELS),
    )


def deformable_encoder(g: torch.Generator) -> dict:
    return dict(
        src=tokens(PIXELS, g),
        pos=tokens(PIXELS, g),
        reference_points=points(PIXELS, 2, g),
        spatial_shapes=SHAPES,
        level_start_index=START,
        padding_mask=padding_mask(PIXELS),
    )


def deformable_decoder(size: int, g: torch.Generator) -> dict:
    return dict(
        tgt=tokens(QUERIES, g),
        query_pos=tokens(QUERIES, g),
        reference_points=points(QUERIES, size, g),
        memory=tokens(PIXELS, g),
        spatial_shapes=SHAPES,
        level_start_index=START,
        memory_padding_mask=padding_mask(PIXELS),
    )


def bottleneck() -> nn.Module:
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), FrozenBatchNorm2d(32))
    return tv_resnet.Bottleneck(16, 8, 2, downsample, norm_layer=FrozenBatchNorm2d)


def basic_block() -> nn.Module:
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), FrozenBatchNorm2d(32))
    return tv_resnet.BasicBlock(16, 32, 2, downsample, norm_layer=FrozenBatchNorm2d)


def feature_map(g: torch.Generator) -> dict:
    return dict(x=torch.randn(2, 16, 9, 11, generator=g))


@dataclass
class Case:
    fast: type[nn.Module]
    reference: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict]
    training: bool = True  # whether the fast module is also for training
    # The fast forms of its children, as the substitutions make them.
    children: dict[type[nn.Module], type[nn.Module]] = dataclasses.field(default_factory=dict)


CASES = {
    "detr encoder layer": Case(
        FastTransformerEncoderLayer,
        lambda: TransformerEncoderLayer(C, HEADS, FFN, P),
        lambda g: dict(
            src=tokens(PIXELS, g), key_padding_mask=padding_mask(PIXELS), pos=tokens(PIXELS, g)
        ),
    ),
    "detr pre-norm encoder layer": Case(
        FastTransformerEncoderLayer,
        lambda: TransformerEncoderLayer(C, HEADS, FFN, P, normalize_before=True),
        lambda g: dict(
            src=tokens(PIXELS, g), key_padding_mask=padding_mask(PIXELS), pos=tokens(PIXELS, g)
        ),
    ),
    "detr decoder layer": Case(
        FastTransformerDecoderLayer,
        lambda: TransformerDecoderLayer(C, HEADS, FFN, P),
        lambda g: dict(
            tgt=tokens(QUERIES, g),
            memory=tokens(PIXELS, g),
            memory_key_padding_mask=padding_mask(PIXELS),
            pos=tokens(PIXELS, g),
            query_pos=tokens(QUERIES, g),
        ),
    ),
    "multi-head attention": Case(
        FastMultiheadAttention,
        lambda: nn.MultiheadAttention(C, HEADS, dropout=P, batch_first=True),
        lambda g: dict(
            query=tokens(QUERIES, g),
            key=(key := tokens(PIXELS, g)),
            value=key,
            key_padding_mask=padding_mask(PIXELS),
            need_weights=False,
        ),
    ),
    # Q = K (DETR's self-attentions): one product projects both in inference.
    "multi-head self-attention": Case(
        FastMultiheadAttention,
        lambda: nn.MultiheadAttention(C, HEADS, dropout=P, batch_first=True),
        lambda g: dict(
            query=(query := tokens(PIXELS, g)),
            key=query,
            value=tokens(PIXELS, g),
            key_padding_mask=padding_mask(PIXELS),
            need_weights=False,
        ),
    ),
    "dropout": Case(Dropout, lambda: nn.Dropout(P), lambda g: dict(input=tokens(PIXELS, g))),
    "deformable attention, points": Case(
        FastMSDeformAttn,
        lambda: MSDeformAttn(C, 2, HEADS, 3),
        lambda g: deformable_attention(2, g),
    ),
    "deformable attention, boxes": Case(
        FastMSDeformAttn,
        lambda: MSDeformAttn(C, 2, HEADS, 3),
        lambda g: deformable_attention(4, g),
    ),
    # 2 levels x 8 points: the kernel's points in one whole vector per head.
    "deformable attention, 16 points per head": Case(
        FastMSDeformAttn,
        lambda: MSDeformAttn(C, 2, HEADS, 8),
        lambda g: deformable_attention(2, g),
    ),
    "sampling-first deformable attention, points": Case(
        SampleFirstMSDeformAttn,
        lambda: MSDeformAttn(C, 2, HEADS, 3),
        lambda g: deformable_attention(2, g),
    ),
    "sampling-first deformable attention, boxes": Case(
        SampleFirstMSDeformAttn,
        lambda: MSDeformAttn(C, 2, HEADS, 3),
        lambda g: deformable_attention(4, g),
    ),
    "deformable encoder layer": Case(
        FastDeformableEncoderLayer,
        lambda: DeformableTransformerEncoderLayer(C, FFN, P, 2, HEADS, 3),
        deformable_encoder,
        children={MSDeformAttn: FastMSDeformAttn},
    ),
    "chunked deformable encoder layer": Case(
        ChunkedDeformableEncoderLayer,
        lambda: DeformableTransformerEncoderLayer(C, FFN, P, 2, HEADS, 3),
        deformable_encoder,
        training=False,
        children={MSDeformAttn: FastMSDeformAttn},
    ),
    "deformable decoder layer, points": Case(
        FastDeformableDecoderLayer,
        lambda: DeformableTransformerDecoderLayer(C, FFN, P, 2, HEADS, 3),
        lambda g: deformable_decoder(2, g),
        children={MSDeformAttn: SampleFirstMSDeformAttn},
    ),
    "deformable decoder layer, boxes": Case(
        FastDeformableDecoderLayer,
        lambda: DeformableTransformerDecoderLayer(C, FFN, P, 2, HEADS, 3),
        lambda g: deformable_decoder(4, g),
        children={MSDeformAttn: SampleFirstMSDeformAttn},
    ),
    "bottleneck": Case(FastBottleneck, bottleneck, feature_map),
    "accumulating bottleneck": Case(
        AccumulatingBottleneck, bottleneck, feature_map, training=False
    ),
    "basic block": Case(FastBasicBlock, basic_block, feature_map),
    # The stem's pool, on channels-last memory as the optimized backbone gives it.
    "max pool": Case(
        FastMaxPool2d,
        lambda: nn.MaxPool2d(3, 2, 1),
        lambda g: dict(
            input=torch.randn(2, 16, 9, 11, generator=g).contiguous(
                memory_format=torch.channels_last
            )
        ),
    ),
    "sine position encoding, nothing padded": Case(
        FastPositionEmbeddingSine,
        lambda: PositionEmbeddingSine(C // 2, normalize=True),
        lambda g: dict(mask=torch.zeros(2, 9, 11, dtype=torch.bool)),
        training=False,
    ),
    "sine position encoding, padded": Case(
        FastPositionEmbeddingSine,
        lambda: PositionEmbeddingSine(C // 2, normalize=True, offset=-0.5),
        lambda g: dict(mask=torch.rand(2, 9, 11, generator=g) > 0.8),
        training=False,
    ),
    "resnet backbone": Case(
        FastResNetBackbone,
        lambda: ResNetBackbone("resnet18", return_layers=("layer2", "layer4")),
        lambda g: dict(
            images=torch.randn(2, 3, 64, 80, generator=g),
            mask=torch.zeros(2, 64, 80, dtype=torch.bool),
        ),
    ),
}


def build(case: Case, training: bool) -> tuple[nn.Module, nn.Module, dict]:
    g = generator()
    reference = randomise(case.reference(), g).train(training)
    replacements = {ref: as_class(cls) for ref, cls in case.children.items()}
    fast = adopt(substitute(copy.deepcopy(reference), replacements), case.fast)
    return reference, fast, case.inputs(g)


def output_tensors(output) -> list[Tensor]:
    """The tensors of a module's output (attention returns (output, None), the backbone lists)."""
    if isinstance(output, Tensor):
        return [output]
    return [t for item in output for t in output_tensors(item)] if output is not None else []


def assert_close_relative(actual: Tensor, expected: Tensor, tolerance: float, what: str) -> None:
    if not expected.is_floating_point():  # padding masks
        assert torch.equal(actual, expected), what
        return
    assert expected.std() > 0, what  # a comparison that means something
    scale = expected.abs().max().clamp(min=1e-6)
    error = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert error < tolerance, f"{what}: largest difference {error:.2e} of the largest value"


@pytest.fixture(autouse=True)
def small_mlp_chunks(monkeypatch):
    # Chunks of 10 of the 52 tokens: several uneven chunks.
    monkeypatch.setattr(fast_transformer, "ENCODER_MLP_CHUNK", 10)


@pytest.mark.parametrize("name", list(CASES))
def test_fast_module_keeps_the_state_and_computes_the_reference_in_eval(name):
    reference, fast, inputs = build(CASES[name], training=False)
    assert isinstance(
        fast, fast.reference_class if hasattr(fast, "reference_class") else nn.Dropout
    )
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(fast.state_dict().values(), reference.state_dict().values())
    )
    with torch.no_grad():
        expected = output_tensors(reference(**inputs))
        got = output_tensors(fast(**inputs))
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert_close_relative(a, b, FP32_TOLERANCE, name)


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case.training])
def test_fast_module_trains_as_the_reference(name):
    reference, fast, inputs = build(CASES[name], training=True)
    float_inputs = {
        k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.is_floating_point()
    }
    grads = {}
    for label, module in (("reference", reference), ("fast", fast)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in float_inputs.items()}
        outputs = output_tensors(module(**{**inputs, **leaves}))
        weight = torch.Generator().manual_seed(5)
        loss = sum((o * torch.randn(o.shape, generator=weight)).sum() for o in outputs)
        wrt = list(leaves.values()) + [p for p in module.parameters() if p.requires_grad]
        grads[label] = ([o.detach() for o in outputs], torch.autograd.grad(loss, wrt))
    (expected, expected_grads), (got, got_grads) = grads["reference"], grads["fast"]
    for a, b in zip(got, expected, strict=True):
        assert_close_relative(a, b, FP32_TOLERANCE, f"{name} output")
    for index, (a, b) in enumerate(zip(got_grads, expected_grads, strict=True)):
        assert_close_relative(a, b, FP32_TOLERANCE, f"{name} gradient {index}")


# Dropout has no bf16 form of its own; the position encoding has no weights, and is fp32 in every
# precision (the backbone casts it to the features' dtype).
@pytest.mark.parametrize(
    "name", [n for n in CASES if n != "dropout" and not n.startswith("sine position")]
)
def test_fast_module_in_bf16_stays_within_its_tolerance(name):
    reference, fast, inputs = build(CASES[name], training=False)
    fast.to(torch.bfloat16)
    converted: dict[int, Tensor] = {}  # one tensor passed twice (Q = K) stays one
    low = {
        k: converted.setdefault(id(v), v.to(torch.bfloat16))
        if isinstance(v, Tensor) and v.is_floating_point()
        else v
        for k, v in inputs.items()
    }
    if "reference_points" in low:  # the models compute them in fp32
        low["reference_points"] = inputs["reference_points"]
    with torch.no_grad():
        expected = output_tensors(reference(**inputs))
        got = output_tensors(fast(**low))
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == (torch.bfloat16 if b.is_floating_point() else b.dtype)
        assert_close_relative(a, b, BF16_TOLERANCE, name)


def test_the_sampling_first_cases_sample_first():
    """The cases above take the reordered path: few queries against the pixels."""
    assert sampling_first_costs_less(QUERIES, PIXELS, C, HEADS, 2, 3)
    # Deformable DETR at 800x1066: its decoder's 300 queries sample first, its encoder does not.
    pixels = 100 * 134 + 50 * 67 + 25 * 34 + 13 * 17
    assert sampling_first_costs_less(300, pixels, 256, 8, 4, 4)
    assert not sampling_first_costs_less(pixels, pixels, 256, 8, 4, 4)
    # Small images (64x64: 8x8 + 4x4 + 2x2 + 1x1 pixels) project first.
    assert not sampling_first_costs_less(300, 85, 256, 8, 4, 4)


def test_padded_values_are_left_out_by_the_sampling_first_attention():
    _, fast, inputs = build(CASES["sampling-first deformable attention, points"], False)
    with torch.no_grad():
        expected = fast(**inputs)
        garbage = inputs["input_flatten"].clone()
        garbage[inputs["input_padding_mask"]] = 1e6
        torch.testing.assert_close(fast(**{**inputs, "input_flatten": garbage}), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_attention_leaves_out_a_mask_without_padding(dtype, monkeypatch):
    """A key padding mask with nothing padded changes nothing, so inference leaves it out (a
    faster attention kernel); with a padded key it is applied, as the reference does."""
    reference, fast, inputs = build(CASES["multi-head self-attention"], training=False)
    fast.to(dtype)
    query, value = inputs["query"].to(dtype), inputs["value"].to(dtype)
    nothing_padded = torch.zeros_like(inputs["key_padding_mask"])
    masks = []
    attend = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return attend(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        fast(query, query, value, nothing_padded, need_weights=False)
        fast(query, query, value, inputs["key_padding_mask"], need_weights=False)
    monkeypatch.undo()
    assert masks[0] is None and masks[1] is not None
    with torch.no_grad():
        unmasked = fast(query, query, value, need_weights=False)[0]
        left_out = fast(query, query, value, nothing_padded, need_weights=False)[0]
        padded = fast(query, query, value, inputs["key_padding_mask"], need_weights=False)[0]
        expected = reference(**inputs)[0]
    torch.testing.assert_close(left_out, unmasked, rtol=0, atol=0)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    assert_close_relative(padded, expected, tolerance, "padded")
    # The second sequence's padded keys matter: without the mask its output differs.
    assert (padded[1].float() - unmasked[1].float()).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_traced_inference_attention_keeps_the_padding_mask():
    """Whether anything is padded is data when tracing: a trace made without padding must still
    apply the mask of a later padded batch."""
    reference, fast, inputs = build(CASES["multi-head self-attention"], training=False)
    fast.requires_grad_(False)  # its weights become the trace's constants
    query, value, padded = inputs["query"], inputs["value"], inputs["key_padding_mask"]

    def attend(module):
        return lambda q, v, mask: module(q, q, v, mask, need_weights=False)[0]

    with torch.no_grad():
        traced = torch.jit.trace(attend(fast), (query, value, torch.zeros_like(padded)))
        expected = attend(reference)(query, value, padded)
        assert_close_relative(traced(query, value, padded), expected, FP32_TOLERANCE, "traced")


def test_unbatched_attention_is_the_reference():
    reference, fast, inputs = build(CASES["multi-head self-attention"], training=False)
    query, value = inputs["query"][0], inputs["value"][0]  # [L, C]
    with torch.no_grad():
        got = fast(query, query, value, need_weights=False)[0]
        expected = reference(query, query, value, need_weights=False)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_attention_outside_its_inference_form_is_the_reference():
    """Attention weights asked for, an attention mask or an additive padding mask: torch's own
    forward, to the bit."""
    reference, fast, inputs = build(CASES["multi-head attention"], training=False)
    blocked = torch.zeros(QUERIES, PIXELS, dtype=torch.bool)
    blocked[:, :3] = True
    additive = torch.zeros(inputs["key_padding_mask"].shape).masked_fill(
        inputs["key_padding_mask"], -1e4
    )
    with torch.no_grad():
        for extra in (
            dict(need_weights=True),
            dict(attn_mask=blocked),
            dict(key_padding_mask=additive),
        ):
            got = fast(**{**inputs, **extra})
            expected = reference(**{**inputs, **extra})
            for a, b in zip(output_tensors(got), output_tensors(expected), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def fast_classes() -> set[type]:
    """Every module class of detrkit.fast that replaces a reference module."""
    found = set()
    for module in vars(detrkit.fast).values():
        if inspect.ismodule(module):
            for value in vars(module).values():
                if inspect.isclass(value) and "reference_class" in vars(value):
                    found.add(value)
                if inspect.isclass(value) and issubclass(value, nn.Module):
                    found |= {
                        c for c in value.__subclasses__() if c.__module__.startswith("detrkit.fast")
                    }
    return found


def test_every_fast_module_is_compared_with_its_reference():
    import detrkit.fast.backbone
    import detrkit.fast.deformable_attention
    import detrkit.fast.transformer  # noqa: F401 (registers the modules searched)

    tested = {case.fast for case in CASES.values()}
    untested = {cls.__name__ for cls in fast_classes() if issubclass(cls, nn.Module)} - {
        cls.__name__ for cls in tested
    }
    # The detector-level batch chunking is compared in test_inference_model.py.
    assert untested <= {"ChunkedBatches"}, untested


@pytest.mark.parametrize(
    "name", ["detr_digits", "deformable_detr_digits", "deformable_detr_two_stage"]
)
def test_substitution_keeps_every_parameter_and_goes_back(name):
    torch.manual_seed(0)
    model = build_model(name, hidden_dim=32, nheads=4, dim_feedforward=64, num_queries=10)
    before = dict(model.named_parameters())
    state = list(model.state_dict())
    trained = optimize_for_training(model)
    assert trained is model  # in place: an optimizer built before stays valid
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == state
    kinds = {type(m) for m in model.modules()}
    assert FastResNetBackbone in kinds and nn.Dropout not in kinds
    back = to_reference(model)
    assert not any(hasattr(type(m), "reference_class") for m in back.modules())
    assert all(dict(back.named_parameters())[k] is before[k] for k in before)
    optimized = optimize_for_inference(back)
    assert isinstance(optimized, ChunkedBatches)
    assert not isinstance(to_reference(optimized), ChunkedBatches)


def test_shared_heads_stay_shared():
    """Deformable DETR without box refinement lists one class head under every decoder layer's
    index; a substitution must not make copies of it."""
    model = optimize_for_training(build_model("deformable_detr", num_queries=10))
    heads = list(model.class_embed)
    assert all(head is heads[0] for head in heads)


def test_weights_changed_after_substitution_take_effect():
    """The merged offset/weight projection is formed on every call: changing the weights of an
    optimized or training model (an optimizer step, load_state_dict) can never leave it stale."""
    g = generator()
    reference = randomise(MSDeformAttn(C, 2, HEADS, 3), g).eval()
    fast = adopt(copy.deepcopy(reference), FastMSDeformAttn)
    inputs = deformable_attention(2, g)
    with torch.no_grad():
        before = fast(**inputs)
        for module in (reference, fast):
            module.sampling_offsets.bias.add_(1.0)
        expected = reference(**inputs)
        after = fast(**inputs)
    assert (after - before).abs().max() > 1e-3
    assert_close_relative(after, expected, FP32_TOLERANCE, "after the change")


def test_a_bf16_model_follows_weights_loaded_after_its_first_call():
    """Its convolution weights are packed for oneDNN on the first call; weights loaded later
    must be the ones used."""

    def optimized(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = build_model("detr_digits", hidden_dim=32, nheads=4, dim_feedforward=64).eval()
        return optimize_for_inference(model, "bf16")

    first, second = optimized(0), optimized(1)
    images = torch.randn(1, 3, 64, 80, generator=generator())
    mask = torch.zeros(1, 64, 80, dtype=torch.bool)
    with torch.inference_mode():
        before = first(images, mask)["pred_logits"]
        expected = second(images, mask)["pred_logits"]
    first.load_state_dict(second.state_dict())
    with torch.inference_mode():
        after = first(images, mask)["pred_logits"]
    assert (before.float() - expected.float()).abs().max() > 1e-2
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_a_model_optimized_under_inference_mode_has_ordinary_weights():
    """Its bf16 weights can then be packed once for oneDNN and the packed copies kept
    (detrkit.ops.onednn): inference tensors keep no version counter to tell a change."""
    torch.manual_seed(0)
    model = build_model("detr_digits", hidden_dim=32, nheads=4, dim_feedforward=64).eval()
    with torch.inference_mode():
        optimized = optimize_for_inference(model, "bf16")
    assert not any(p.is_inference() for p in optimized.parameters())


def test_the_panoptic_model_optimized_computes_its_masks_as_the_reference():
    """DETR's mask head reads the backbone's C2-C4 and the transformer's memory: the fast
    backbone (batch norm folded, Winograd, channels-last) and transformer must feed it the same."""
    torch.manual_seed(0)
    model = build_model("detr_digits_panoptic", num_queries=6, dim_feedforward=64).eval()
    g = generator()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    with torch.no_grad():
        expected = model(images, mask)
        optimized = optimize_for_inference(model)
        assert any(hasattr(type(m), "reference_class") for m in optimized.modules())
        actual = optimized(images, mask)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        scale = expected[key].abs().max()
        assert (actual[key] - expected[key]).abs().max() <= 1e-4 * scale, key
    state = list(model.state_dict())
    trained = optimize_for_training(model)
    assert list(trained.state_dict()) == state


def count_kernel_calls(monkeypatch, name: str) -> list:
    """Records each call of the compiled kernel ``name`` (and still runs it)."""
    kernels = load_extension()
    original, calls = getattr(kernels, name), []

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(kernels, name, counted)
    return calls


@needs_fused
def test_inference_runs_the_fused_attention_and_norm_kernels(monkeypatch):
    """The encoder layer in inference samples with the kernel that computes its own points and
    ends each block with the one-pass addition and norm; with a gradient wanted, or the reference
    attention chosen, it runs the separate operators (the results above compare both)."""
    projected = count_kernel_calls(monkeypatch, "projected_forward")
    normed = count_kernel_calls(monkeypatch, "add_layer_norm_out")
    _, fast, inputs = build(CASES["chunked deformable encoder layer"], training=False)
    with torch.no_grad():
        fast(**inputs)
    # One attention; norm1 and the MLP's norm2 over its chunks of 10 of the 52 tokens.
    assert (len(projected), len(normed)) == (1, 1 + 6)
    with torch.no_grad(), attention_implementation("reference"):
        fast(**inputs)
    assert (len(projected), len(normed)) == (1, 14)
    inputs["src"].requires_grad_(True)
    fast(**inputs)
    assert (len(projected), len(normed)) == (1, 14)


def test_weights_still_get_their_gradient_when_the_inputs_need_none():
    """Grad mode on, inputs without gradients: the in-kernel sampling has no gradient, so the
    attention runs the separate operators and its own weights are trained as the reference's."""
    reference, fast, inputs = build(CASES["deformable attention, 16 points per head"], True)
    reference.eval(), fast.eval()
    grads = []
    for module in (reference, fast):
        output = module(**inputs)
        weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(5))
        (output * weight).sum().backward()
        grads.append([p.grad for p in module.parameters()])
    for name, (a, b) in zip(dict(fast.named_parameters()), zip(*grads, strict=True)):
        assert a is not None and b is not None, name
        assert_close_relative(b, a, FP32_TOLERANCE, name)
