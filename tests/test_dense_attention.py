"""``na_rtc.attention``: dense attention with the NA ops' conventions (GQA/MQA, a value head dim of its own,
query and key lengths apart, a differentiable logsumexp), the extra-token path with an empty neighborhood.

Against softmax attention written out in float64 torch: output, logsumexp, and the gradients of query, key and
value through both (1e-9); chunks of queries smaller than the problem give the same result; NumPy arrays
within the tolerance table; two halves of the keys merged equal all of them; no keys; bad input named.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close

import na_rtc


def _draw(seed, *shapes):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _softmax_attention(q, k, v, scale=None):
    group = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    out = torch.einsum("bhnm,bmhv->bnhv", torch.softmax(logits, -1), v)
    return out, torch.logsumexp(logits, -1).transpose(1, 2)


CASES = [  # (batch, queries, keys, heads, heads_kv, head_dim, head_dim_v)
    (2, 7, 19, 4, 2, 8, 8),
    (1, 33, 5, 6, 1, 4, 12),
    (2, 16, 16, 2, 2, 16, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-q{}-k{}-h{}kv{}-d{}v{}".format(*c))
def test_against_softmax_attention_with_gradients(case, monkeypatch):
    batch, queries, keys, heads, heads_kv, dim, dim_v = case
    q, k, v, g, glse = _draw(1, (batch, queries, heads, dim), (batch, keys, heads_kv, dim),
                             (batch, keys, heads_kv, dim_v), (batch, queries, heads, dim_v), (batch, queries, heads))
    want = _softmax_attention(*(x.clone().requires_grad_() for x in (q, k, v)), scale=0.3)
    monkeypatch.setenv("NA_RTC_REFERENCE_CHUNK_MB", "0.0005")  # a few queries per chunk: the chunks are stitched
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = na_rtc.attention(*leaves, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want[1], rtol=0, atol=1e-12)
    torch.autograd.backward((out, lse), (g, glse))
    wanted = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.autograd.backward(_softmax_attention(*wanted, scale=0.3), (g, glse))
    for got, expected in zip(leaves, wanted):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=1e-9)


def test_numpy_and_float32():
    q, k, v = _draw(2, (1, 9, 4, 8), (1, 11, 2, 8), (1, 11, 2, 6))
    want_out, want_lse = _softmax_attention(q, k, v)
    out, lse = na_rtc.attention(q.float().numpy(), k.float().numpy(), v.float().numpy(), return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 9, 4, 6)
    assert_close(out, want_out.numpy(), "float32", "forward", "out")
    assert_close(lse, want_lse.numpy(), "float32", "forward", "lse")


def test_two_halves_merged_are_all_keys():
    q, k, v = _draw(3, (2, 5, 2, 4), (2, 12, 2, 4), (2, 12, 2, 4))
    parts = [na_rtc.attention(q, k[:, s], v[:, s], return_lse=True) for s in (slice(0, 7), slice(7, None))]
    out, lse = na_rtc.merge_attentions([p[0] for p in parts], [p[1] for p in parts])
    want_out, want_lse = _softmax_attention(q, k, v)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)


def test_no_keys():
    q, k, v = _draw(4, (1, 3, 2, 4), (1, 0, 2, 4), (1, 0, 2, 4))
    q.requires_grad_()
    out, lse = na_rtc.attention(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert (q.grad == 0).all()


@pytest.mark.parametrize("shapes, match", [
    (((1, 3, 2, 4), (1, 5, 2, 6), (1, 5, 2, 4)), r"key must be \[batch, keys, heads_kv, head_dim\]"),
    (((1, 3, 2, 4), (1, 5, 2, 4), (1, 6, 2, 4)), "value must be"),
    (((1, 3, 4, 4), (1, 5, 3, 4), (1, 5, 3, 4)), "key has 3 heads, which must divide query's 4 heads"),
    (((1, 3, 4), (1, 5, 2, 4), (1, 5, 2, 4)), "query must have 4 dimensions"),
])
def test_bad_input_is_named(shapes, match):
    with pytest.raises(ValueError, match=match):
        na_rtc.attention(*(torch.ones(s) for s in shapes))
    with pytest.raises(TypeError, match="key"):
        na_rtc.attention(torch.ones(1, 3, 2, 4), np.ones((1, 3, 2, 4)), torch.ones(1, 3, 2, 4))
