"""Numerics at the edges (issue 8, part 2; NaN/Inf poisoning is tests/test_nonfinite.py).

* Finite inputs give finite outputs, also with huge logits (scale +-1e4):
  the online softmax never overflows, outputs stay convex combinations of
  the values, the logsumexp matches the float64 reference, gradients stay
  finite.
* fp16 overflow: the fused op keeps logits in fp32, so fp16 inputs whose dot
  products pass 65504 are fine; the split ``qk`` returns logits in the input
  dtype, so fp16 logits beyond the fp16 range are +-inf, exactly where the
  float64 logits round to infinity (documented in docs/guide.md and docs/reliability.md).
* Degenerate but valid inputs: all-zero queries and keys (uniform weights),
  empty batches; axes shorter than kernel_size * dilation (a single token)
  are refused with an error naming kernel_size.

Each on the reference backend and on the emulator (the CUDA C kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, make_inputs

import na_rtc

BACKENDS = ["reference", pytest.param("emulator", marks=pytest.mark.skipif(
    not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler"))]
DTYPES = ["float32", "float16", "bfloat16"]


def _inputs(shape, dtype, count, seed=0, scale_by=1.0):
    rng = np.random.default_rng(seed)
    arrays, arrays64 = make_inputs(rng, shape, getattr(torch, dtype), count)
    if scale_by != 1.0:
        arrays = [(a.double() * scale_by).to(a.dtype) for a in arrays]
        arrays64 = [a.double().numpy() for a in arrays]
    return arrays, arrays64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_logits_stay_finite_and_convex(backend, dtype, scale):
    shape = (1, 9, 8, 2, 16)
    (q, k, v, g), (q64, k64, v64, _) = _inputs(shape, dtype, 4)
    out, lse = na_rtc.na2d(q, k, v, (3, 5), scale=scale, return_lse=True, backend=backend)
    _, want_lse = na_rtc.na2d(q64, k64, v64, (3, 5), scale=scale, return_lse=True, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # |logits| reach ~1e5: the lse carries the inputs' rounding times 1e4, within the relative tolerance
    assert_close(lse, want_lse, dtype, "forward", "lse")
    # a convex combination of the values (per head and channel): a softmax that over- or underflowed is not
    low, high = v.double().amin(dim=(1, 2), keepdim=True), v.double().amax(dim=(1, 2), keepdim=True)
    slack = 1e-2 * (high - low)  # the output's own rounding in the tested dtype
    assert ((out.double() >= low - slack) & (out.double() <= high + slack)).all()
    grads = na_rtc.na2d_backward(g, q, k, v, (3, 5), scale=scale, backend=backend)
    assert all(torch.isfinite(x).all() for x in grads[:3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs_whose_logits_pass_the_fp16_range_are_fine_in_the_fused_op(backend):
    (q, k, v), (q64, k64, v64) = _inputs((1, 12, 2, 16), "float16", 3, scale_by=100.0)  # |q.k| up to ~1e5
    logits = na_rtc.na1d_qk(q64, k64, 5, backend="reference")
    assert np.abs(logits).max() > 65504  # the split qk could not hold these in fp16
    out, lse = na_rtc.na1d(q, k, v, 5, scale=1.0, return_lse=True, backend=backend)
    want_out, want_lse = na_rtc.na1d(q64, k64, v64, 5, scale=1.0, return_lse=True, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(lse, want_lse, "float16", "forward", "lse")
    assert_close(out, want_out, "float16", "forward", "out")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the point of the test
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_split_logits_overflow_to_inf_exactly_where_float64_rounds_to_inf(backend):
    (q, k), (q64, k64) = _inputs((1, 12, 2, 16), "float16", 2, scale_by=100.0)
    got = na_rtc.na1d_qk(q, k, 5, backend=backend)
    want = na_rtc.na1d_qk(q64, k64, 5, backend="reference").astype(np.float16)  # IEEE rounding: inf past 65504
    assert np.isinf(want).any() and np.isfinite(want).any()
    np.testing.assert_array_equal(torch.isinf(got).numpy(), np.isinf(want))
    np.testing.assert_array_equal(torch.sign(got[torch.isinf(got)]).numpy(), np.sign(want[np.isinf(want)]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_queries_and_keys_give_the_window_mean(backend, dtype):
    (v,), (v64,) = _inputs((2, 10, 3, 8), dtype, 1)
    zeros = torch.zeros_like(v)
    out = na_rtc.na1d(zeros, zeros, v, 4, dilation=2, backend=backend)
    want = na_rtc.na1d_av(np.full((2, 10, 3, 4), 0.25), v64, 4, dilation=2, backend="reference")
    assert_close(out, want, dtype, "forward", "window mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [1, 2])
def test_empty_batch_every_op(backend, ndim):
    spatial, kernel = ((7,), 3) if ndim == 1 else ((5, 6), (3, 3))
    q = torch.zeros((0, *spatial, 2, 4))
    attn = torch.zeros((0, *spatial, 2, 3**ndim))
    rpb = torch.zeros((2, *(5,) * ndim))
    fns = {name: getattr(na_rtc, f"na{ndim}d{suffix}") for name, suffix in
           (("fused", ""), ("bwd", "_backward"), ("qk", "_qk"), ("av", "_av"), ("qk_bwd", "_qk_backward"),
            ("av_bwd", "_av_backward"))}
    out, lse = fns["fused"](q, q, q, kernel, stride=2, rpb=rpb, return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    dq, dk, dv, drpb = fns["bwd"](q, q, q, q, kernel, stride=2, rpb=rpb, backend=backend)
    assert dq.shape == dk.shape == dv.shape == q.shape and torch.equal(drpb, torch.zeros_like(rpb))
    assert fns["qk"](q, q, kernel, rpb=rpb, backend=backend).shape == attn.shape
    assert fns["av"](attn, q, kernel, backend=backend).shape == q.shape
    dq, dk, drpb = fns["qk_bwd"](attn, q, q, kernel, rpb=rpb, backend=backend)
    assert dq.shape == dk.shape == q.shape and torch.equal(drpb, torch.zeros_like(rpb))
    dattn, dv = fns["av_bwd"](q, attn, q, kernel, backend=backend)
    assert dattn.shape == attn.shape and dv.shape == q.shape


@pytest.mark.parametrize("spatial", [(1,), (1, 8), (8, 1)], ids=["1d", "2d-rows", "2d-cols"])
def test_single_token_axes_are_refused_naming_kernel_size(spatial):
    q = np.zeros((1, *spatial, 1, 4), np.float32)
    fn = na_rtc.na1d if len(spatial) == 1 else na_rtc.na2d
    with pytest.raises(ValueError, match="kernel_size .* must not exceed the input size"):
        fn(q, q, q, 2)
