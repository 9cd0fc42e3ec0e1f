"""detrkit's multi-head attention kernel for bf16 CPU inference (detrkit.ops.dot_product_attention)
against the attention computed in fp64 from the same bf16 inputs, and against torch's own bf16
attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.fast.attention import FastMultiheadAttention
from detrkit.ops import dot_product_attention, dot_product_kernel_applies
from detrkit.ops._extension import load_extension


def kernel_available() -> bool:
    extension = load_extension()
    return extension is not None and extension.attention_kernel_available()


needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no AMX bf16 products here")


def inputs(batch, queries, keys, heads, head_dim, padded=(), seed=0):
    """bf16 query [B, Lq, C] (a strided view, as a packed projection's chunk gives), key, value
    [B, Lk, C], and the padding mask with keys[from:] padded for (image, from) in padded."""
    g = torch.Generator().manual_seed(seed)
    channels = heads * head_dim
    query = torch.randn(batch, queries, 2 * channels, generator=g).bfloat16()[..., :channels]
    key = (torch.randn(batch, keys, channels, generator=g) * 2).bfloat16()
    value = torch.randn(batch, keys, channels, generator=g).bfloat16()
    mask = torch.zeros(batch, keys, dtype=torch.bool)
    for image, start in padded:
        mask[image, start:] = True
    return query, key, value, mask


def exact(query, key, value, heads, mask) -> Tensor:
    """The attention in fp64 of the bf16 inputs; zeros for a query with every key padded."""
    batch, queries, channels = query.shape
    q, k, v = (t.double().unflatten(-1, (heads, -1)).transpose(1, 2) for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(-1).nan_to_num(0.0)
    return (weights @ v).transpose(1, 2).reshape(batch, queries, channels)


def torch_bf16(query, key, value, heads, mask) -> Tensor:
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (query, key, value))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
    return attended.transpose(1, 2).reshape(query.shape)


# (batch, queries, keys, heads, channels per head, padded keys as (image, first padded))
CASES = {
    "DETR's encoder": (1, 850, 850, 8, 32, ()),
    "DETR's decoder cross-attention, two images padded": (2, 100, 850, 8, 32, ((1, 600),)),
    "one key": (2, 7, 1, 8, 32, ()),
    "keys one past a block": (3, 5, 65, 2, 64, ((0, 64), (2, 1))),
    "a single head, many keys": (1, 33, 2100, 1, 96, ((0, 2000),)),
    "more queries than a task's rows": (2, 131, 40, 4, 32, ((1, 39),)),
}


@needs_kernel
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_kernel_is_the_attention_to_bf16_rounding(case):
    *shape, padded = case
    heads = shape[3]
    query, key, value, mask = inputs(*shape, padded=padded)
    assert dot_product_kernel_applies(query, key, value, heads, mask)
    with torch.inference_mode():
        got = dot_product_attention(query, key, value, heads, mask)
        theirs = torch_bf16(query, key, value, heads, mask)
    expected = exact(query, key, value, heads, mask)
    assert got.dtype == torch.bfloat16 and got.shape == query.shape and got.is_contiguous()
    error = (got.double() - expected).abs()
    # The weights are rounded to bf16 before the second product (as in torch's kernel): each
    # output is off by at most a few bf16 steps of the largest value.
    bound = 2**-6 * value.abs().max().double()
    assert error.max() <= bound
    # ... and on average no further off than torch's own bf16 attention.
    assert error.mean() <= 1.25 * (theirs.double() - expected).abs().mean() + 1e-6
    # Padded keys weigh nothing: values written over them change nothing.
    if padded:
        garbage = value.clone()
        garbage[mask] = 1e4
        with torch.inference_mode():
            again = dot_product_attention(query, key, garbage, heads, mask)
        assert torch.equal(again, got)


@needs_kernel
def test_keys_and_values_at_any_row_stride():
    """Rows of an odd length, starting at an odd element (views into wider tensors), and one query
    broadcast over its row dimension (stride 0)."""
    query, key, value, mask = inputs(2, 20, 77, 8, 32, padded=((0, 70),))
    wide_key = torch.zeros(2, 77, 256 + 3, dtype=torch.bfloat16)
    wide_value = torch.zeros(2, 77, 256 + 5, dtype=torch.bfloat16)
    wide_key[..., 1:257], wide_value[..., 3:259] = key, value
    odd_key, odd_value = wide_key[..., 1:257], wide_value[..., 3:259]
    assert odd_key.stride(1) % 2 == 1 and odd_key.storage_offset() % 2 == 1
    single = query[:, :1].expand(2, 1, 256)
    for q in (query, single):
        assert dot_product_kernel_applies(q, odd_key, odd_value, 8, mask)
        with torch.inference_mode():
            got = dot_product_attention(q, odd_key, odd_value, 8, mask)
            expected = dot_product_attention(q.contiguous(), key, value, 8, mask)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_kernel
def test_a_query_with_every_key_padded_gets_zeros():
    query, key, value, mask = inputs(2, 9, 70, 8, 32, padded=((1, 0),))
    with torch.inference_mode():
        got = dot_product_attention(query, key, value, 8, mask)
    assert (got[1] == 0).all()
    assert (got[0] != 0).any() and torch.isfinite(got[0]).all()


@needs_kernel
def test_a_nan_reaches_the_outputs_it_feeds():
    query, key, value, mask = inputs(1, 6, 90, 8, 32)
    query[0, 3, 0] = float("nan")  # head 0's scores of query 3
    value[0, 20, 40] = float("nan")  # head 1's value of key 20
    with torch.inference_mode():
        got = dot_product_attention(query, key, value, 8, mask)
    assert got[0, 3, :32].isnan().all()
    assert got[0, :, 32:64].isnan().any(dim=-1).all()  # every query weighs key 20
    assert torch.isfinite(got[0, :3, :32]).all() and torch.isfinite(got[0, :, 64:]).all()


@needs_kernel
@pytest.mark.parametrize("keys", [1, 16, 63, 90])
def test_a_row_of_nan_scores_is_nan_not_zeros(keys):
    """The row's maximum passes NaN over; a row of nothing but NaN scores must still give NaN."""
    query, key, value, mask = inputs(1, 6, keys, 8, 32)
    query[0, 3, :32] = float("nan")  # every score of query 3 in head 0
    with torch.inference_mode():
        got = dot_product_attention(query, key, value, 8, mask)
    assert got[0, 3, :32].isnan().all()
    assert torch.isfinite(got[0, :3]).all() and torch.isfinite(got[0, 3, 32:]).all()


@needs_kernel
def test_a_nan_score_beside_only_padded_keys_is_nan():
    query, key, value, mask = inputs(1, 6, 90, 8, 32, padded=((0, 1),))
    key[0, 0, 0] = float("nan")  # head 0's only unpadded key
    with torch.inference_mode():
        got = dot_product_attention(query, key, value, 8, mask)
    assert got[0, :, :32].isnan().all()
    assert torch.isfinite(got[0, :, 32:]).all()


# Each case the kernel does not take, and torch's attention runs instead: (what, change).
FALLBACKS = {
    "fp32": lambda q, k, v: (q.float(), k.float(), v.float()),
    "16 channels per head": lambda q, k, v: (q[..., :128], k[..., :128], v[..., :128]),
    "a gradient wanted": lambda q, k, v: (q.detach().requires_grad_(), k, v),
    # the same values, every other element of a wider tensor
    "channels not contiguous": lambda q, k, v: (q, k, v.repeat_interleave(2, -1)[..., ::2]),
    "query rows overlapping": lambda q, k, v: (q[:, :1].expand(-1, 10, -1), k, v),
    # torch's attention broadcasts a batch of one
    "key and value of one image": lambda q, k, v: (q, k[:1], v[:1]),
}


@pytest.mark.parametrize("change", FALLBACKS.values(), ids=FALLBACKS.keys())
def test_other_inputs_get_torchs_attention(change):
    query, key, value, mask = inputs(2, 10, 20, 8, 32, padded=((1, 15),))
    query, key, value = change(query, key, value)
    heads = 8
    assert not dot_product_kernel_applies(query, key, value, heads, mask)
    with torch.enable_grad():
        got = dot_product_attention(query, key, value, heads, mask)
        expected = torch_bf16(query, key, value, heads, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_inputs_the_kernel_would_misread_are_not_its():
    query, key, value, mask = inputs(2, 10, 20, 8, 32)
    assert not dot_product_kernel_applies(query, key, value, 8, mask.to("meta"))  # another device
    assert not dot_product_kernel_applies(query, key, value, 8, mask[:, :5])  # another shape
    empty = (t[..., :0] for t in (query, key, value))
    assert not dot_product_kernel_applies(*empty, 8, mask)  # no channels


@needs_kernel
@pytest.mark.parametrize(
    "argument, change, message",
    [
        ("dtype", lambda q, k, v, m: (q.float(), k, v, m), "bf16"),
        ("head size", lambda q, k, v, m: (q[..., :48], k[..., :48], v[..., :48], m), "per head"),
        ("key shape", lambda q, k, v, m: (q, k[:, :5], v, m), "key and value"),
        ("mask shape", lambda q, k, v, m: (q, k, v, m[:, :5]), "key_padding_mask"),
        ("mask dtype", lambda q, k, v, m: (q, k, v, m.float()), "key_padding_mask"),
        ("no keys", lambda q, k, v, m: (q, k[:, :0], v[:, :0], m[:, :0]), "keys"),
    ],
)
def test_the_kernel_names_what_is_wrong(argument, change, message):
    query, key, value, mask = inputs(1, 4, 20, 1, 64)
    query, key, value, mask = change(query, key, value, mask)
    with pytest.raises(RuntimeError, match=message):
        load_extension().attention_forward(query, key, value, 1, mask)


@needs_kernel
def test_fast_attention_module_in_bf16_is_the_reference():
    """FastMultiheadAttention in bf16 inference (DETR's sizes, so the kernel runs) against
    nn.MultiheadAttention in fp32, with and without padding."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(256, 8, batch_first=True).eval()
    fast = FastMultiheadAttention(256, 8, batch_first=True).eval()
    fast.load_state_dict(reference.state_dict())
    fast.bfloat16()
    x = torch.randn(2, 300, 256)
    padding = torch.zeros(2, 300, dtype=torch.bool)
    padding[1, 200:] = True
    for mask in (None, padding):
        with torch.inference_mode():
            expected = reference(x, x, x, key_padding_mask=mask, need_weights=False)[0]
            got = fast(x.bfloat16(), x.bfloat16(), x.bfloat16(), mask, need_weights=False)[0]
        error = (got.float() - expected).abs().max() / expected.abs().max()
        assert error < 0.03, f"mask {mask is not None}: {error:.2e} of the largest value"
