"""Every kernel family gives the same bits under both emulator schedules.

The emulator has no race detector. What it has is two schedules
(``NA_RTC_EMULATOR_SCHEDULE``): a block's threads run lowest index first, or
highest first, so an unsynchronized shared-memory write and another thread's
read of it run in opposite orders under the two, and one of them reads the
wrong data (tests/test_emulator.py shows each form of race failing under one
schedule). The kernels have no atomics and a fixed order of summation, so a
race-free kernel gives identical bits under both; a kernel with a missing
barrier between pipeline stages, or a warpgroup reusing a stage another one
still reads, gives different bits, or fails, under one of them, even where
the default schedule hides it from the reference tests.

The cases are the ones that use the pipelines most: key boxes of many chunks
(every stage of the multi-stage loops reused, two warpgroups starting at
different chunks) for the tensor-core and wgmma kernels, and a few sweep
configurations for the SIMT fused and split kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_fused
import test_fused_bwd
import test_fused_tc
import test_fused_tc_bwd
import torch
from helpers import RecordingExecutor, make_inputs

import na_rtc
from na_rtc import config
from na_rtc.runtime.families import fused_wg

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")


def _bits(x) -> np.ndarray:
    if x is None:
        return np.zeros(0, np.uint8)
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous().view(torch.uint8).numpy().copy()
    return np.ascontiguousarray(x).view(np.uint8).copy()


def _under_both_schedules(monkeypatch, compute):
    """``compute()`` (returns (kernel names, results)) under each schedule; asserts the same kernels ran and
    gave the same bits, and returns the kernel names."""
    seen = {}
    for schedule in config.EMULATOR_SCHEDULES:
        monkeypatch.setenv("NA_RTC_EMULATOR_SCHEDULE", schedule)
        names, results = compute()
        seen[schedule] = (tuple(names), [_bits(r) for r in results])
    (names, first), (other_names, second) = seen.values()
    assert names == other_names
    for i, (a, b) in enumerate(zip(first, second)):
        differ = int(np.count_nonzero(a != b))
        assert differ == 0, f"result {i} of {names}: {differ} bytes differ between the forward and reverse schedules"
    return names


def _families(tc_cases, simt_cases):
    """(label, case, tensor cores, wgmma, wgmma warpgroups a block): the mma.sync and wgmma kernels (with one
    and two warpgroups a block) on the long boxes, the SIMT kernels on the sweep cases."""
    return ([(f"tc-{c}", c, True, False, None) for c in tc_cases]
            + [(f"wgmma{wg}-{c}", c, True, True, wg) for wg in (1, 2) for c in tc_cases]
            + [(f"simt-{c}", c, False, False, None) for c in simt_cases])


FORWARD_CASES = _families(test_fused_tc.LONG_BOXES, test_fused.CONFIGS[::6])
FORWARD_PREFIX = {(True, False): "na_fused_tc_fwd<", (True, True): "na_fused_wg_fwd<", (False, False): "na_fused_fwd<"}


@pytest.mark.parametrize("label, cfg, tensor_cores, wgmma, warpgroups", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_the_fused_forward_has_no_schedule_dependence(monkeypatch, label, cfg, tensor_cores, wgmma, warpgroups):
    if warpgroups:
        monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", str(warpgroups))

    def compute():
        run = RecordingExecutor()
        return run.names, test_fused_tc._run(cfg, tensor_cores=tensor_cores, executor=run, wgmma=wgmma)

    names = _under_both_schedules(monkeypatch, compute)
    assert names[0].startswith(FORWARD_PREFIX[tensor_cores, wgmma]), names


@pytest.mark.parametrize("chunk_keys", fused_wg.OTHER_CHUNK_KEYS)
@pytest.mark.parametrize("cfg", test_fused_tc.LONG_BOXES, ids=str)
def test_the_wgmma_forward_with_other_chunk_sizes_has_no_schedule_dependence(monkeypatch, cfg, chunk_keys):
    """NA_RTC_WGMMA_CHUNK_KEYS's forwards (the Q tile in a region of its own where it outgrows a stage)."""
    monkeypatch.setenv("NA_RTC_WGMMA_CHUNK_KEYS", str(chunk_keys))

    def compute():
        run = RecordingExecutor()
        return run.names, test_fused_tc._run(cfg, executor=run, wgmma=True)

    names = _under_both_schedules(monkeypatch, compute)
    assert names[0].startswith("na_fused_wg_fwd<") and f", {chunk_keys}, " in names[0], names


BACKWARD_CASES = _families(test_fused_tc_bwd.LONG_BOX_CASES, test_fused_bwd.CASES[::8])
BACKWARD_PREFIX = {(True, False): "na_fused_tc_bwd_", (True, True): "na_fused_wg_bwd_", (False, False): "na_fused_bwd_"}


@pytest.mark.parametrize("label, case, tensor_cores, wgmma, warpgroups", BACKWARD_CASES,
                         ids=[c[0] for c in BACKWARD_CASES])
def test_the_fused_backward_has_no_schedule_dependence(monkeypatch, label, case, tensor_cores, wgmma, warpgroups):
    if warpgroups:
        monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", str(warpgroups))
    def compute():
        run = RecordingExecutor()
        grads = test_fused_bwd._run(case, run, tensor_cores=tensor_cores, wgmma=wgmma)[2]
        return run.names, grads

    names = _under_both_schedules(monkeypatch, compute)
    prefix = BACKWARD_PREFIX[tensor_cores, wgmma]
    assert any(name.startswith(prefix) for name in names), names


#: the split ops (qk with bias, av, and their backward) on the tiled kernels the dispatcher picks
SPLIT_CASES = [c for c in test_fused.CONFIGS if all(s == 1 for s in c.stride)][::5]


@pytest.mark.parametrize("cfg", SPLIT_CASES, ids=str)
def test_the_split_ops_have_no_schedule_dependence(monkeypatch, cfg):
    shape = cfg.shape
    slots = int(np.prod(cfg.kernel_size))
    dtype = getattr(torch, cfg.dtype)
    (q, k, v, g), _ = make_inputs(np.random.default_rng(0), shape, dtype, 4)
    (attn, dattn), _ = make_inputs(np.random.default_rng(1), (*shape[:-1], slots), dtype, 2)
    rpb = None
    if cfg.rpb and not any(cfg.causal):
        (rpb,), _ = make_inputs(np.random.default_rng(2), (cfg.heads, *(2 * n - 1 for n in cfg.kernel_size)),
                                torch.float32)
    window = dict(kernel_size=cfg.kernel_size, dilation=cfg.dilation, is_causal=cfg.causal, backend="emulator")
    fns = {1: (na_rtc.na1d_qk, na_rtc.na1d_av, na_rtc.na1d_qk_backward, na_rtc.na1d_av_backward),
           2: (na_rtc.na2d_qk, na_rtc.na2d_av, na_rtc.na2d_qk_backward, na_rtc.na2d_av_backward)}[cfg.ndim]
    qk, av, qk_backward, av_backward = fns

    def compute():
        return (), [qk(q, k, rpb=rpb, **window), av(attn, v, **window),
                    *qk_backward(dattn, q, k, rpb=rpb, **window), *av_backward(g, attn, v, **window)]

    _under_both_schedules(monkeypatch, compute)
