"""The tensor-core fused backward (``cuda_src/na_fused_tc_bwd.cu``) through the emulator.

* the fp16/bf16 cases of the fused-backward sweep (tests/test_fused_bwd.py: 1D
  and 2D, kernels up to 67, stride, dilation, every causal combination, rpb,
  head dims up to 128, heads-first views, batch and heads > 1) against the
  float64 reference: dq, dk, dv, drpb within the
  tolerances of docs/design/testing.md#tolerances, from the reference's out and lse; plus LONG_BOX_CASES, boxes
  of many chunks for every (ndim, head dim);
* the tensor-core and SIMT backward agree;
* dispatch (tensor cores where the policy allows and they cover the problem)
  and run-to-run determinism, bias gradients included.
"""

from __future__ import annotations

import pytest
import torch
import test_fused_bwd
from helpers import assert_close, RecordingExecutor

import na_rtc
from na_rtc.runtime import emulated
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused_tc
from na_rtc.runtime.policy import Policy

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")

CASES = [c for c in test_fused_bwd.CASES if c.dtype in fused_tc.DTYPES and c.head_dim <= 128]


#: key boxes (dq) and query boxes (dK/dV) of many chunks for every (ndim, head-dim bucket), beyond the random
#: sweep's small ones: every stage reused many times, and in 1D blocks whose two warpgroups' chunk ranges differ
LONG_BOX_CASES = [
    test_fused_bwd.Case((400,), (129,), (1,), (1,), (False,), 32, "float16", rpb=True),
    test_fused_bwd.Case((330,), (200,), (1,), (1,), (True,), 64, "bfloat16"),
    test_fused_bwd.Case((300,), (191,), (1,), (1,), (False,), 128, "bfloat16", rpb=True),
    test_fused_bwd.Case((26, 20), (11, 9), (1, 1), (1, 1), (False, False), 32, "bfloat16"),
    test_fused_bwd.Case((26, 20), (11, 9), (1, 1), (1, 1), (False, False), 64, "float16", rpb=True),
    test_fused_bwd.Case((30, 22), (13, 13), (1, 1), (1, 1), (True, False), 128, "float16"),
]


def test_the_sweep_covers_both_dtypes_every_bucket_bias_and_causal():
    assert {(c.ndim, fused_tc.head_dim_bucket(c.head_dim), c.dtype) for c in CASES} == {
        (ndim, hd, dtype) for ndim in (1, 2) for hd in fused_tc.HEAD_DIMS for dtype in fused_tc.DTYPES}
    assert any(c.rpb for c in CASES) and any(any(c.causal) for c in CASES)
    assert any(s > 1 for c in CASES for s in c.stride)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tensor_core_backward_matches_reference(case):
    check_backward(case, "na_fused_tc_bwd_dq<")


def check_backward(case, dq_kernel, wgmma=False, dkdv_kernel="na_fused_tc_bwd_dkdv<"):
    """The tensor-core backward of ``case`` (dq and dK/dV on kernels named ``dq_kernel...`` and
    ``dkdv_kernel...``) against the reference."""
    run = RecordingExecutor()
    problem, kernels, (dq, dk, dv, drpb), (q64, k64, v64, g64, rpb64) = test_fused_bwd._run(
        case, run, tensor_cores=True, wgmma=wgmma)
    assert any(n.startswith(dq_kernel) for n in run.names)
    assert any(n.startswith(dkdv_kernel) for n in run.names)
    assert tuple(run.names) == kernels.choose("backward", problem).kernels
    bwd = na_rtc.na1d_backward if case.ndim == 1 else na_rtc.na2d_backward
    ref = bwd(g64, q64, k64, v64, **test_fused_bwd._window(case), rpb=rpb64, backend="reference")
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert got.dtype == test_fused_bwd.TORCH_DTYPES[case.dtype] and tuple(got.shape) == case.shape
        assert_close(got, want, case.dtype, "grad", name)
    if case.rpb:
        assert_close(drpb, ref[3], case.dtype, "grad", "drpb")
    else:
        assert drpb is None


@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_tensor_core_and_simt_backward_agree(case):
    tc = test_fused_bwd._run(case, tensor_cores=True)[2]
    simt = test_fused_bwd._run(case)[2]
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), tc, simt):
        if b is None:
            assert a is None
        else:
            assert_close(a, b.double(), case.dtype, "grad", name)


def test_tensor_core_backward_is_deterministic():
    case = next(c for c in CASES if c.rpb and c.ndim == 2)
    first = test_fused_bwd._run(case, tensor_cores=True)[2]
    second = test_fused_bwd._run(case, tensor_cores=True)[2]
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_dispatch_prefers_tensor_cores_where_allowed():
    q = torch.zeros(1, 40, 2, 64, dtype=torch.bfloat16)
    problem = na_rtc._args.fused_problem(1, q, q, q, 7, 2, 1, False, None, None)
    tensor_cores, simt = Dispatcher(emulated.run, Policy.of(True)), Dispatcher(emulated.run, Policy.of())
    assert tensor_cores.choose("backward", problem).kernels[1:] == (
        "na_fused_tc_bwd_dq<bf16_t, 64, 64, 1, 32>", "na_fused_tc_bwd_dkdv<bf16_t, 64, 64, 1, 32>")
    assert simt.choose("backward", problem).kernels[1].startswith("na_fused_bwd_dq<")
    q32 = q.float()
    problem32 = na_rtc._args.fused_problem(1, q32, q32, q32, 7, 2, 1, False, None, None)
    assert tensor_cores.choose("backward", problem32).kernels[1].startswith("na_fused_bwd_dq<float")


@pytest.mark.parametrize("case", LONG_BOX_CASES, ids=str)
def test_tensor_core_backward_over_long_boxes(case):
    check_backward(case, "na_fused_tc_bwd_dq<")
