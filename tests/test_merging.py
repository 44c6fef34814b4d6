"""``na_rtc.merge_attentions``: partial attentions over disjoint key sets merged into one softmax over the union.

* NA over a window merged with dense attention over extra tokens, and two NA branches over two key tensors,
  equal one softmax over the union built from the brute-force neighbor masks of ``oracle.py``: outputs,
  logsumexps and the gradients of q, k, v, the extra tokens and rpb (float64, 1e-9; on the emulator's kernels
  within the tolerances of docs/design/testing.md#tolerances, through their differentiable logsumexp);
* a branch without keys (logsumexp -inf) changes nothing; rows without any key give 0 and -inf with finite
  gradients;
* NumPy and torch give the same merge; dtypes; bad input named.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close
from oracle import oracle_neighbor_mask

import na_rtc

EMULATOR = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _union(q, key_sets, scale):
    """``(out, lse)`` of one softmax over every key set: ``key_sets`` are ``(keys [b, m, h, d], values,
    mask [n, m] or None, bias [h, n, m] or None)``, the queries ``[b, *spatial, h, d]``."""
    batch, *spatial, heads, dim = q.shape
    qf = q.reshape(batch, -1, heads, dim)
    logits, values = [], []
    for keys, vals, mask, bias in key_sets:
        s = torch.einsum("bnhd,bmhd->bhnm", qf, keys) * scale
        if bias is not None:
            s = s + bias
        if mask is not None:
            s = s.masked_fill(~torch.from_numpy(mask), -math.inf)
        logits.append(s)
        values.append(vals)
    logits, values = torch.cat(logits, -1), torch.cat(values, 1)
    out = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), values)
    lse = torch.logsumexp(logits, -1).transpose(1, 2)
    return out.reshape(*q.shape[:-1], values.shape[-1]), lse.reshape(q.shape[:-1])


def _dense(q, k, v, scale):
    """Dense attention of every query over extra tokens ``[b, t, h, d]``: ``(out, lse)``."""
    batch, *spatial, heads, dim = q.shape
    s = torch.einsum("bnhd,bthd->bhnt", q.reshape(batch, -1, heads, dim), k) * scale
    out = torch.einsum("bhnt,bthd->bnhd", s.softmax(-1), v)
    return out.reshape(q.shape), torch.logsumexp(s, -1).transpose(1, 2).reshape(q.shape[:-1])


WINDOW = dict(kernel_size=(3, 5), dilation=(1, 2), is_causal=(False, True))
SPATIAL, HEADS, DIM, TOKENS = (5, 11), 2, 8, 7


def _na_inputs(dtype=torch.float64):
    q, k, v = (_randn(1, *SPATIAL, HEADS, DIM, seed=s, dtype=dtype) for s in range(3))
    extra_k, extra_v = (_randn(1, TOKENS, HEADS, DIM, seed=s, dtype=dtype) for s in (3, 4))
    rpb = _randn(HEADS, 5, 9, seed=5, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    return q, k, v, extra_k, extra_v, rpb


def _neighborhood(rpb):
    """The union's pieces for the window: its mask and, without causal axes, its bias; a causal axis takes no
    bias, so the merged tests with a bias use the same window without causal."""
    window = {**WINDOW, "is_causal": False}
    mask, index = oracle_neighbor_mask(SPATIAL, window["kernel_size"], 1, window["dilation"], False)
    bias = rpb[(slice(None), *torch.from_numpy(index).unbind(-1))]
    return window, mask, bias


def test_a_neighborhood_and_extra_tokens_merge_into_one_softmax():
    """The diffusion-transformer case: NA over the image merged with dense attention over text tokens equals
    one softmax over both key sets, values and every gradient (float64, 1e-9)."""
    inputs = [x.requires_grad_() for x in _na_inputs()]
    q, k, v, extra_k, extra_v, rpb = inputs
    window, mask, bias = _neighborhood(rpb)
    scale = DIM**-0.5
    na_out, na_lse = na_rtc.na2d(q, k, v, **window, rpb=rpb, return_lse=True, backend="reference")
    extra_out, extra_lse = _dense(q, extra_k, extra_v, scale)
    out, lse = na_rtc.merge_attentions([na_out, extra_out], [na_lse, extra_lse])
    n = math.prod(SPATIAL)
    want_out, want_lse = _union(q, [(k.reshape(1, n, HEADS, DIM), v.reshape(1, n, HEADS, DIM), mask, bias),
                                    (extra_k, extra_v, None, None)], scale)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-9)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-9)
    g, gl = _randn(*out.shape, seed=8), _randn(*lse.shape, seed=9)
    got = torch.autograd.grad((out * g).sum() + (lse * gl).sum(), inputs)
    want = torch.autograd.grad((want_out * g).sum() + (want_lse * gl).sum(), inputs)
    for name, a, b in zip(("dq", "dk", "dv", "d extra k", "d extra v", "drpb"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)


def _two_neighborhoods(q, k1, v1, k2, v2, backend):
    """NA of the same queries over two key tensors (a causal window into each), merged."""
    first = na_rtc.na2d(q, k1, v1, **WINDOW, return_lse=True, backend=backend)
    second = na_rtc.na2d(q, k2, v2, **WINDOW, return_lse=True, backend=backend)
    return na_rtc.merge_attentions([first[0], second[0]], [first[1], second[1]])


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64),
                                            pytest.param("emulator", torch.float32, marks=EMULATOR),
                                            pytest.param("emulator", torch.bfloat16, marks=EMULATOR)])
def test_two_neighborhood_branches_merge_into_one_softmax(backend, dtype):
    """Each query's window into two key tensors, merged, is one softmax over both windows: on the kernels
    (SIMT in float32, mma.sync in bf16) within the tolerances, their logsumexp gradients included."""
    q, k1, v1, k2, v2 = (_randn(1, *SPATIAL, HEADS, 32, seed=10 + s, dtype=dtype).requires_grad_() for s in range(5))
    out, lse = _two_neighborhoods(q, k1, v1, k2, v2, backend)
    mask, _ = oracle_neighbor_mask(SPATIAL, WINDOW["kernel_size"], 1, WINDOW["dilation"], WINDOW["is_causal"])
    n = math.prod(SPATIAL)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k1, v1, k2, v2)]
    q64, *kv64 = leaves64
    flat = [x.reshape(1, n, HEADS, 32) for x in kv64]
    want_out, want_lse = _union(q64, [(flat[0], flat[1], mask, None), (flat[2], flat[3], mask, None)], 32**-0.5)
    precision = "float64" if dtype == torch.float64 else str(dtype).removeprefix("torch.")
    assert_close(out, want_out, precision, "forward", "out")
    assert_close(lse, want_lse, precision, "forward", "lse")
    g, gl = _randn(*out.shape, seed=20), _randn(*lse.shape, seed=21)
    got = torch.autograd.grad((out * g.to(out.dtype)).sum() + (lse * gl.to(lse.dtype)).sum(), (q, k1, v1, k2, v2))
    want = torch.autograd.grad((want_out * g).sum() + (want_lse * gl).sum(), leaves64)
    for name, a, b in zip(("dq", "dk1", "dv1", "dk2", "dv2"), got, want):
        assert_close(a, b, precision, "grad", name)


def test_an_empty_branch_changes_nothing_and_empty_rows_give_zero_without_nan():
    q, k, v, *_ = (x.requires_grad_() for x in _na_inputs())
    out, lse = na_rtc.na2d(q, k, v, **WINDOW, return_lse=True, backend="reference")
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, -math.inf)
    merged, merged_lse = na_rtc.merge_attentions([out, empty_out], [lse, empty_lse])
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
    # rows whose every branch is empty: output 0, logsumexp -inf, finite gradients for everything else
    lse_partly_empty = torch.where(torch.arange(SPATIAL[1])[:, None] < 4, lse, -math.inf)
    both, both_lse = na_rtc.merge_attentions([out, empty_out], [lse_partly_empty, empty_lse])
    assert torch.equal(both[:, :, 4:], torch.zeros_like(both[:, :, 4:]))
    assert torch.isneginf(both_lse[:, :, 4:]).all() and torch.isfinite(both_lse[:, :, :4]).all()
    grads = torch.autograd.grad(both.sum() + both_lse[:, :, :4].sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_numpy_and_torch_merge_alike():
    outs = [np.random.default_rng(s).standard_normal((2, 6, 3, 4)).astype(np.float32) for s in range(3)]
    lses = [np.random.default_rng(10 + s).standard_normal((2, 6, 3)).astype(np.float32) for s in range(3)]
    lses[1][0, 0, 0] = -np.inf
    out, lse = na_rtc.merge_attentions(outs, lses)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and lse.dtype == np.float32
    t_out, t_lse = na_rtc.merge_attentions([torch.from_numpy(o) for o in outs], [torch.from_numpy(x) for x in lses])
    np.testing.assert_allclose(out, t_out.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, t_lse.numpy(), rtol=1e-6, atol=1e-6)
    stacked = np.stack(lses)
    np.testing.assert_allclose(lse, np.log(np.exp(stacked).sum(0)), rtol=1e-5)  # the logsumexp of the branches
    shares = np.exp(stacked - lse)
    np.testing.assert_allclose(out, (shares[..., None] * np.stack(outs)).sum(0), rtol=1e-5, atol=1e-6)


def test_outputs_keep_their_dtype_and_the_logsumexp_is_float32_or_float64():
    out16 = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    lse32 = torch.randn(1, 4, 2)
    out, lse = na_rtc.merge_attentions([out16, out16], [lse32, lse32])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.allclose(lse, lse32 + math.log(2))
    out, lse = na_rtc.merge_attentions([out16.double()], [lse32])
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


@pytest.mark.parametrize("outputs, lses, error, match", [
    ([], [], ValueError, "outputs must hold at least one branch"),
    ([torch.zeros(1, 4, 2, 8)], [], ValueError, "one entry per branch"),
    ([torch.zeros(1, 4, 2, 8)], [torch.zeros(1, 4, 8)], ValueError, r"lses\[0\] must have shape \(1, 4, 2\)"),
    ([torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 4)], [torch.zeros(1, 4, 2)] * 2, ValueError,
     r"outputs\[1\] has shape"),
    ([torch.zeros(1, 4, 2, 8), np.zeros((1, 4, 2, 8))], [torch.zeros(1, 4, 2)] * 2, TypeError,
     r"outputs\[1\] is a numpy.ndarray"),
    ([torch.zeros(1, 4, 2, 8)], [torch.zeros(1, 4, 2, dtype=torch.int64)], TypeError,
     r"lses\[0\] must have a floating dtype"),
    (torch.zeros(1, 4, 2, 8), [torch.zeros(1, 4, 2)], TypeError, "sequences"),
])
def test_bad_input_is_named(outputs, lses, error, match):
    with pytest.raises(error, match=match):
        na_rtc.merge_attentions(outputs, lses)
