"""Double backward: gradients of gradients (gradient penalties, R1
regularization, Hessian-vector products) through every op, on the reference
and emulator backends, against a dense float64 torch reference that autograd
differentiates twice.

A gradient penalty is ``first = grad(objective, inputs, create_graph=True)``
then ``second = grad(sum(u * first), inputs)``; both must equal the dense
reference's within the tolerance table (the ``grad`` column).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from oracle import oracle_neighbor_mask, oracle_slot_index

import na_rtc

NO_EMULATOR = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not na_rtc.backends.get("cuda").probe()[0], reason="no usable GPU")]


# ---------------------------------------------------------------- dense float64 references (plain torch ops)


def dense_na(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None):
    batch, *spatial, heads, dim = q.shape
    n = math.prod(spatial)
    mask, bias_index = oracle_neighbor_mask(tuple(spatial), kernel_size, stride, dilation, is_causal)
    qf, kf, vf = (x.reshape(batch, n, heads, -1) for x in (q, k, v))
    logits = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * dim**-0.5
    if rpb is not None:
        logits = logits + rpb[(slice(None), *torch.from_numpy(bias_index).unbind(-1))]
    logits = logits.masked_fill(~torch.from_numpy(mask), -math.inf)
    return torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), vf).reshape(q.shape)


def _slots(spatial, kernel_size, dilation, is_causal):
    keys, bias = oracle_slot_index(tuple(spatial), kernel_size, dilation, is_causal)
    keys, bias = torch.from_numpy(keys), torch.from_numpy(bias)
    valid = keys >= 0
    return torch.where(valid, keys, 0), valid, bias


def dense_qk(q, k, kernel_size, dilation=1, is_causal=False, rpb=None):
    batch, *spatial, heads, dim = q.shape
    keys, valid, bias = _slots(spatial, kernel_size, dilation, is_causal)
    qf, kf = (x.reshape(batch, -1, heads, dim) for x in (q, k))
    logits = torch.einsum("bnhd,bnthd->bnht", qf, kf[:, keys])
    if rpb is not None:
        logits = logits + rpb[(slice(None), *bias.unbind(-1))].permute(1, 0, 2)
    logits = logits.masked_fill(~valid[None, :, None, :], -math.inf)
    return logits.reshape(*q.shape[:-1], keys.shape[-1])


def dense_av(attn, v, kernel_size, dilation=1, is_causal=False):
    batch, *spatial, heads, dim = v.shape
    keys, valid, _ = _slots(spatial, kernel_size, dilation, is_causal)
    weights = attn.reshape(batch, -1, heads, keys.shape[-1]).masked_fill(~valid[None, :, None, :], 0.0)
    return torch.einsum("bnht,bnthd->bnhd", weights, v.reshape(batch, -1, heads, dim)[:, keys]).reshape(v.shape)


# ---------------------------------------------------------------- cases


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _probs(*shape, seed):
    return _randn(*shape, seed=seed).softmax(-1)


# name -> (ours, dense, input shapes' makers); each op's objective goes through a softmax where its
# output is logits, so the penalty exercises the softmax's second derivative too
CASES = {
    "na1d-rpb-dilation": (lambda q, k, v, r, backend: na_rtc.na1d(q, k, v, 3, dilation=2, rpb=r, backend=backend),
                          lambda q, k, v, r: dense_na(q, k, v, 3, dilation=2, rpb=r),
                          lambda: [_randn(2, 9, 2, 4, seed=s) for s in range(3)] + [_randn(2, 5, seed=3)]),
    "na1d-causal": (lambda q, k, v, backend: na_rtc.na1d(q, k, v, 4, is_causal=True, backend=backend),
                    lambda q, k, v: dense_na(q, k, v, 4, is_causal=True),
                    lambda: [_randn(1, 10, 2, 4, seed=s) for s in range(3)]),
    "na2d-rpb": (lambda q, k, v, r, backend: na_rtc.na2d(q, k, v, (3, 5), rpb=r, backend=backend),
                 lambda q, k, v, r: dense_na(q, k, v, (3, 5), rpb=r),
                 lambda: [_randn(1, 5, 6, 2, 4, seed=s) for s in range(3)] + [_randn(2, 5, 9, seed=3)]),
    "na2d-causal-dilation": (lambda q, k, v, backend: na_rtc.na2d(q, k, v, (2, 3), dilation=(2, 1),
                                                                  is_causal=(True, False), backend=backend),
                             lambda q, k, v: dense_na(q, k, v, (2, 3), dilation=(2, 1), is_causal=(True, False)),
                             lambda: [_randn(1, 5, 4, 2, 4, seed=s) for s in range(3)]),
    "na1d_qk-rpb": (lambda q, k, r, backend: na_rtc.na1d_qk(q, k, 3, rpb=r, backend=backend).softmax(-1),
                    lambda q, k, r: dense_qk(q, k, 3, rpb=r).softmax(-1),
                    lambda: [_randn(2, 7, 2, 4, seed=s) for s in range(2)] + [_randn(2, 5, seed=3)]),
    "na2d_qk-causal": (lambda q, k, backend: na_rtc.na2d_qk(q, k, (3, 2), is_causal=(False, True),
                                                            backend=backend).softmax(-1),
                       lambda q, k: dense_qk(q, k, (3, 2), is_causal=(False, True)).softmax(-1),
                       lambda: [_randn(1, 4, 5, 2, 4, seed=s) for s in range(2)]),
    "na1d_av-causal": (lambda a, v, backend: na_rtc.na1d_av(a, v, 3, is_causal=True, backend=backend),
                       lambda a, v: dense_av(a, v, 3, is_causal=True),
                       lambda: [_probs(2, 7, 2, 3, seed=0), _randn(2, 7, 2, 4, seed=1)]),
    "na2d_av-dilation": (lambda a, v, backend: na_rtc.na2d_av(a, v, (2, 3), dilation=(2, 1), backend=backend),
                         lambda a, v: dense_av(a, v, (2, 3), dilation=(2, 1)),
                         lambda: [_probs(1, 4, 5, 2, 6, seed=0), _randn(1, 4, 5, 2, 4, seed=1)]),
}


# 3D: the same checks with three-axis windows
CASES_3D = {
    "na3d-rpb": (lambda q, k, v, r, backend: na_rtc.na3d(q, k, v, 3, dilation=(1, 1, 2), rpb=r, backend=backend),
                 lambda q, k, v, r: dense_na(q, k, v, 3, dilation=(1, 1, 2), rpb=r),
                 lambda: [_randn(1, 3, 4, 6, 2, 3, seed=s) for s in range(3)] + [_randn(2, 5, 5, 5, seed=3)]),
    "na3d-causal-in-time": (lambda q, k, v, backend: na_rtc.na3d(q, k, v, (2, 3, 2), is_causal=(True, False, False),
                                                                 backend=backend),
                            lambda q, k, v: dense_na(q, k, v, (2, 3, 2), is_causal=(True, False, False)),
                            lambda: [_randn(1, 4, 3, 3, 2, 3, seed=s) for s in range(3)]),
    "na3d_qk-causal": (lambda q, k, backend: na_rtc.na3d_qk(q, k, (2, 2, 3), is_causal=(True, False, True),
                                                            backend=backend).softmax(-1),
                       lambda q, k: dense_qk(q, k, (2, 2, 3), is_causal=(True, False, True)).softmax(-1),
                       lambda: [_randn(1, 3, 3, 4, 2, 3, seed=s) for s in range(2)]),
    "na3d_av-dilation": (lambda a, v, backend: na_rtc.na3d_av(a, v, (2, 2, 3), dilation=(1, 2, 1), backend=backend),
                         lambda a, v: dense_av(a, v, (2, 2, 3), dilation=(1, 2, 1)),
                         lambda: [_probs(1, 3, 4, 3, 2, 12, seed=0), _randn(1, 3, 4, 3, 2, 3, seed=1)]),
}


def _penalty(function, inputs, weight_seed=7):
    """``(first, second)``: the gradients of a weighted sum of ``function``'s output, and of a
    weighted sum of those gradients (a gradient penalty), both with respect to ``inputs``."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = function(*inputs)
    weights = _randn(*out.shape, seed=weight_seed).to(out)
    first = torch.autograd.grad((out * weights).sum(), inputs, create_graph=True)
    penalty = sum((g * _randn(*g.shape, seed=11 + i).to(g)).sum() for i, g in enumerate(first))
    second = torch.autograd.grad(penalty, inputs)
    return first, second


@pytest.mark.parametrize("backend, dtype", [
    pytest.param("reference", torch.float64, id="reference-fp64"),
    pytest.param("reference", torch.bfloat16, id="reference-bf16"),
    pytest.param("emulator", torch.float32, id="emulator-fp32", marks=NO_EMULATOR),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=GPU),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=GPU),
])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradient_penalty_equals_the_float64_reference(case, backend, dtype):
    _check_penalty(case, backend, dtype)


@pytest.mark.parametrize("backend, dtype", [
    pytest.param("reference", torch.float64, id="reference-fp64"),
    pytest.param("reference", torch.bfloat16, id="reference-bf16"),
    pytest.param("emulator", torch.float32, id="emulator-fp32", marks=NO_EMULATOR),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=GPU),
])
@pytest.mark.parametrize("case", CASES_3D.values(), ids=CASES_3D.keys())
def test_3d_gradient_penalty_equals_the_float64_reference(case, backend, dtype):
    _check_penalty(case, backend, dtype)


def _check_penalty(case, backend, dtype):
    ours, dense, make = case
    inputs64 = [x.to(dtype).double() for x in make()]  # rounded to the tested dtype, as the reference sees them
    device = "cuda" if backend == "cuda" else "cpu"
    first, second = _penalty(lambda *xs: ours(*xs, backend=backend), [x.to(device, dtype) for x in inputs64])
    first_ref, second_ref = _penalty(dense, inputs64)
    for i, (got, want) in enumerate(zip(first, first_ref)):
        assert got.dtype == dtype
        assert_close(got, want, dtype, "grad", f"first gradient of input {i}")
    for i, (got, want) in enumerate(zip(second, second_ref)):
        assert_close(got, want, dtype, "grad", f"gradient of the penalty, input {i}")


@pytest.mark.parametrize("name", ["na1d-rpb-dilation", "na2d-causal-dilation", "na1d_qk-rpb", "na2d_av-dilation",
                                  "na3d-rpb", "na3d_av-dilation"])
def test_second_derivatives_pass_gradgradcheck(name):
    # gradgradcheck also differentiates with respect to the incoming gradient, which the penalty test holds fixed
    ours, _, make = {**CASES, **CASES_3D}[name]
    inputs = [x.requires_grad_() for x in make()]
    assert torch.autograd.gradgradcheck(lambda *xs: ours(*xs, backend="reference"), inputs, fast_mode=True)


def _dense_layer(layer, x):
    batch, *spatial, channels = x.shape
    q, k, v = layer.qkv(x).reshape(batch, *spatial, 3, layer.num_heads, layer.head_dim).unbind(-3)
    out = dense_na(q, k, v, layer.kernel_size, layer.stride, layer.dilation, layer.is_causal, layer.rpb)
    return layer.proj(out.reshape(x.shape))


@pytest.mark.parametrize("attn_drop", [0.0, 0.5], ids=["fused-path", "split-path"])
def test_r1_penalty_through_a_layer_trains_like_the_dense_layer(attn_drop):
    """R1 regularization (a GAN discriminator's gradient penalty on its input) through a layer."""
    torch.manual_seed(0)
    layer = na_rtc.NeighborhoodAttention2D(8, 2, kernel_size=3, dilation=(1, 2), rel_pos_bias=True,
                                           attn_drop=attn_drop).double()
    layer.eval()  # dropout off, but the split path is forced below for attn_drop > 0
    layer.training = attn_drop > 0
    layer.attn_drop.eval()

    def r1(forward):
        layer.zero_grad()
        x = _randn(2, 5, 7, 8, seed=5).requires_grad_()
        (grad_x,) = torch.autograd.grad(forward(layer, x).square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        return {name: p.grad.clone() for name, p in layer.named_parameters()}

    ours, want = r1(lambda m, x: m(x)), r1(_dense_layer)
    for name in want:
        assert_close(ours[name], want[name], torch.float64, "grad", name)


def test_double_backward_with_stride_is_refused_naming_the_op_and_what_to_do():
    q, k, v = (_randn(1, 6, 7, 2, 4, seed=s).requires_grad_() for s in range(3))
    out = na_rtc.na2d(q, k, v, 3, stride=(2, 1))
    first = torch.autograd.grad(out.sum(), (q, k, v))  # first derivatives are fine
    assert all(g.shape == q.shape for g in first)
    with pytest.raises(NotImplementedError, match=r"na2d with stride \(2, 1\) has first derivatives only.*"
                                                  r"create_graph=True.*Use stride=1"):
        torch.autograd.grad(na_rtc.na2d(q, k, v, 3, stride=(2, 1)).sum(), (q, k, v), create_graph=True)


def test_plain_backward_functions_are_differentiable():
    # na1d_backward on tensors that require grad gives gradients autograd can differentiate again
    q, k, v, g = (_randn(1, 8, 2, 4, seed=s).requires_grad_() for s in range(4))
    dq, dk, dv, _ = na_rtc.na1d_backward(g, q, k, v, 3, is_causal=True)
    second = torch.autograd.grad(dq.sum() + dk.square().sum() + dv.sum(), (q, k, v, g))
    first_ref = torch.autograd.grad(dense_na(q, k, v, 3, is_causal=True), (q, k, v), g, create_graph=True)
    want = torch.autograd.grad(first_ref[0].sum() + first_ref[1].square().sum() + first_ref[2].sum(), (q, k, v, g))
    for i, (got, ref) in enumerate(zip(second, want)):
        assert_close(got, ref, torch.float64, "grad", f"input {i}")
