"""A value head dim of its own (``head_dim_v``) in the fused ops: ``value`` ``[..., heads_kv, head_dim_v]``, the
output (and ``grad_out``) ``[..., heads, head_dim_v]``, ``scale`` from the query's head dim.

* the reference against the brute-force oracle (``oracle.py``), 1D to 3D, with GQA, stride, dilation, causal
  axes and rpb; numerical gradients (float64 gradcheck through output and logsumexp);
* NumPy arrays and the plain backward functions; meta tensors (the custom op's fake shapes);
* bad input named (the key's head dim must stay the query's; grad_out with the value's);
* the kernels themselves: tests/test_kernels_gqa_value_dim.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import oracle_na

import na_rtc

#: (ndim, spatial, heads, heads_kv, head_dim, head_dim_v, window, rpb)
CASES = [
    (1, (13,), 2, 2, 4, 7, dict(kernel_size=5, stride=2, dilation=2), True),
    (1, (11,), 4, 2, 6, 3, dict(kernel_size=4, is_causal=True), False),
    (2, (7, 6), 4, 1, 5, 9, dict(kernel_size=(3, 5), dilation=(2, 1)), True),
    (3, (4, 5, 6), 2, 1, 3, 5, dict(kernel_size=(2, 3, 3), is_causal=(True, False, False)), False),
]
IDS = [f"{c[0]}d-h{c[2]}kv{c[3]}-d{c[4]}v{c[5]}" for c in CASES]


def _inputs(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, window, has_rpb, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    q, k = draw(batch, *spatial, heads, head_dim), draw(batch, *spatial, heads_kv, head_dim)
    v = draw(batch, *spatial, heads_kv, head_dim_v)
    rpb = None
    if has_rpb:
        kernel = window["kernel_size"]
        rpb = draw(heads, *(2 * n - 1 for n in ((kernel,) * ndim if isinstance(kernel, int) else kernel)))
    return q, k, v, rpb


def _op(ndim, name=""):
    return getattr(na_rtc, f"na{ndim}d{name}")


@pytest.mark.parametrize("ndim, spatial, heads, heads_kv, head_dim, head_dim_v, window, has_rpb", CASES, ids=IDS)
def test_reference_matches_the_oracle(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, window, has_rpb):
    q, k, v, rpb = _inputs(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, window, has_rpb)
    out, lse = _op(ndim)(q, k, v, **window, rpb=rpb, return_lse=True, backend="reference")
    assert tuple(out.shape) == (*q.shape[:-1], head_dim_v)
    group = heads // heads_kv
    want_out, want_lse = oracle_na(q.numpy(), k.repeat_interleave(group, -2).numpy(),
                                   v.repeat_interleave(group, -2).numpy(), window["kernel_size"],
                                   window.get("stride", 1), window.get("dilation", 1), window.get("is_causal", False),
                                   None, None if rpb is None else rpb.numpy())
    np.testing.assert_allclose(out.numpy(), want_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ndim, spatial, heads, heads_kv, head_dim, head_dim_v, window, has_rpb", CASES[::2],
                         ids=IDS[::2])
def test_gradients_are_the_numerical_ones(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, window, has_rpb):
    inputs = [None if x is None else x.requires_grad_()
              for x in _inputs(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, window, has_rpb, batch=1)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, rpb: _op(ndim)(q, k, v, **window, rpb=rpb, return_lse=True, backend="reference"), inputs)


def test_numpy_arrays_and_the_backward_functions():
    q, k, v, _ = (x.numpy() if x is not None else None for x in _inputs(*CASES[1]))
    out = na_rtc.na1d(q, k, v, 4, is_causal=True)
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    grad_out = np.ones_like(out)
    dq, dk, dv, drpb = na_rtc.na1d_backward(grad_out, q, k, v, 4, is_causal=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and drpb is None
    tensors = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
    na_rtc.na1d(*tensors, 4, is_causal=True).backward(torch.from_numpy(grad_out))
    for got, want in zip((dq, dk, dv), tensors):
        np.testing.assert_allclose(got, want.grad.numpy(), rtol=0, atol=1e-12)


def test_meta_tensors_take_the_value_head_dim():
    q, k, v = (x.to("meta").requires_grad_() for x in _inputs(*CASES[2][:-1], False)[:3])
    out, lse = na_rtc.na2d(q, k, v, (3, 5), dilation=(2, 1), return_lse=True, backend="reference")
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and lse.shape == q.shape[:-1]
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v: na_rtc.na1d(q, k[..., :3], v, 3), r"key must have the shape of query"),
    (lambda q, k, v: na_rtc.na1d(q, k, v[:, :8], 3), r"value must have the shape of query .* a head dim of its own"),
    (lambda q, k, v: na_rtc.na1d(q, k, v[..., :0], 3), r"value head_dim \(last dimension\) must be >= 1"),
    (lambda q, k, v: na_rtc.na1d_backward(torch.ones(1, 9, 2, 4), q, k, v, 3),
     r"grad_out must have shape \(1, 9, 2, 6\)"),
])
def test_bad_input_is_named(call, match):
    q, k, v = torch.ones(1, 9, 2, 4), torch.ones(1, 9, 2, 4), torch.ones(1, 9, 2, 6)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
