"""The logsumexp is differentiable (docs/guide.md, "API summary"): every fused backward takes its gradient dLSE as
``delta = rowsum(dOut * out) - dLSE`` (d lse / d logit = p, so every logit's gradient gains ``p * dLSE``).

* the reference in float64 against numerical derivatives (gradcheck, and gradgradcheck through the recorded
  double-backward path), 1D to 3D with stride, dilation, causal axes and a bias;
* every kernel path (SIMT, mma.sync, wgmma, the composed split kernels) on the emulator against the float64
  reference, with a loss that reads the output and the logsumexp, within the tolerances of docs/design/testing.md#tolerances;
* the plain ``na*d_backward`` functions with ``grad_logsumexp`` (NumPy and torch) against autograd, and their
  bad input;
* a logsumexp nothing depends on (or an output nothing depends on) costs nothing and changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close

import na_rtc

EMULATOR = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")

#: (ndim, shape, window) of the cases: stride, dilation, causal axes and a bias where the window allows one
CASES = [
    (1, (2, 13, 2, 8), dict(kernel_size=5, stride=2, dilation=2), True),
    (1, (1, 11, 2, 8), dict(kernel_size=4, is_causal=True), False),
    (2, (1, 7, 6, 2, 8), dict(kernel_size=(3, 5), dilation=(2, 1)), True),
    (2, (1, 6, 7, 1, 8), dict(kernel_size=3, stride=(2, 1), is_causal=(True, False)), False),
    (3, (1, 4, 5, 6, 2, 4), dict(kernel_size=(2, 3, 3), is_causal=(True, False, False)), False),
    (3, (1, 5, 4, 6, 1, 4), dict(kernel_size=3, dilation=(1, 1, 2)), True),
]


def _inputs(ndim, shape, window, has_rpb, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(3))
    rpb = None
    if has_rpb:
        kernel = window["kernel_size"]
        kernel = (kernel,) * ndim if isinstance(kernel, int) else kernel
        rpb = torch.randn((shape[-2], *(2 * k - 1 for k in kernel)), generator=generator, dtype=torch.float64)
        rpb = rpb.to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    return q, k, v, rpb


def _op(ndim):
    return getattr(na_rtc, f"na{ndim}d")


def _reference_call(ndim, shape, window, has_rpb):
    """``(f, leaves)``: the reference op returning (out, lse) as a function of its differentiable inputs."""
    q, k, v, rpb = _inputs(ndim, shape, window, has_rpb)
    leaves = [x.requires_grad_() for x in (q, k, v, rpb) if x is not None]

    def f(q, k, v, *rest):
        return _op(ndim)(q, k, v, **window, rpb=rest[0] if rest else None, return_lse=True, backend="reference")

    return f, leaves


@pytest.mark.parametrize("ndim, shape, window, has_rpb", CASES, ids=str)
def test_the_reference_logsumexp_gradient_is_the_numerical_one(ndim, shape, window, has_rpb):
    assert torch.autograd.gradcheck(*_reference_call(ndim, shape, window, has_rpb))


@pytest.mark.parametrize("ndim, shape, window, has_rpb", [CASES[0], CASES[3]], ids=str)
def test_the_recorded_double_backward_takes_the_logsumexp_gradient(ndim, shape, window, has_rpb):
    if any(s > 1 for s in np.atleast_1d(window.get("stride", 1))):
        window = {**window, "stride": 1}  # second derivatives come from the split ops, which take no stride
    assert torch.autograd.gradgradcheck(*_reference_call(ndim, shape, window, has_rpb))


def _loss_grads(ndim, window, inputs, backend, seed=1):
    """Gradients of ``sum(out * g) + sum(lse * gl)`` for every input that has one."""
    q, k, v, rpb = (None if x is None else x.detach().requires_grad_() for x in inputs)
    out, lse = _op(ndim)(q, k, v, **window, rpb=rpb, return_lse=True, backend=backend)
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=generator, dtype=torch.float64)
    loss = (out * g.to(out.dtype)).sum() + (lse * gl.to(lse.dtype)).sum()
    leaves = [x for x in (q, k, v, rpb) if x is not None]
    return torch.autograd.grad(loss, leaves)


#: (path, dtype, settings): the settings that make the emulator's backward run each path, and the kernel
#: name prefix that shows it ran (float64 has no fused kernel: the split kernels composed)
PATHS = [
    ("simt", torch.float32, {"NA_RTC_TENSOR_CORES": "0"}, "na_fused_bwd_dq<"),
    ("mma.sync", torch.float16, {}, "na_fused_tc_bwd_dq<"),
    ("mma.sync", torch.bfloat16, {}, "na_fused_tc_bwd_dq<"),
    ("wgmma", torch.float16, {"NA_RTC_WGMMA": "1"}, "na_fused_wg_bwd_dq<"),
    ("split", torch.float64, {}, "na_softmax_bwd<"),
]


@EMULATOR
@pytest.mark.parametrize("path, dtype, settings, kernel", PATHS, ids=lambda x: str(x) if isinstance(x, str) else None)
@pytest.mark.parametrize("ndim, shape, window, has_rpb", CASES, ids=str)
def test_every_kernel_path_takes_the_logsumexp_gradient(ndim, shape, window, has_rpb, path, dtype, settings, kernel,
                                                        monkeypatch):
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    if path == "split" and any(s > 1 for s in np.atleast_1d(window.get("stride", 1))):
        window = {**window, "stride": 1}  # the split kernels take no stride
    if path in ("mma.sync", "wgmma"):
        shape = (*shape[:-1], 32)  # the tensor-core kernels' smallest head-dim bucket
    inputs = _inputs(ndim, shape, window, has_rpb, dtype)
    q, k, v, rpb = inputs
    explained = na_rtc.explain(f"na{ndim}d", q, k, v, **window, rpb=rpb, backward=True, backend="emulator")
    assert any(name.startswith(kernel) for name in explained.kernels), str(explained)
    got = _loss_grads(ndim, window, inputs, "emulator")
    want = _loss_grads(ndim, window, [None if x is None else x.double() for x in inputs], "reference")
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want):
        assert_close(a, b, "float64" if dtype == torch.float64 else str(dtype).removeprefix("torch."), "grad", name)


@pytest.mark.parametrize("backend", ["reference", pytest.param("emulator", marks=EMULATOR)])
def test_the_backward_functions_take_grad_logsumexp(backend):
    """na2d_backward with grad_logsumexp: NumPy arrays and torch tensors, against autograd of the same loss."""
    ndim, shape, window, has_rpb = CASES[2]
    inputs = _inputs(ndim, shape, window, has_rpb, torch.float32)
    q, k, v, rpb = inputs
    out, lse = na_rtc.na2d(q, k, v, **window, rpb=rpb, return_lse=True, backend=backend)
    generator = torch.Generator().manual_seed(1)
    g = torch.randn(out.shape, generator=generator, dtype=torch.float64).float()
    gl = torch.randn(lse.shape, generator=generator, dtype=torch.float64).float()
    want = _loss_grads(ndim, window, inputs, backend)
    torch_grads = na_rtc.na2d_backward(g, q, k, v, **window, rpb=rpb, output=out, logsumexp=lse, grad_logsumexp=gl,
                                       backend=backend)
    numpy_grads = na_rtc.na2d_backward(g.numpy(), q.numpy(), k.numpy(), v.numpy(), **window, rpb=rpb.numpy(),
                                       grad_logsumexp=gl.numpy(), backend=backend)  # output recomputed
    for name, a, b, c in zip(("dq", "dk", "dv", "drpb"), want, torch_grads, numpy_grads):
        assert_close(b, a.double(), "float32", "grad", name)
        assert_close(torch.from_numpy(c), a.double(), "float32", "grad", name)
    plain = na_rtc.na2d_backward(g, q, k, v, **window, rpb=rpb, output=out, logsumexp=lse, backend=backend)
    assert not torch.allclose(plain[0], torch_grads[0])  # the logsumexp's gradient changes dq


def test_a_logsumexp_nothing_reads_changes_nothing():
    """Gradients of a loss on the output alone are those of a loss with a zero logsumexp gradient, and a loss
    on the logsumexp alone works too (the output's gradient is then zero)."""
    ndim, shape, window, has_rpb = CASES[0]
    q, k, v, rpb = (x.requires_grad_() for x in _inputs(ndim, shape, window, has_rpb))
    out, lse = na_rtc.na1d(q, k, v, **window, rpb=rpb, return_lse=True, backend="reference")
    g = torch.randn_like(out)
    only_out = torch.autograd.grad((out * g).sum(), (q, k, v, rpb), retain_graph=True)
    with_zero = torch.autograd.grad((out * g).sum() + (lse * 0).sum(), (q, k, v, rpb), retain_graph=True)
    for a, b in zip(only_out, with_zero):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    only_lse = torch.autograd.grad(lse.sum(), (q, k, v, rpb))
    assert torch.count_nonzero(only_lse[2]) == 0  # lse does not depend on the values
    assert torch.count_nonzero(only_lse[0]) > 0


@pytest.mark.parametrize("bad, error, match", [
    (lambda lse: lse[..., :1], ValueError, "grad_logsumexp must have shape"),
    (lambda lse: lse.numpy(), TypeError, "grad_logsumexp is a numpy.ndarray"),
    (lambda lse: lse.to(torch.int32), TypeError, "grad_logsumexp must have a floating dtype"),
])
def test_bad_grad_logsumexp_is_named(bad, error, match):
    q = torch.randn(1, 9, 2, 8)
    out, lse = na_rtc.na1d(q, q, q, 3, return_lse=True, backend="reference")
    with pytest.raises(error, match=match):
        na_rtc.na1d_backward(out, q, q, q, 3, output=out, logsumexp=lse, grad_logsumexp=bad(lse),
                             backend="reference")
