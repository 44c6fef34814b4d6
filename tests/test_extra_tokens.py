"""Extra key/value tokens in the fused ops (``additional_keys``/``additional_values``): every query attends them
besides its neighborhood, in one softmax and one logsumexp over both (``na_rtc/extra_tokens.py``).

* against one softmax over the neighborhood and the tokens written out with the brute-force neighbor mask
  (``oracle.py``), float64, 1D to 3D, with GQA, a value head dim of its own, stride, dilation, causal axes and
  rpb (the neighborhood's only); the logsumexp too;
* gradients of q, k, v, both extra tensors and rpb through output and logsumexp equal those of that one softmax
  (float64, 1e-9), and the numerical ones (gradcheck);
* zero extra tokens is plain NA; a NaN in an extra key reaches every query of its heads (a NaN value dim, that
  dim of every one); NumPy arrays; the emulator's
  kernels for the neighborhood within the tolerance table;
* bad input named.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close
from oracle import oracle_neighbor_mask, per_axis

import na_rtc

#: (ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens, window, rpb)
CASES = [
    (1, (13,), 2, 2, 4, 4, 3, dict(kernel_size=5, stride=2, dilation=2), True),
    (1, (11,), 4, 2, 6, 3, 7, dict(kernel_size=4, is_causal=True), False),
    (2, (6, 5), 4, 1, 5, 9, 1, dict(kernel_size=(3, 5), dilation=(2, 1)), True),
    (3, (4, 5, 3), 2, 1, 3, 5, 4, dict(kernel_size=(2, 3, 3), is_causal=(True, False, False)), False),
]
IDS = [f"{c[0]}d-h{c[2]}kv{c[3]}-d{c[4]}v{c[5]}-t{c[6]}" for c in CASES]


def _inputs(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens, window, has_rpb, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    q, k = draw(batch, *spatial, heads, head_dim), draw(batch, *spatial, heads_kv, head_dim)
    v = draw(batch, *spatial, heads_kv, head_dim_v)
    ek, ev = draw(batch, tokens, heads_kv, head_dim), draw(batch, tokens, heads_kv, head_dim_v)
    rpb = None
    if has_rpb:
        rpb = draw(heads, *(2 * n - 1 for n in per_axis(window["kernel_size"], ndim)))
    return q, k, v, ek, ev, rpb


def _one_softmax(q, k, v, ek, ev, rpb, window, scale=None):
    """(out, lse) of one softmax over each query's neighbors (the oracle's mask) and every extra token, in torch
    (differentiable), float64."""
    ndim, batch, heads, dim = q.dim() - 3, q.shape[0], q.shape[-2], q.shape[-1]
    spatial = tuple(q.shape[1:-2])
    mask, bias_index = oracle_neighbor_mask(spatial, window["kernel_size"], window.get("stride", 1),
                                            window.get("dilation", 1), window.get("is_causal", False))
    group = heads // k.shape[-2]
    scale = dim ** -0.5 if scale is None else scale
    tokens = math.prod(spatial)
    qf = q.reshape(batch, tokens, heads, dim)
    kf, vf = (x.reshape(batch, tokens, x.shape[-2], x.shape[-1]).repeat_interleave(group, -2) for x in (k, v))
    ekf, evf = (x.repeat_interleave(group, -2) for x in (ek, ev))
    near = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale
    if rpb is not None:
        kernels = per_axis(window["kernel_size"], ndim)
        flat = torch.zeros(mask.shape, dtype=torch.int64)
        for axis in range(ndim):
            flat = flat * (2 * kernels[axis] - 1) + torch.from_numpy(bias_index[..., axis])
        near = near + rpb.reshape(heads, -1)[:, flat]
    near = near.masked_fill(~torch.from_numpy(mask), -math.inf)
    logits = torch.cat([near, torch.einsum("bnhd,bthd->bhnt", qf, ekf) * scale], -1)
    lse = torch.logsumexp(logits, -1)
    out = torch.einsum("bhnm,bmhv->bnhv", torch.softmax(logits, -1), torch.cat([vf, evf], 1))
    return out.reshape(*q.shape[:-1], v.shape[-1]), lse.transpose(1, 2).reshape(q.shape[:-1])


def _op(ndim):
    return getattr(na_rtc, f"na{ndim}d")


@pytest.mark.parametrize("ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens, window, has_rpb", CASES,
                         ids=IDS)
def test_one_softmax_over_the_neighborhood_and_the_tokens(ndim, spatial, heads, heads_kv, head_dim, head_dim_v,
                                                          tokens, window, has_rpb):
    q, k, v, ek, ev, rpb = _inputs(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens, window, has_rpb)
    out, lse = _op(ndim)(q, k, v, **window, rpb=rpb, return_lse=True, additional_keys=ek, additional_values=ev)
    want_out, want_lse = _one_softmax(q, k, v, ek, ev, rpb, window)
    assert out.dtype == torch.float64 and tuple(out.shape) == tuple(want_out.shape)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens, window, has_rpb", CASES,
                         ids=IDS)
def test_gradients_are_those_of_the_one_softmax(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens,
                                                window, has_rpb):
    inputs = _inputs(ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens, window, has_rpb)
    grads = {}
    for how in ("na_rtc", "one softmax"):
        leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
        q, k, v, ek, ev, rpb = leaves
        if how == "na_rtc":
            out, lse = _op(ndim)(q, k, v, **window, rpb=rpb, return_lse=True, additional_keys=ek,
                                 additional_values=ev)
        else:
            out, lse = _one_softmax(q, k, v, ek, ev, rpb, window)
        generator = torch.Generator().manual_seed(5)
        (out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum().backward(retain_graph=True)
        (lse * torch.randn(lse.shape, generator=generator, dtype=lse.dtype)).sum().backward()
        grads[how] = [None if x is None else x.grad for x in leaves]
    for name, got, want in zip(("q", "k", "v", "additional_keys", "additional_values", "rpb"), grads["na_rtc"],
                               grads["one softmax"]):
        if want is None:
            continue
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=name)


def test_gradients_are_the_numerical_ones():
    ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens, window, has_rpb = CASES[2]
    inputs = [x.requires_grad_() for x in _inputs(*CASES[2][:-1], True, batch=1)]

    def run(q, k, v, ek, ev, rpb):
        return _op(ndim)(q, k, v, **window, rpb=rpb, return_lse=True, additional_keys=ek, additional_values=ev)

    assert torch.autograd.gradcheck(run, inputs)


def test_no_tokens_is_plain_neighborhood_attention_and_a_nan_token_reaches_every_query():
    q, k, v, ek, ev, _ = _inputs(*CASES[1])
    window = CASES[1][-2]
    plain, plain_lse = na_rtc.na1d(q, k, v, **window, return_lse=True)
    out, lse = na_rtc.na1d(q, k, v, **window, return_lse=True, additional_keys=ek[:, :0],
                           additional_values=ev[:, :0])
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-15)
    torch.testing.assert_close(lse, plain_lse, rtol=0, atol=1e-15)
    group = q.shape[-2] // k.shape[-2]
    poisoned_key, poisoned_value = ek.clone(), ev.clone()
    poisoned_key[1, 3, 0, 1] = math.nan  # one key of batch 1, key/value head 0: every weight of its queries
    poisoned_value[1, 3, 0, 2] = math.nan  # one value dim: that dim of every query
    out = na_rtc.na1d(q, k, v, **window, additional_keys=poisoned_key, additional_values=ev)
    assert torch.isnan(out[1, :, :group]).all()  # every query of the heads reading it, every value dim
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, :, group:]).any()
    out = na_rtc.na1d(q, k, v, **window, additional_keys=ek, additional_values=poisoned_value)
    assert torch.isnan(out[1, :, :group, 2]).all() and torch.isnan(out).sum() == out.shape[1] * group


def test_numpy_arrays():
    q, k, v, ek, ev, rpb = (x.numpy() for x in _inputs(*CASES[0]))
    window = CASES[0][-2]
    out, lse = na_rtc.na1d(q, k, v, **window, rpb=rpb, return_lse=True, additional_keys=ek, additional_values=ev)
    want_out, want_lse = _one_softmax(*(torch.from_numpy(x) for x in (q, k, v, ek, ev, rpb)), window)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    np.testing.assert_allclose(out, want_out.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse.numpy(), rtol=0, atol=1e-12)


@pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_neighborhood_on_the_kernels(dtype):
    """The public op on the emulator (its kernels stream the tokens: tests/test_kernels_extra_tokens.py has each
    path): within the tolerance table of the dtype."""
    q, k, v, ek, ev, rpb = _inputs(2, (9, 8), 4, 2, 16, 16, 5, dict(kernel_size=3), True)
    lowered = [x.to(getattr(torch, dtype)) for x in (q, k, v, ek, ev)]
    out, lse = na_rtc.na2d(*lowered[:3], 3, rpb=rpb.float(), return_lse=True, additional_keys=lowered[3],
                           additional_values=lowered[4], backend="emulator")
    want_out, want_lse = _one_softmax(*(x.double() for x in lowered), rpb.float().double(), dict(kernel_size=3))
    assert out.dtype == getattr(torch, dtype)
    assert_close(out, want_out, dtype, "forward", "out")
    assert_close(lse, want_lse, dtype, "forward", "lse")


@pytest.mark.parametrize("extra, match", [
    (dict(additional_keys=torch.ones(1, 3, 2, 4)), "additional_keys and additional_values must be given together"),
    (dict(additional_keys=torch.ones(2, 3, 2, 4), additional_values=torch.ones(2, 3, 2, 4)),
     r"additional_keys must be \[batch, tokens, heads_kv, head_dim\] = \[1, tokens, 2, 4\]"),
    (dict(additional_keys=torch.ones(1, 3, 1, 4), additional_values=torch.ones(1, 3, 2, 4)),
     r"additional_keys must be .* \[1, tokens, 2, 4\] \(the key's heads"),
    (dict(additional_keys=torch.ones(1, 3, 2, 4), additional_values=torch.ones(1, 3, 2, 5)),
     r"additional_values must be \[batch, tokens, heads_kv, head_dim_v\] = \[1, tokens, 2, 4\]"),
    (dict(additional_keys=torch.ones(1, 3, 2, 4), additional_values=torch.ones(1, 2, 2, 4)),
     "must hold the same number of tokens, got 3 and 2"),
])
def test_bad_input_is_named(extra, match):
    q = torch.ones(1, 9, 2, 4)
    with pytest.raises(ValueError, match=match):
        na_rtc.na1d(q, q, q, 3, **extra)


def test_the_kind_and_dtype_of_the_query():
    q = torch.ones(1, 9, 2, 4)
    with pytest.raises(TypeError, match="additional_keys"):
        na_rtc.na1d(q, q, q, 3, additional_keys=np.ones((1, 3, 2, 4)), additional_values=torch.ones(1, 3, 2, 4))
    with pytest.raises(TypeError, match="additional_values"):
        na_rtc.na1d(q, q, q, 3, additional_keys=torch.ones(1, 3, 2, 4),
                    additional_values=torch.ones(1, 3, 2, 4, dtype=torch.float64))


@pytest.mark.parametrize("given_forward", [False, True], ids=["recomputed", "given"])
def test_plain_backward_functions_take_the_tokens(given_forward):
    """NumPy: ``na1d_backward(..., additional_keys=, additional_values=)`` returns the six gradients of the one
    softmax (with a logsumexp gradient), recomputing the forward or from the one passed."""
    ndim, spatial, heads, heads_kv, head_dim, head_dim_v, tokens, window, has_rpb = CASES[0]
    inputs = _inputs(*CASES[0])
    generator = torch.Generator().manual_seed(7)
    leaves = [x.clone().requires_grad_() for x in inputs]
    q, k, v, ek, ev, rpb = leaves
    out, lse = _one_softmax(q, k, v, ek, ev, rpb, window)
    grad_out = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=lse.dtype)
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    arrays = [x.numpy() for x in inputs]
    forward = {}
    if given_forward:
        got_out, got_lse = na_rtc.na1d(*arrays[:3], **window, rpb=arrays[5], return_lse=True,
                                       additional_keys=arrays[3], additional_values=arrays[4])
        forward = dict(output=got_out, logsumexp=got_lse)
    grads = na_rtc.na1d_backward(grad_out.numpy(), *arrays[:3], **window, rpb=arrays[5],
                                 grad_logsumexp=grad_lse.numpy(), additional_keys=arrays[3],
                                 additional_values=arrays[4], **forward)
    assert len(grads) == 6
    for name, got, leaf in zip(("dq", "dk", "dv", "drpb", "d_additional_keys", "d_additional_values"), grads,
                               (q, k, v, rpb, ek, ev)):
        assert isinstance(got, np.ndarray) and got.shape == tuple(leaf.shape), name
        np.testing.assert_allclose(got, leaf.grad.numpy(), rtol=0, atol=1e-9, err_msg=name)


def test_second_derivatives():
    """The backward with extra tokens is differentiable again (a gradient penalty), float64, stride 1."""
    window = dict(kernel_size=3, dilation=2)
    q, k, v, ek, ev, _ = _inputs(1, (9,), 2, 1, 3, 2, 3, window, False, batch=1)

    def run(q, k, v, ek, ev):
        out, lse = na_rtc.na1d(q, k, v, **window, return_lse=True, additional_keys=ek, additional_values=ev)
        return out, lse

    assert torch.autograd.gradgradcheck(run, [x.requires_grad_() for x in (q, k, v, ek, ev)])


def test_custom_ops_with_tokens_pass_opcheck_and_compile():
    """The custom ops' schema and fake implementations with the tokens, and a fullgraph torch.compile."""
    q, k, v, ek, ev, rpb = _inputs(*CASES[2])
    window = [list(CASES[2][-2]["kernel_size"]), [1, 1], list(CASES[2][-2]["dilation"]), [False, False]]
    args = (q, k, v, rpb, *window, 0.25, "reference", ek, ev)
    torch.library.opcheck(torch.ops.na_rtc.fused_fwd.default, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.na_rtc.fused_fwd(*args)
    backward_args = (torch.ones_like(out), q, k, v, rpb, out, lse, *window, 0.25, "reference", None, ek, ev)
    torch.library.opcheck(torch.ops.na_rtc.fused_bwd.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))

    def attend(q, k, v, ek, ev):
        return na_rtc.na2d(q, k, v, **CASES[2][-2], rpb=rpb, additional_keys=ek, additional_values=ev)

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, ek, ev), attend(q, k, v, ek, ev), rtol=0, atol=0)
