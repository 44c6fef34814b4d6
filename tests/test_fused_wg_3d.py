"""The Hopper wgmma fused kernels in 3D (families ``fused_wg_3d``, ``fused_wg_bwd_3d``: the RANK 3
instantiations of ``cuda_src/na_fused_wg.cu`` and ``na_fused_wg_bwd.cu``) through the emulator.

* the forward (out, lse) over the 3D sweep of the mma.sync kernels
  (tests/test_fused_tc_3d.py: odd and even kernels, dilation, stride and
  causal per axis, rpb, every head-dim bucket with full and partial head dims,
  fp16 and bf16, heads-first views, sizes that are not tile multiples) against
  the float64 reference, with the table's blocks (two warpgroups, 4 x 8 x 4
  queries); the long key boxes with the table's blocks, one warpgroup
  (2 x 8 x 4) and every other chunk size built, where the second warpgroup
  starts past chunk 0;
* it agrees with the mma.sync forward; determinism; no dependence on the
  emulator's schedule; the reach of a NaN key or value; offsets past 2^31;
* the backward (dq, dk, dv, drpb) over the 3D backward sweep and its long
  boxes, with two warpgroups and with one;
* the dispatch: with NA_RTC_WGMMA=1 a 3D fp16/bf16 call runs the 3D twins,
  and what the twins do not cover goes to the mma.sync kernels.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import test_fused
import test_fused_tc_3d as tc3d
import test_scale
import test_schedules
from helpers import RecordingExecutor, assert_close, kernel_policy, sweep_bias, sweep_inputs

import na_rtc
from na_rtc.runtime import emulated, registry
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused_wg, fused_wg_bwd
from na_rtc.runtime.policy import Policy

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")

CONFIGS, CASES = tc3d.CONFIGS, tc3d.CASES
Config, Case = tc3d.Config, tc3d.Case
#: the mma.sync kernels' long key boxes, and one whose second warpgroup's keys start chunks past the box's first
#: (a 3-key window along x: its x-planes 2 and 3 see from box plane 1 on)
LONG_BOXES = tc3d.LONG_BOXES + [tc3d._long_box((9, 14, 16), (3, 9, 11), 64, "bfloat16", rpb=True)]


def _bucket(c) -> int:
    return fused_wg.head_dim_bucket(c.head_dim)


def forward(cfg, executor=emulated.run, arrays=None):
    """(out, lse) of the fused forward with the wgmma path on (the environment's warpgroups and chunks)."""
    return tc3d.forward(cfg, executor, arrays, kernel_policy(tensor_cores=True, wgmma=True))


def backward(case, arrays=None):
    """(kernel names, (dq, dk, dv, drpb), float64 inputs) of the fused backward with the wgmma path on."""
    run = RecordingExecutor()
    _, names, grads, inputs64 = tc3d.backward(case, arrays=arrays, run=run,
                                              dispatcher=Dispatcher(run, kernel_policy(True, True)))
    return names, grads, inputs64


def test_every_3d_instantiation_is_in_the_sweeps():
    every = {(hd, dtype) for hd in fused_wg.HEAD_DIMS for dtype in fused_wg.DTYPES}
    assert {(_bucket(c), c.dtype) for c in CONFIGS} == every
    assert {(_bucket(c), c.dtype) for c in CASES} == every
    assert fused_wg.WARPGROUPS[3] == 2 and fused_wg.BLOCK_TILES[3, 2] == (4, 8, 4)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_forward_matches_reference(cfg):
    run = RecordingExecutor()
    out, lse = forward(cfg, run)
    assert run.names == [fused_wg.kernel_name_of(_bucket(cfg), cfg.dtype, 3)]
    tc3d.assert_forward_matches_reference(cfg, out, lse)


@pytest.mark.parametrize("cfg", CONFIGS[::4], ids=str)
def test_wgmma_and_mma_sync_forwards_agree(cfg):
    wg_out, wg_lse = forward(cfg)
    tc_out, tc_lse = tc3d.forward(cfg)
    assert_close(wg_out, tc_out.double(), cfg.dtype, "forward", "out")
    assert_close(wg_lse, tc_lse.double(), cfg.dtype, "forward", "lse")


#: the settings the long boxes run under: the table's blocks, one warpgroup, every other chunk size built
BLOCK_SETTINGS = {"table": {}, "1wg": {"NA_RTC_WGMMA_WARPGROUPS": "1"},
                  **{f"kc{kc}": {"NA_RTC_WGMMA_CHUNK_KEYS": str(kc)} for kc in fused_wg.OTHER_CHUNK_KEYS}}


def _use(monkeypatch, setting: str):
    for name, value in BLOCK_SETTINGS[setting].items():
        monkeypatch.setenv(name, value)


def _warpgroup_chunks(cfg, warpgroups: int) -> list[tuple[int, int]]:
    """[first, last] chunk of each warpgroup of the first block (stride 1, one dilation group, non-causal x:
    the box is the tile plus k - 1 per axis, clipped; a warpgroup's keys are its x-planes' windows)."""
    tile = fused_wg.BLOCK_TILES[3, warpgroups]
    extent = [min(t + k - 1, n) for t, k, n in zip(tile, cfg.kernel_size, cfg.spatial)]
    plane = extent[1] * extent[2]
    kc = fused_wg.block_chunk_keys(_bucket(cfg), 3, warpgroups)
    planes, (n, k) = tile[0] // warpgroups, (cfg.spatial[0], cfg.kernel_size[0])
    chunks = []
    for j in range(warpgroups):
        first_x, last_x = j * planes, j * planes + planes - 1
        start = min(max(first_x - k // 2, 0), n - k)
        end = min(max(last_x - k // 2, 0), n - k) + k
        chunks.append((start * plane // kc, (end * plane - 1) // kc))
    return chunks


def test_the_long_boxes_reuse_stages_and_the_second_warpgroup_starts_later():
    for cfg in LONG_BOXES:
        one, two = _warpgroup_chunks(cfg, 1), _warpgroup_chunks(cfg, 2)
        assert one[0][1] >= 3 and two[1][1] >= 3, (one, two)  # four chunks and more: every stage reused
    # the second warpgroup's first S is issued in the chunk before its first (where it multiplies nothing)
    assert any(_warpgroup_chunks(cfg, 2)[1][0] > 0 for cfg in LONG_BOXES)
    assert {_bucket(c) for c in LONG_BOXES} == set(fused_wg.HEAD_DIMS)


@pytest.mark.parametrize("setting", BLOCK_SETTINGS)
@pytest.mark.parametrize("cfg", LONG_BOXES, ids=str)
def test_forward_over_long_key_boxes(cfg, setting, monkeypatch):
    _use(monkeypatch, setting)
    run = RecordingExecutor()
    out, lse = forward(cfg, run)
    wg = 1 if setting == "1wg" else 2
    kc = fused_wg.block_chunk_keys(_bucket(cfg), 3, wg, kernel_policy(True, True))
    assert run.names == [fused_wg.kernel_name_of(_bucket(cfg), cfg.dtype, 3, wg, kc)]
    tc3d.assert_forward_matches_reference(cfg, out, lse)


def test_forward_is_deterministic():
    cfg = next(c for c in CONFIGS if c.rpb)
    tc3d.assert_same_bits(forward(cfg), forward(cfg))


@pytest.mark.parametrize("cfg", LONG_BOXES[-1:], ids=str)
def test_forward_has_no_schedule_dependence(cfg, monkeypatch):
    def compute():
        run = RecordingExecutor()
        return run.names, forward(cfg, run)

    names = test_schedules._under_both_schedules(monkeypatch, compute)
    assert names[0].startswith("na_fused_wg_fwd<") and names[0].endswith(", 3, 4>"), names


@pytest.mark.parametrize("poisoned", ["key", "value"])
def test_nan_reach(poisoned):
    """A NaN key poisons exactly the queries that see it; a NaN value those and at most the other queries of
    their block tiles (0 * NaN in P V: a warpgroup multiplies every key of the chunks it takes)."""
    tc3d.check_nan_reach(poisoned, forward, fused_wg.BLOCK_TILES[3, fused_wg.WARPGROUPS[3]])


def test_offsets_past_2_to_the_31():
    """Batch 1 of every tensor starts past 2^31 elements: forward and backward reach it."""
    case = Case((5, 6, 7), (3, 3, 5), (1, 1, 1), (1, 1, 1), (False, False, False), 32, "float16", rpb=True,
                batch=2, heads=2)
    cfg = Config(case.spatial, case.kernel_size, case.dilation, case.causal, 2, 2, 32, True, False, "float16",
                 case.stride)
    keep, arrays = test_scale.sparse_inputs(4, case.shape, "float16")
    try:
        assert arrays[0].strides[0] // 2 > 2**31
        bias, bias64 = sweep_bias(cfg)
        run = RecordingExecutor()
        problem = test_fused._problem(cfg, *arrays[:3], bias.numpy())
        out, lse = Dispatcher(run, kernel_policy(True, True)).forward(problem, *arrays[:3], bias.numpy())
        assert run.names == [fused_wg.kernel_name_of(32, "float16", 3)]
        want = test_fused._reference(cfg, *(np.ascontiguousarray(a).astype(np.float64) for a in arrays[:3]), bias64)
        assert_close(out, want[0], cfg.dtype, "forward", "out")
        assert_close(lse, want[1], cfg.dtype, "forward", "lse")
        names, grads, inputs64 = backward(case, arrays=arrays)
        assert set(_wg_kernels(case)) <= set(names), names
        tc3d.assert_backward_matches_reference(case, grads, inputs64)
    finally:
        del arrays
        gc.collect()
        keep.close()


# ---------------------------------------------------------------- backward


def _wg_kernels(case, warpgroups=None) -> tuple[str, str]:
    hd = _bucket(case)
    return (fused_wg_bwd.dq_name_of(hd, case.dtype, 3, warpgroups),
            fused_wg_bwd.dkdv_name_of(hd, case.dtype, 3, warpgroups))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(case):
    names, grads, inputs64 = backward(case)
    assert set(_wg_kernels(case)) <= set(names), names
    tc3d.assert_backward_matches_reference(case, grads, inputs64)


#: one warpgroup on every other case of the sweep (each head-dim bucket and dtype: asserted below)
ONE_WARPGROUP_CASES = CASES[::2]


def test_the_one_warpgroup_backward_covers_every_instantiation():
    assert {(_bucket(c), c.dtype) for c in ONE_WARPGROUP_CASES} == {
        (hd, dtype) for hd in fused_wg.HEAD_DIMS for dtype in fused_wg.DTYPES}


@pytest.mark.parametrize("case", ONE_WARPGROUP_CASES + tc3d.LONG_BOX_CASES, ids=str)
def test_one_warpgroup_backward_matches_reference(case, monkeypatch):
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", "1")
    names, grads, inputs64 = backward(case)
    assert set(_wg_kernels(case, 1)) <= set(names), names
    tc3d.assert_backward_matches_reference(case, grads, inputs64)


@pytest.mark.parametrize("case", tc3d.LONG_BOX_CASES, ids=str)
def test_backward_over_long_boxes(case):
    names, grads, inputs64 = backward(case)
    assert set(_wg_kernels(case)) <= set(names), names
    tc3d.assert_backward_matches_reference(case, grads, inputs64)


@pytest.mark.parametrize("case", tc3d.LONG_BOX_CASES[:1], ids=str)
def test_backward_has_no_schedule_dependence(case, monkeypatch):
    def compute():
        names, grads, _ = backward(case)
        return names, grads

    names = test_schedules._under_both_schedules(monkeypatch, compute)
    assert set(_wg_kernels(case)) <= set(names), names


def test_backward_is_deterministic():
    case = next(c for c in CASES if c.rpb)
    tc3d.assert_same_bits(backward(case)[1], backward(case)[1])


def test_head_dim_128_takes_32_key_chunks_and_the_ss_dq():
    """At head dim 128 the 3D forward's chunks are 32 keys (64 spill) and dq reads Q and dOut from shared
    memory; every other 3D forward takes the 1D/2D table's chunks."""
    assert all(fused_wg.table_chunk_keys(hd, 3) == (32 if hd == 128 else fused_wg.CHUNK_KEYS[hd])
               for hd in fused_wg.HEAD_DIMS)
    assert fused_wg.kernel_name_of(128, "float16", 3) == "na_fused_wg_fwd<fp16_t, 128, 4, 8, 32, 0, 2, 3, 4>"
    assert fused_wg_bwd.dq_name_of(128, "bfloat16", 3) == "na_fused_wg_bwd_dq<bf16_t, 128, 4, 8, 32, 1, 2, 3, 4>"
    assert all(not name.startswith("na_fused_wg_fwd<fp16_t, 128, 4, 8, 64")
               for name in registry.get("fused_wg_3d").names)


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize("dtype, head_dim, expected", [
    ("float16", 64, "na_fused_wg_fwd<fp16_t, 64, 4, 8, 64, 0, 2, 3, 4>"),
    ("bfloat16", 100, "na_fused_wg_fwd<bf16_t, 128, 4, 8, 32, 0, 2, 3, 4>"),
])
def test_3d_calls_run_the_3d_twins(dtype, head_dim, expected):
    dispatcher = Dispatcher(emulated.run, kernel_policy(True, True))
    problem = tc3d._problem(dtype, head_dim)
    choice = dispatcher.choose("forward", problem)
    assert choice.path == "wgmma" and choice.kernels == (expected,)
    hd = fused_wg.head_dim_bucket(head_dim)
    backward_choice = dispatcher.choose("backward", problem)
    assert backward_choice.kernels[1:3] == (fused_wg_bwd.dq_name_of(hd, dtype, 3),
                                            fused_wg_bwd.dkdv_name_of(hd, dtype, 3))


def test_what_the_3d_twins_leave_to_the_mma_sync_kernels():
    """A last axis past the mma.sync kernels' limit fails the rule the wgmma twins require (and the mma.sync
    twin's own): the call goes to SIMT, each skip says why."""
    q = np.broadcast_to(np.zeros((), np.float16), (1, 6, 6, 2**16, 2, 32))
    problem = na_rtc._args.fused_problem(3, q, q, q, 3, 1, 1, False, None, None)
    choice = Dispatcher(emulated.run, Policy.of(tensor_cores=True, wgmma=True)).choose("forward", problem)
    skipped = dict(choice.skipped)
    assert choice.path == "simt"
    assert "a last axis of 65536 positions" in skipped["wgmma"] and "a last axis" in skipped["mma.sync"]


# ---------------------------------------------------------------- on a GPU (make gpu-check)


gpu = [pytest.mark.gpu, pytest.mark.skipif(not na_rtc.backends.get("cuda").probe()[0], reason="no usable GPU")]


@pytest.mark.parametrize("cfg", [pytest.param(c, marks=gpu, id=str(c)) for c in CONFIGS + LONG_BOXES])
def test_forward_on_gpu(cfg):
    names = []
    dispatcher = tc3d.gpu_dispatcher(names, wgmma=True)
    (q, k, v), _ = sweep_inputs(cfg, 3)
    bias, _ = sweep_bias(cfg)
    q, k, v, bias = tc3d._on_gpu(q, k, v, bias)
    out, lse = dispatcher.forward(test_fused._problem(cfg, q, k, v, bias), q, k, v, bias)
    assert names == [fused_wg.kernel_name_of(_bucket(cfg), cfg.dtype, 3)]
    tc3d.assert_forward_matches_reference(cfg, out.cpu(), lse.cpu())


@pytest.mark.parametrize("case", [pytest.param(c, marks=gpu, id=str(c)) for c in CASES + tc3d.LONG_BOX_CASES])
def test_backward_on_gpu(case):
    names = []
    dispatcher = tc3d.gpu_dispatcher(names, wgmma=True)
    _, _, grads, inputs64 = tc3d.backward(case, dispatcher=dispatcher, device="cuda")
    assert set(_wg_kernels(case)) <= set(names), names
    tc3d.assert_backward_matches_reference(case, [None if x is None else x.cpu() for x in grads], inputs64)

