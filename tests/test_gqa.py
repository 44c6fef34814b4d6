"""Grouped key/value heads (GQA/MQA): key and value with ``heads_kv`` heads dividing the query's ``heads``,
query head ``h`` reading key/value head ``h // (heads // heads_kv)`` (torch SDPA's ``enable_gqa`` and
NATTEN's convention).

* the reference's fused and split ops against the brute-force oracle on key/value heads repeated to the
  query's (``oracle.py``), 1D to 3D with ratios 2 and 4 and MQA, stride, dilation, causal axes and rpb;
* gradients: numerical (gradcheck) and equal to those through an explicit repeat, whose autograd sums each
  group's query heads into its key/value head (float64);
* NumPy arrays and the plain backward functions; the layers' ``num_kv_heads``;
* which backends serve it (every one; the kernels themselves in test_gqa_kernels.py), and bad input named.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from oracle import oracle_na

import na_rtc
from na_rtc import _args, backends

#: (ndim, spatial, heads, heads_kv, window, rpb): ratios 2 and 4 and MQA over every rank
CASES = [
    (1, (13,), 4, 2, dict(kernel_size=5, stride=2, dilation=2), True),
    (1, (11,), 4, 1, dict(kernel_size=4, is_causal=True), False),
    (2, (7, 6), 4, 1, dict(kernel_size=(3, 5), dilation=(2, 1)), True),
    (2, (6, 7), 8, 2, dict(kernel_size=3, stride=(2, 1), is_causal=(True, False)), False),
    (3, (4, 5, 6), 4, 2, dict(kernel_size=(2, 3, 3), is_causal=(True, False, False)), False),
    (3, (5, 4, 6), 4, 1, dict(kernel_size=3, dilation=(1, 1, 2)), True),
]
IDS = [f"{c[0]}d-h{c[2]}-kv{c[3]}" for c in CASES]
DIM = 4


def _inputs(ndim, spatial, heads, heads_kv, window, has_rpb, seed=0, batch=2):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    q = draw(batch, *spatial, heads, DIM)
    k, v = draw(batch, *spatial, heads_kv, DIM), draw(batch, *spatial, heads_kv, DIM)
    rpb = None
    if has_rpb:
        kernel = window["kernel_size"]
        kernel = (kernel,) * ndim if isinstance(kernel, int) else kernel
        rpb = draw(heads, *(2 * k - 1 for k in kernel))
    return q, k, v, rpb


def _repeat(x, heads):
    """Key/value heads repeated to ``heads``: head j serves heads j * group .. j * group + group - 1."""
    return x.repeat_interleave(heads // x.shape[-2], dim=-2)


def _op(ndim, name=""):
    return getattr(na_rtc, f"na{ndim}d{name}")


@pytest.mark.parametrize("ndim, spatial, heads, heads_kv, window, has_rpb", CASES, ids=IDS)
def test_fused_matches_the_oracle_on_repeated_heads(ndim, spatial, heads, heads_kv, window, has_rpb):
    q, k, v, rpb = _inputs(ndim, spatial, heads, heads_kv, window, has_rpb)
    out, lse = _op(ndim)(q, k, v, **window, rpb=rpb, return_lse=True)
    want_out, want_lse = oracle_na(q.numpy(), _repeat(k, heads).numpy(), _repeat(v, heads).numpy(),
                                   window["kernel_size"], window.get("stride", 1), window.get("dilation", 1),
                                   window.get("is_causal", False), None, None if rpb is None else rpb.numpy())
    np.testing.assert_allclose(out.numpy(), want_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ndim, spatial, heads, heads_kv, window, has_rpb", CASES, ids=IDS)
def test_gradients_sum_each_groups_query_heads(ndim, spatial, heads, heads_kv, window, has_rpb):
    """Every gradient equals the one through an explicit repeat of key and value (autograd sums the copies),
    for a loss on the output and the logsumexp; the split ops' too."""
    inputs = [None if x is None else x.requires_grad_() for x in _inputs(ndim, spatial, heads, heads_kv, window,
                                                                        has_rpb)]
    q, k, v, rpb = inputs
    leaves = [x for x in inputs if x is not None]
    generator = torch.Generator().manual_seed(3)
    g = torch.randn((2, *spatial, heads, DIM), generator=generator, dtype=torch.float64)
    gl = torch.randn((2, *spatial, heads), generator=generator, dtype=torch.float64)

    def loss(key, value):
        out, lse = _op(ndim)(q, key, value, **window, rpb=rpb, return_lse=True)
        return (out * g).sum() + (lse * gl).sum()

    got = torch.autograd.grad(loss(k, v), leaves)
    want = torch.autograd.grad(loss(_repeat(k, heads), _repeat(v, heads)), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    def split_loss(key, value):
        attn = _op(ndim, "_qk")(q * DIM**-0.5, key, window["kernel_size"], window.get("dilation", 1),
                                window.get("is_causal", False), rpb=rpb).softmax(-1)
        return (_op(ndim, "_av")(attn, value, window["kernel_size"], window.get("dilation", 1),
                                 window.get("is_causal", False)) * g).sum()

    got = torch.autograd.grad(split_loss(k, v), leaves)
    want = torch.autograd.grad(split_loss(_repeat(k, heads), _repeat(v, heads)), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


#: small problems for numerical differentiation (one evaluation per input element)
GRADCHECK_CASES = [CASES[0], (2, (4, 6), 2, 1, dict(kernel_size=3, dilation=(1, 2)), True),
                   (3, (3, 3, 4), 2, 1, dict(kernel_size=(2, 3, 2), is_causal=(True, False, False)), False)]


@pytest.mark.parametrize("ndim, spatial, heads, heads_kv, window, has_rpb", GRADCHECK_CASES, ids=str)
def test_gradients_are_the_numerical_ones(ndim, spatial, heads, heads_kv, window, has_rpb):
    inputs = _inputs(ndim, spatial, heads, heads_kv, window, has_rpb, batch=1)
    leaves = [x.requires_grad_() for x in inputs if x is not None]

    def f(q, k, v, *rest):
        return _op(ndim)(q, k, v, **window, rpb=rest[0] if rest else None, return_lse=True)

    assert torch.autograd.gradcheck(f, leaves)


def test_numpy_arrays_and_the_backward_functions():
    ndim, spatial, heads, heads_kv, window, has_rpb = CASES[2]
    q, k, v, rpb = _inputs(ndim, spatial, heads, heads_kv, window, has_rpb)
    out = na_rtc.na2d(q.numpy(), k.numpy(), v.numpy(), **window, rpb=rpb.numpy())
    assert isinstance(out, np.ndarray) and out.shape == q.shape
    g = np.random.default_rng(0).standard_normal(out.shape)
    dq, dk, dv, drpb = na_rtc.na2d_backward(g, q.numpy(), k.numpy(), v.numpy(), **window, rpb=rpb.numpy())
    assert dk.shape == dv.shape == k.shape and dq.shape == q.shape
    leaves = [x.requires_grad_() for x in (q, k, v, rpb)]
    want = torch.autograd.grad(na_rtc.na2d(q, k, v, **window, rpb=rpb), leaves, torch.from_numpy(g))
    for a, b in zip((dq, dk, dv, drpb), want):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_layers_take_num_kv_heads(ndim):
    """One qkv Linear with (heads + 2 * kv heads) * head_dim outputs in the order [q | k | v]; the layer is the
    functional op on those slices."""
    cls = getattr(na_rtc, f"NeighborhoodAttention{ndim}D")
    torch.manual_seed(0)
    layer = cls(32, 8, 3, num_kv_heads=2, rel_pos_bias=True).double()
    assert layer.qkv.out_features == (8 + 2 * 2) * 4 and layer.num_kv_heads == 2
    assert "num_kv_heads=2" in repr(layer)
    x = torch.randn(2, *(5,) * ndim, 32, dtype=torch.float64)
    projected = layer.qkv(x)
    q = projected[..., :32].unflatten(-1, (8, 4))
    k = projected[..., 32:40].unflatten(-1, (2, 4))
    v = projected[..., 40:].unflatten(-1, (2, 4))
    want = layer.proj(_op(ndim)(q, k, v, 3, rpb=layer.rpb).flatten(-2))
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)
    assert cls(32, 8, 3).qkv.out_features == 96  # without GQA: 3 * embed_dim, as before


def test_every_backend_serves_it_and_automatic_selection_keeps_the_default():
    """The kernel backends run grouped key/value heads natively (test_gqa_kernels.py holds every kernel family
    to the reference): selection treats them as any other problem, and the emulator's results are the
    reference's through the public op."""
    q, k, v, _ = _inputs(1, (9,), 4, 2, dict(kernel_size=3), False)
    problem = _args.fused_problem(1, q, k, v, 3, 1, 1, False, None, None)
    for name in ("emulator", "reference"):
        assert backends.select(problem, name).name == name
    # a CUDA tensor's default is the cuda backend, grouped heads or not (the problem alone decides; no GPU needed
    # to check the choice)
    meta = [x.to("meta") for x in (q, k, v)]
    cuda_problem = dataclasses.replace(_args.fused_problem(1, *meta, 3, 1, 1, False, None, None), device="cuda:0")
    assert backends.select(cuda_problem).name == "cuda" and cuda_problem.group == 2
    if backends.get("emulator").probe()[0]:
        got = na_rtc.na1d(q, k, v, 3, backend="emulator")
        torch.testing.assert_close(got, na_rtc.na1d(q, k, v, 3, backend="reference"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k: na_rtc.na1d(q, k[..., :1, :].expand(1, 9, 3, 4), k[..., :1, :].expand(1, 9, 3, 4), 3),
     ValueError, r"key has 3 heads, which must divide query's 4 heads"),
    (lambda q, k: na_rtc.na1d(q, k, k[..., :1, :], 3), ValueError, "key and value must have the same number of heads"),
    (lambda q, k: na_rtc.na1d(q, k[..., :2], k, 3), ValueError, "key must have the shape of query"),
    (lambda q, k: na_rtc.na1d_av(torch.ones(1, 9, 4, 3), k[..., :1, :].expand(1, 9, 3, 4), 3), ValueError,
     "value has 3 heads, which must divide attn's 4 heads"),
    (lambda q, k: na_rtc.NeighborhoodAttention1D(16, 4, 3, num_kv_heads=3), ValueError,
     r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    (lambda q, k: na_rtc.NeighborhoodAttention1D(16, 4, 3, num_kv_heads=0), ValueError, "num_kv_heads"),
])
def test_bad_input_is_named(call, error, match):
    q, k = torch.ones(1, 9, 4, 4), torch.ones(1, 9, 2, 4)
    with pytest.raises(error, match=match):
        call(q, k)
