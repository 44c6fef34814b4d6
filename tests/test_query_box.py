"""Fused ops whose queries are a box of the key's positions (``Problem.query_box``, context parallelism's
slab queries against slab and halo): the reference computes the box alone, the other backends pad it to
every position; both must give the box's rows of the full computation and every gradient."""

from __future__ import annotations

import pytest
import torch

import na_rtc
from na_rtc import functional

from helpers import assert_close

CASES = {
    "1d": dict(spatial=(20,), kernel=5, box=((4, 13),)),
    "1d-causal-extra-gqa": dict(spatial=(20,), kernel=5, box=((7, 20),), causal=True, extra=3, heads_kv=2),
    "2d-dilation-stride": dict(spatial=(12, 9), kernel=(3, 5), box=((2, 7), (0, 9)), dilation=(2, 1),
                               stride=(1, 2)),
    "2d-rpb-box-on-both-axes": dict(spatial=(10, 11), kernel=(3, 5), box=((1, 6), (3, 10)), rpb=True),
    "3d-extra": dict(spatial=(6, 5, 7), kernel=(3, 3, 3), box=((1, 4), (0, 5), (2, 6)), extra=2),
}
BACKENDS = ["reference", "blocked",
            pytest.param("emulator", marks=pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                                              reason="the emulator needs a C++ compiler"))]


def _inputs(case, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    heads, heads_kv = 4, case.get("heads_kv", 4)

    def rand(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
        return t.requires_grad_(requires_grad)

    spatial, extra = case["spatial"], case.get("extra", 0)
    kernel = case["kernel"] if isinstance(case["kernel"], tuple) else (case["kernel"],) * len(spatial)
    return dict(query=rand(1, *spatial, heads, 8), key=rand(1, *spatial, heads_kv, 8),
                value=rand(1, *spatial, heads_kv, 6),
                rpb=rand(heads, *(2 * k - 1 for k in kernel)) if case.get("rpb") else None,
                additional_keys=rand(1, extra, heads_kv, 8) if extra else None,
                additional_values=rand(1, extra, heads_kv, 6) if extra else None)


def _fused(case, t, query, backend, query_start=None):
    ndim = len(case["spatial"])
    return functional._fused(ndim, query, t["key"], t["value"], case["kernel"], case.get("stride", 1),
                             case.get("dilation", 1), case.get("causal", False), None, t["rpb"], True, backend,
                             t["additional_keys"], t["additional_values"], query_start)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_a_query_box_gives_the_box_of_the_full_computation(name, backend):
    case = CASES[name]
    dtype = torch.float32 if backend == "emulator" else torch.float64
    box = (slice(None), *(slice(a, b) for a, b in case["box"]))
    mine, full = _inputs(case, dtype, True), _inputs(case, torch.float64, True)
    rows = mine["query"].detach()[box].clone().requires_grad_()
    out, lse = _fused(case, mine, rows, backend, [a for a, _ in case["box"]])
    want_out, want_lse = _fused(case, full, full["query"], "reference")
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    ((out.double() * grad_out).sum() + (lse.double() * grad_lse).sum()).backward()
    full_grad_out, full_grad_lse = torch.zeros(want_out.shape, dtype=torch.float64), torch.zeros(want_lse.shape,
                                                                                                 dtype=torch.float64)
    full_grad_out[box], full_grad_lse[box] = grad_out, grad_lse
    ((want_out * full_grad_out).sum() + (want_lse * full_grad_lse).sum()).backward()
    dtype_name = str(dtype).replace("torch.", "")
    assert_close(out, want_out.detach()[box], dtype_name, "forward", "out")
    assert_close(lse, want_lse.detach()[box], dtype_name, "forward", "lse")
    assert_close(rows.grad, full["query"].grad[box], dtype_name, "grad", "dq")
    for name_ in ("key", "value", "rpb", "additional_keys", "additional_values"):
        if full[name_] is not None:
            assert_close(mine[name_].grad, full[name_].grad, dtype_name, "grad", f"d{name_}")


def test_a_query_box_twice_differentiable():
    """create_graph through a query box: the recorded backward (split ops) runs on every position."""
    case = CASES["1d"]
    t = _inputs(case, torch.float64, True)
    rows = t["query"].detach()[:, 4:13].clone().requires_grad_()
    out, _ = _fused(case, t, rows, "reference", [4])
    (grad,) = torch.autograd.grad(out.square().sum(), rows, create_graph=True)
    grad.square().sum().backward()
    assert t["key"].grad is not None and torch.isfinite(t["key"].grad).all()
    torch.autograd.gradcheck(lambda q: _fused(case, {**t, "rpb": None}, q, "reference", [4])[0].sum(),
                             (rows.detach().requires_grad_(),))


@pytest.mark.parametrize("start, rows, match", [([3], 18, "inside the key's positions"),
                                                ([-1], 5, "inside the key's positions")])
def test_a_query_box_outside_the_keys_is_refused(start, rows, match):
    case = CASES["1d"]
    t = _inputs(case, torch.float64, False)
    with pytest.raises(ValueError, match=match):
        _fused(case, t, torch.zeros(1, rows, 4, 8, dtype=torch.float64), "reference", start)
