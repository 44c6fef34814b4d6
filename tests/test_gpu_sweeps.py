"""GPU versions of the kernel sweeps: the configurations of test_fused,
test_fused_bwd, test_tiled and test_tiled_bwd (and the long key boxes of
test_fused_tc and test_fused_tc_bwd), run through the public API on
the ``cuda`` backend (so the dispatcher picks the same fused / tiled kernels
as in the emulator sweeps) against the float64 reference, with the tolerances
of docs/design/testing.md#tolerances; plus run-to-run determinism on the GPU.

Skipped without a usable GPU; ``make gpu-check`` runs them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import test_fused
import test_fused_bwd
import test_fused_tc
import test_fused_tc_bwd
import test_fused_wg
import test_tiled
import test_tiled_bwd
from helpers import assert_close, sweep_bias, sweep_inputs

import na_rtc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not na_rtc.backends.get("cuda").probe()[0], reason="no usable GPU")]


def _cuda(x):
    """A CUDA copy with the same strides (heads-first views stay heads-first views)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.asarray(x))
    return x.to("cuda")  # preserve_format keeps the strides of a dense view


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _ops(ndim):
    return {name: getattr(na_rtc, f"na{ndim}d{suffix}") for name, suffix in
            (("fused", ""), ("bwd", "_backward"), ("qk", "_qk"), ("av", "_av"), ("qk_bwd", "_qk_backward"),
             ("av_bwd", "_av_backward"))}


@pytest.mark.parametrize("cfg", test_fused.CONFIGS + test_fused_tc.LONG_BOXES, ids=str)
def test_fused_forward_on_gpu(cfg):
    (q, k, v), (q64, k64, v64) = sweep_inputs(cfg, 3)
    bias, bias64 = sweep_bias(cfg)
    out, lse = _ops(cfg.ndim)["fused"](*map(_cuda, (q, k, v)), cfg.kernel_size, stride=cfg.stride,
                                       dilation=cfg.dilation, is_causal=cfg.causal, scale=cfg.scale,
                                       rpb=_cuda(bias), return_lse=True)
    want_out, want_lse = test_fused._reference(cfg, q64, k64, v64, bias64)
    assert out.is_cuda and out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(_cpu(out), want_out, cfg.dtype, "forward", "out")
    assert_close(_cpu(lse), want_lse, cfg.dtype, "forward", "lse")


WGMMA_BACKWARD_RUNS = ([(c, None) for c in test_fused_tc_bwd.CASES + test_fused_tc_bwd.LONG_BOX_CASES]
                       + [(c, 1) for c in test_fused_tc_bwd.LONG_BOX_CASES])


@pytest.mark.parametrize("case, warpgroups", WGMMA_BACKWARD_RUNS,
                         ids=lambda x: "table" if x is None else f"{x}wg" if isinstance(x, int) else str(x))
def test_wgmma_backward_on_gpu(case, warpgroups, monkeypatch):
    """The backward through the public API with NA_RTC_WGMMA=1 (the wgmma forward, dq and dK/dV) on sm_90
    GPUs, with the table's warpgroups a block and (long boxes) with one."""
    from na_rtc.runtime import cuda

    if cuda.arch_of("cuda") != 90:
        pytest.skip("the wgmma kernels are built for sm_90 GPUs only")
    monkeypatch.setenv("NA_RTC_WGMMA", "1")
    if warpgroups is not None:
        monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", str(warpgroups))
    test_fused_backward_on_gpu(case)


# (config, settings): the table's blocks on the whole sweep; one warpgroup a block (the bench's
# fused_wgmma_1wg) and every other chunk size built (fused_wgmma_kc32) on the long boxes
WGMMA_FORWARD_RUNS = ([(c, "table") for c in test_fused_tc.CONFIGS + test_fused_tc.LONG_BOXES]
                      + [(c, setting) for setting in test_fused_wg.BLOCK_SETTINGS if setting != "table"
                         for c in test_fused_tc.LONG_BOXES])


@pytest.mark.parametrize("cfg, setting", WGMMA_FORWARD_RUNS, ids=str)
def test_wgmma_forward_on_gpu(cfg, setting, monkeypatch):
    """The Hopper forward (NA_RTC_WGMMA=1's kernel) on the fp16/bf16 sweep and on key boxes of many chunks,
    on sm_90 GPUs."""
    from na_rtc.runtime import cuda
    from na_rtc.runtime.dispatch import Dispatcher
    from na_rtc.runtime.policy import Policy, Settings

    if cuda.arch_of("cuda") != 90:
        pytest.skip("the wgmma forward is built for sm_90 GPUs only")
    test_fused_wg.use_block_setting(monkeypatch, setting)
    (q, k, v), (q64, k64, v64) = sweep_inputs(cfg, 3)
    bias, bias64 = sweep_bias(cfg)
    q, k, v, bias = map(_cuda, (q, k, v, bias))
    problem = test_fused._problem(cfg, q, k, v, bias)
    names = []

    def run(plan):
        names.append(plan.kernel.name)
        cuda.run(plan)

    policy = Policy("cuda", 90, dataclasses.replace(Settings.read(), tensor_cores=True, wgmma=True, verify=False))
    out, lse = Dispatcher(run, policy).forward(problem, q, k, v, bias)
    assert names and names[0].startswith("na_fused_wg_fwd<")
    want_out, want_lse = test_fused._reference(cfg, q64, k64, v64, bias64)
    assert_close(_cpu(out), want_out, cfg.dtype, "forward", "out")
    assert_close(_cpu(lse), want_lse, cfg.dtype, "forward", "lse")


@pytest.mark.parametrize("case", test_fused_bwd.CASES + test_fused_tc_bwd.LONG_BOX_CASES, ids=str)
def test_fused_backward_on_gpu(case):
    (q, k, v, g, rpb), (q64, k64, v64, g64, rpb64) = test_fused_bwd._inputs(case)
    window = test_fused_bwd._window(case)
    got = _ops(case.ndim)["bwd"](*map(_cuda, (g, q, k, v)), **window, rpb=_cuda(rpb))
    want = _ops(case.ndim)["bwd"](g64, q64, k64, v64, **window, rpb=rpb64, backend="reference")
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want):
        if b is None:
            assert a is None, name
        else:
            assert a.is_cuda, name
            assert_close(_cpu(a), b, case.dtype, "grad", name)


@pytest.mark.parametrize("cfg", test_tiled.CONFIGS, ids=str)
def test_split_forward_on_gpu(cfg):
    ops = _ops(cfg.ndim)
    (q, k, v), (q64, k64, v64) = sweep_inputs(cfg, 3)
    bias, bias64 = sweep_bias(cfg)
    window = dict(dilation=cfg.dilation, is_causal=cfg.causal)
    attn = ops["qk"](*map(_cuda, (q, k)), cfg.kernel_size, rpb=_cuda(bias), **window)
    want = ops["qk"](q64, k64, cfg.kernel_size, rpb=bias64, **window, backend="reference")
    assert_close(_cpu(attn), want, cfg.dtype, "forward", "attn")  # -inf in causal slots on both sides
    slots = math.prod(cfg.kernel_size)
    (w,), (w64,) = sweep_inputs(cfg, 1, (*cfg.shape[:-1], slots), seed=1)
    out = ops["av"](_cuda(w), _cuda(v), cfg.kernel_size, **window)
    assert_close(_cpu(out), ops["av"](w64, v64, cfg.kernel_size, **window, backend="reference"), cfg.dtype,
                 "forward", "av")


@pytest.mark.parametrize("case", test_tiled_bwd.CASES, ids=str)
def test_split_backward_on_gpu(case):
    ops = _ops(case.ndim)
    shape = (case.batch, *case.spatial, case.heads, case.head_dim)
    slots = math.prod(case.kernel_size)
    (q, k, v, g), (q64, k64, v64, g64) = test_tiled_bwd._arrays(case, shape, 4, seed=0)
    (w, gw), (w64, gw64) = test_tiled_bwd._arrays(case, (*shape[:-1], slots), 2, seed=1)
    rpb = rpb64 = None
    if case.rpb:
        rpb64 = np.random.default_rng(2).standard_normal((case.heads, *(2 * n - 1 for n in case.kernel_size)))
        rpb = rpb64.astype(np.float32)
    window = dict(dilation=case.dilation, is_causal=case.causal)
    got = ops["qk_bwd"](*map(_cuda, (gw, q, k)), case.kernel_size, rpb=_cuda(rpb), **window)
    want = ops["qk_bwd"](gw64, q64, k64, case.kernel_size, rpb=rpb64, **window, backend="reference")
    got += ops["av_bwd"](*map(_cuda, (g, w, v)), case.kernel_size, **window)
    want += ops["av_bwd"](g64, w64, v64, case.kernel_size, **window, backend="reference")
    for name, a, b in zip(("dq", "dk", "drpb", "dattn", "dv"), got, want):
        if b is None:
            assert a is None, name
        else:
            assert_close(_cpu(a), b, case.dtype, "grad", name)


def test_gpu_runs_are_bitwise_deterministic():
    case = next(c for c in test_fused_bwd.CASES if c.rpb and c.ndim == 2)
    (q, k, v, g, rpb), _ = test_fused_bwd._inputs(case)
    args = [_cuda(x) for x in (g, q, k, v)]
    runs = [_ops(case.ndim)["bwd"](*args, **test_fused_bwd._window(case), rpb=_cuda(rpb)) for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
