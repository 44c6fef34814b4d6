"""Grouped key/value heads (GQA/MQA) and a value head dim of its own in the kernels, through the emulator.

Every kernel family reads key/value head ``h // group`` for query head ``h`` (``HPK`` in ``NA_PROBLEM``), and
the kernels that write dK/dV run one block per key/value head that sums the query heads of its group inside
the kernel; the fused kernels take the value's head dim (``DV``) apart from the query's and key's, within
the bucket of the larger. Here, against the float64 reference (itself held to the brute-force oracle in
test_gqa.py and test_reference.py):

* the fused forward (out, logsumexp) and backward (dq, dk, dv, drpb, with a logsumexp gradient) on the SIMT,
  mma.sync and wgmma kernels, 1D to 3D, ratios 1, 2 and 4 and MQA, value head dims below, equal to and
  above the query's (across buckets), stride, dilation, causal axes and rpb, query boxes of several chunks
  per head (the dK/dV kernels' stream crosses from one query head to the next);
* the composed split kernels (tiled and straightforward) and the split ops with their gradients;
* nothing K/V-sized is made: the launch plans take the inputs' own key and value, no array of the query's
  heads is allocated for them and nothing is repeated; determinism of the group sums.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import KernelCase, RecordingExecutor, assert_close, kernel_policy, make_inputs

import na_rtc
from na_rtc import _args, _arrays
from na_rtc.runtime import composed, emulated
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.policy import Policy

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")


Case = KernelCase


#: ratios 1, 2 and 4 and MQA over every rank; value head dims apart from the query's, smaller and larger (into
#: the next bucket: 16 -> 32, 32 -> 64); stride, dilation, causal axes and rpb; the long 1D box spans several
#: query chunks of the dK/dV kernels per head
CASES = [
    Case((37,), 4, 2, dict(kernel_size=7, stride=2, dilation=2), rpb=True, head_dim_v=32),
    Case((150,), 4, 1, dict(kernel_size=65, is_causal=True), head_dim=32),
    Case((9, 11), 4, 1, dict(kernel_size=(3, 5), dilation=(2, 1)), rpb=True, head_dim_v=8),
    Case((12, 10), 8, 2, dict(kernel_size=5, stride=(2, 1), is_causal=(True, False)), head_dim=32, head_dim_v=64),
    Case((8, 7), 2, 2, dict(kernel_size=3), rpb=True, head_dim=32, head_dim_v=16),
    Case((5, 6, 7), 4, 2, dict(kernel_size=(2, 3, 3), is_causal=(True, False, False)), head_dim_v=24),
    Case((6, 5, 8), 2, 1, dict(kernel_size=3, dilation=(1, 1, 2)), rpb=True),
]
#: path -> (policy switches, dtype, the kernel-name prefix of its forward and of its dK/dV kernel)
PATHS = {
    "simt": (dict(), "float32", "na_fused_fwd", "na_fused_bwd_dkdv"),
    "mma.sync": (dict(tensor_cores=True), "float16", "na_fused_tc_fwd", "na_fused_tc_bwd_dkdv"),
    "wgmma": (dict(tensor_cores=True, wgmma=True), "bfloat16", "na_fused_wg_fwd", "na_fused_wg_bwd_dkdv"),
}


def _inputs(case: Case, dtype: str, seed: int = 0):
    """(q, k, v, dOut, dLSE, rpb) in ``dtype`` (rpb float32) and their float64 copies."""
    rng = np.random.default_rng(seed)
    dv = case.head_dim_v or case.head_dim
    q_shape = (2, *case.spatial, case.heads, case.head_dim)
    kv_shape = (2, *case.spatial, case.heads_kv, case.head_dim)
    (q,), (q64,) = make_inputs(rng, q_shape, getattr(torch, dtype))
    (g,), (g64,) = make_inputs(rng, (*q_shape[:-1], dv), getattr(torch, dtype))
    (k,), (k64,) = make_inputs(rng, kv_shape, getattr(torch, dtype))
    (v,), (v64,) = make_inputs(rng, (*kv_shape[:-1], dv), getattr(torch, dtype))
    (dlse,), (dlse64,) = make_inputs(rng, q_shape[:-1], torch.float32)
    rpb = rpb64 = None
    if case.rpb:
        (rpb,), (rpb64,) = make_inputs(rng, (case.heads, *(2 * n - 1 for n in case.kernel_size)), torch.float32)
    lowered = (q, k, v, g, dlse, rpb)
    return lowered, tuple(None if a is None else torch.from_numpy(a) for a in (q64, k64, v64, g64, dlse64, rpb64))


def _problem(case: Case, q, k, v, rpb):
    window = case.window
    return _args.fused_problem(case.ndim, q, k, v, window["kernel_size"], window.get("stride", 1),
                               window.get("dilation", 1), window.get("is_causal", False), None, rpb)


def _reference(case: Case, q64, k64, v64, g64, dlse64, rpb64):
    """out, lse and (dq, dk, dv, drpb) of the float64 reference, for a loss with dOut and dLSE."""
    op = getattr(na_rtc, f"na{case.ndim}d")
    leaves = [None if x is None else x.clone().requires_grad_() for x in (q64, k64, v64, rpb64)]
    out, lse = op(*leaves[:3], **case.window, rpb=leaves[3], return_lse=True, backend="reference")
    torch.autograd.backward((out, lse), (g64, dlse64))
    return out.detach(), lse.detach(), tuple(None if x is None else x.grad for x in leaves)


def _check(case, dtype, got_out, got_lse, got_grads, ref):
    out64, lse64, grads64 = ref
    assert_close(got_out, out64, dtype, "forward", "out")
    assert_close(got_lse, lse64, dtype, "forward", "lse")
    for name, got, want in zip(("dq", "dk", "dv", "drpb"), got_grads, grads64):
        if want is None:
            assert got is None
            continue
        assert tuple(got.shape) == tuple(want.shape), name
        assert_close(got, want, dtype, "grad", name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_kernels_match_the_reference(case, path):
    """Forward and backward (with a logsumexp gradient) of one fused kernel family on grouped key/value heads."""
    switches, dtype, forward_kernel, dkdv_kernel = PATHS[path]
    (q, k, v, g, dlse, rpb), inputs64 = _inputs(case, dtype)
    problem = _problem(case, q, k, v, rpb)
    assert problem.group == case.heads // case.heads_kv and problem.v_dim == (case.head_dim_v or case.head_dim)
    run = RecordingExecutor()
    kernels = Dispatcher(run, kernel_policy(**switches))
    out, lse = kernels.forward(problem, q, k, v, composed.bias_in_accumulator(problem, rpb))
    grads = kernels.backward(problem, g, q, k, v, composed.bias_in_accumulator(problem, rpb), out, lse,
                             grad_lse=dlse)
    assert run.names[0].startswith(forward_kernel), run.names
    assert any(name.startswith(dkdv_kernel) for name in run.names), run.names
    _check(case, dtype, out, lse, grads, _reference(case, *inputs64))


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "straightforward"])
@pytest.mark.parametrize("case", [c for c in CASES if "stride" not in c.window], ids=str)
def test_composed_split_kernels_match_the_reference(case, tiled):
    """The fused op composed of the split kernels (the path without a fused kernel), float32."""
    (q, k, v, g, dlse, rpb), inputs64 = _inputs(case, "float32")
    problem = _problem(case, q, k, v, rpb)
    run = RecordingExecutor()
    kernels = Dispatcher(run, Policy.of(tiled=tiled))
    out, lse = composed.forward(kernels, problem, q, k, v, rpb)
    grads = composed.backward(kernels, problem, g, q, k, v, rpb, out, lse, dlse)
    inverse = "na_tiled_inv<" if tiled and case.ndim < 3 else "na_inv_fwd<"
    if tiled:
        assert any(name.startswith("na_tiled_inv<") for name in run.names), run.names
    else:
        assert any(name.startswith(inverse) for name in run.names) and not any("tiled" in n for n in run.names)
    _check(case, "float32", out, lse, grads, _reference(case, *inputs64))


@pytest.mark.parametrize("case", [c for c in CASES if "stride" not in c.window][::2], ids=str)
def test_split_ops_and_their_gradients(case):
    """na*_qk and na*_av on the emulator backend against the reference, values and gradients (float32)."""
    (q, k, v, _, _, rpb), _ = _inputs(case, "float32")
    qk, av = getattr(na_rtc, f"na{case.ndim}d_qk"), getattr(na_rtc, f"na{case.ndim}d_av")
    window = case.window
    results = {}
    for backend in ("emulator", "reference"):
        leaves = [None if x is None else x.double().clone().requires_grad_() if backend == "reference" else
                  x.clone().requires_grad_() for x in (q, k, v, rpb)]
        attn = qk(leaves[0], leaves[1], **window, rpb=leaves[3], backend=backend).softmax(-1)
        out = av(attn, leaves[2], **window, backend=backend)
        out.backward(torch.ones_like(out))
        results[backend] = (out.detach(), *(None if x is None else x.grad for x in leaves))
    for name, got, want in zip(("out", "dq", "dk", "dv", "drpb"), results["emulator"], results["reference"]):
        if want is None:
            continue
        assert tuple(got.shape) == tuple(want.shape), name
        assert_close(got, want, "float32", "grad" if name != "out" else "forward", name)


@pytest.mark.parametrize("path", ["simt", "mma.sync", "split"])
def test_nothing_key_value_sized_is_made(path, monkeypatch):
    """The launch plans take the inputs' own key and value; the only arrays of the query's shape made are out
    (forward) and dq (backward), dk and dv have the key/value heads, and nothing is repeated."""
    case = dataclasses.replace(CASES[2], head_dim_v=None)
    dtype = "float16" if path == "mma.sync" else "float32"
    (q, k, v, g, _, _), _ = _inputs(case, dtype)
    problem = _problem(case, q, k, v, None)
    allocated, repeats = [], []
    real_empty = _arrays.empty

    def empty(like, shape, dtype_name):
        allocated.append(tuple(shape))
        return real_empty(like, shape, dtype_name)

    def repeat(*args, **kwargs):
        repeats.append(args)
        raise AssertionError("key/value repeated")

    monkeypatch.setattr(_arrays, "empty", empty)
    monkeypatch.setattr(torch, "repeat_interleave", repeat)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", repeat)
    plans = []

    def run(plan):
        plans.append(plan)
        return emulated.run(plan)

    kernels = Dispatcher(run, Policy.of(tiled=True) if path == "split" else kernel_policy(tensor_cores=path != "simt"))
    fused = path != "split"
    out, lse = (kernels.forward(problem, q, k, v) if fused else composed.forward(kernels, problem, q, k, v))
    forward_allocations, allocated[:] = list(allocated), []
    dq, dk, dv, _ = (kernels.backward(problem, g, q, k, v, None, out, lse) if fused else
                     composed.backward(kernels, problem, g, q, k, v, None, out, lse))
    assert forward_allocations.count(problem.qkv_shape) == 1 and problem.kv_shape != problem.qkv_shape
    assert allocated.count(problem.qkv_shape) == 1 and allocated.count(problem.kv_shape) == 2
    assert dk.shape == dv.shape == k.shape and not repeats
    pointers = [arg.value for plan in plans for arg in plan.args if arg.kind == "ptr"]
    assert any(p is k for p in pointers) and any(p is v for p in pointers)


@pytest.mark.parametrize("path", ["simt", "wgmma"])
def test_group_sums_are_deterministic(path):
    """Two runs of the backward give the same bits: each key/value head sums its query heads in one order."""
    switches, dtype, _, _ = PATHS[path]
    case = CASES[6]
    (q, k, v, g, dlse, rpb), _ = _inputs(case, dtype)
    problem = _problem(case, q, k, v, rpb)
    kernels = Dispatcher(emulated.run, kernel_policy(**switches))
    bias = composed.bias_in_accumulator(problem, rpb)
    out, lse = kernels.forward(problem, q, k, v, bias)
    first = kernels.backward(problem, g, q, k, v, bias, out, lse, grad_lse=dlse)
    second = kernels.backward(problem, g, q, k, v, bias, out, lse, grad_lse=dlse)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
