"""The Hopper wgmma fused kernels (``cuda_src/na_fused_wg.cu``, ``na_fused_wg_bwd.cu``) through the emulator.

* the fp16/bf16 configurations of the fused sweep (the ones the mma.sync
  forward takes, tests/test_fused_tc.py) against the float64 reference:
  output and logsumexp within the tolerances of docs/design/testing.md#tolerances, and the
  long key boxes (four chunks and more: every stage reused, in 1D the
  second warpgroup starting past chunk 0), with one and two warpgroups;
* it agrees with the mma.sync forward on the same inputs;
* NaN reach: a key poisons exactly the queries that see it, a value at most
  its block's query tile;
* its backward kernels (``na_fused_wg_bwd_dq``, with Q and dOut from shared
  memory in 2D at head dim 128, and ``na_fused_wg_bwd_dkdv``) on the fp16/bf16 cases of the
  fused-backward sweep: every gradient against the float64 reference, the
  bias gradient included;
* two families: a forward loads only the forward's kernels;
* dispatch: only with NA_RTC_WGMMA=1, on sm_90 GPUs and in the emulator;
  forward and backward through the op table; NA_RTC_WGMMA_WARPGROUPS=1 and
  the kernels with one warpgroup per block (the table's have two: 128 queries
  or keys in 1D, a 16 x 8 tile in 2D); NA_RTC_WGMMA_CHUNK_KEYS=32 and the
  forward with chunks of 32 keys (the table's have 64).
"""

from __future__ import annotations

import math

import pytest
import torch
import test_fused
import test_fused_bwd
import test_fused_tc
import test_fused_tc_bwd
from helpers import assert_close, kernel_policy, RecordingExecutor

import na_rtc
from na_rtc.runtime import emulated, ops
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused_wg, fused_wg_bwd
from na_rtc.runtime.policy import Policy

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")

CONFIGS = test_fused_tc.CONFIGS


def _run(cfg, wgmma=True, executor=emulated.run):
    return test_fused_tc._run(cfg, executor=executor, wgmma=wgmma)


def test_every_instantiation_is_in_the_sweep():
    assert {(c.ndim, fused_wg.head_dim_bucket(c.head_dim), c.dtype) for c in CONFIGS} == {
        (ndim, hd, dtype) for ndim in (1, 2) for hd in fused_wg.HEAD_DIMS for dtype in fused_wg.DTYPES}


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_wgmma_forward_matches_reference(cfg):
    recorder = RecordingExecutor()
    out, lse = _run(cfg, executor=recorder)
    assert len(recorder.names) == 1 and recorder.names[0].startswith("na_fused_wg_fwd<")
    test_fused.assert_forward_matches_reference(cfg, out, lse)


@pytest.mark.parametrize("cfg", CONFIGS[::5], ids=str)
def test_wgmma_and_mma_sync_forwards_agree(cfg):
    wg_out, wg_lse = _run(cfg, wgmma=True)
    tc_out, tc_lse = _run(cfg, wgmma=False)
    assert_close(wg_out, tc_out.double(), cfg.dtype, "forward", "out")
    assert_close(wg_lse, tc_lse.double(), cfg.dtype, "forward", "lse")


LONG_BOXES = test_fused_tc.LONG_BOXES


def _box_chunks(cfg, warpgroups):
    """Chunks of KC keys in the first block's key box (stride 1, no dilation: the tile plus the kernel)."""
    tile = fused_wg.BLOCK_TILES[cfg.ndim, warpgroups]
    keys = math.prod(min(length, t + k - 1) for length, t, k in zip(cfg.spatial, tile, cfg.kernel_size))
    return -(-keys // fused_wg.CHUNK_KEYS[fused_wg.head_dim_bucket(cfg.head_dim)])


def test_the_long_boxes_reuse_stages_for_every_head_dim():
    assert all(_box_chunks(c, fused_wg.WARPGROUPS[c.ndim]) >= 4 for c in LONG_BOXES)
    assert {(c.ndim, fused_wg.head_dim_bucket(c.head_dim)) for c in LONG_BOXES} == {
        (ndim, hd) for ndim in (1, 2) for hd in fused_wg.HEAD_DIMS}


#: the settings the long boxes run under: the table's blocks, blocks of one warpgroup, and every other chunk
#: size built (32 keys: more chunks a box, and with two warpgroups a Q tile of its own in shared memory)
BLOCK_SETTINGS = {"table": {}, "1wg": {"NA_RTC_WGMMA_WARPGROUPS": "1"},
                  **{f"kc{kc}": {"NA_RTC_WGMMA_CHUNK_KEYS": str(kc)} for kc in fused_wg.OTHER_CHUNK_KEYS}}
LONG_BOX_RUNS = [(c, setting) for setting in BLOCK_SETTINGS for c in LONG_BOXES]


def use_block_setting(monkeypatch, setting: str):
    """The environment of BLOCK_SETTINGS[setting], for the rest of the test."""
    for name, value in BLOCK_SETTINGS[setting].items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("cfg, setting", LONG_BOX_RUNS, ids=str)
def test_wgmma_forward_over_long_key_boxes(cfg, setting, monkeypatch):
    """Chunks past the third reuse stages while the next chunk's S is in flight; with two warpgroups the
    second one starts past chunk 0 (its first S issued in the chunk before, where it multiplies nothing)."""
    use_block_setting(monkeypatch, setting)
    out, lse = _run(cfg)
    test_fused.assert_forward_matches_reference(cfg, out, lse)


def _instantiation(c):
    return c.ndim, fused_wg.head_dim_bucket(c.head_dim), c.dtype


ONE_WARPGROUP = test_fused_tc.every_nth_covering(CONFIGS, 2, _instantiation)
ONE_WARPGROUP_BACKWARD = test_fused_tc.every_nth_covering(test_fused_tc_bwd.CASES, 2, _instantiation)
#: the one-warpgroup tile of each ndim
ONE_WARPGROUP_TILES = {1: (64, 1), 2: (8, 8)}


def test_the_one_warpgroup_sweeps_cover_every_instantiation():
    every = {(ndim, hd, dtype) for ndim in (1, 2) for hd in fused_wg.HEAD_DIMS for dtype in fused_wg.DTYPES}
    assert {_instantiation(c) for c in ONE_WARPGROUP} == every
    assert {_instantiation(c) for c in ONE_WARPGROUP_BACKWARD} == every
    assert all(fused_wg.BLOCK_TILES[ndim, 1] == tile for ndim, tile in ONE_WARPGROUP_TILES.items())
    assert all(fused_wg.WARPGROUPS[ndim] == 2 for ndim in (1, 2))  # else these sweeps test the table's blocks


@pytest.mark.parametrize("cfg", ONE_WARPGROUP, ids=str)
def test_one_warpgroup_forward_matches_reference(cfg, monkeypatch):
    """NA_RTC_WGMMA_WARPGROUPS=1: the forward with one warpgroup per block of 64 queries (the table's has
    two per 128), for the GPU comparison of the two."""
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", "1")
    recorder = RecordingExecutor()
    out, lse = _run(cfg, executor=recorder)
    hd = fused_wg.head_dim_bucket(cfg.head_dim)
    assert recorder.names[0] == fused_wg.kernel_name_of(hd, cfg.dtype, cfg.ndim, warpgroups=1)
    tx, ty = ONE_WARPGROUP_TILES[cfg.ndim]
    assert recorder.names[0].startswith(f"na_fused_wg_fwd<{fused_wg.CTYPES[cfg.dtype]}, {hd}, {tx}, {ty}, ")
    test_fused.assert_forward_matches_reference(cfg, out, lse)


@pytest.mark.parametrize("chunk_keys", fused_wg.OTHER_CHUNK_KEYS)
@pytest.mark.parametrize("cfg", ONE_WARPGROUP, ids=str)
def test_forward_with_other_chunk_sizes_matches_reference(cfg, chunk_keys, monkeypatch):
    """NA_RTC_WGMMA_CHUNK_KEYS: the forward with another chunk size than the table's (for the GPU comparison),
    on half the sweep: dilation, stride, causal windows and bias at every (ndim, head dim, dtype)."""
    monkeypatch.setenv("NA_RTC_WGMMA_CHUNK_KEYS", str(chunk_keys))
    recorder = RecordingExecutor()
    out, lse = _run(cfg, executor=recorder)
    hd = fused_wg.head_dim_bucket(cfg.head_dim)
    assert recorder.names[0] == fused_wg.kernel_name_of(hd, cfg.dtype, cfg.ndim, chunk_keys=chunk_keys)
    assert f", {chunk_keys}, " in recorder.names[0] and chunk_keys != fused_wg.CHUNK_KEYS[hd]
    test_fused.assert_forward_matches_reference(cfg, out, lse)


@pytest.mark.parametrize("case", ONE_WARPGROUP_BACKWARD, ids=str)
def test_one_warpgroup_backward_matches_reference(case, monkeypatch):
    """NA_RTC_WGMMA_WARPGROUPS=1: the dq and dK/dV kernels with one warpgroup per block of 64 queries or
    keys (the table's have two per 128)."""
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", "1")
    hd = fused_wg.head_dim_bucket(case.head_dim)
    dkdv = fused_wg_bwd.dkdv_name_of(hd, case.dtype, case.ndim, warpgroups=1)
    dq = fused_wg_bwd.dq_name_of(hd, case.dtype, case.ndim, warpgroups=1)
    tile = ", {}, {}, ".format(*ONE_WARPGROUP_TILES[case.ndim])
    assert dkdv.endswith(", 1>") and tile in dkdv and dq.endswith(", 1>") and tile in dq
    test_fused_tc_bwd.check_backward(case, dq, wgmma=True, dkdv_kernel=dkdv)


def _forward_kernel(problem):
    """The forward kernel under the environment's settings (as a call reads them), wgmma switched on."""
    return Dispatcher(None, kernel_policy(True, True)).choose("forward", problem).kernels[0]


def test_the_warpgroups_setting(monkeypatch):
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", "1")
    assert _forward_kernel(_problem(1, "float16", 64)) == "na_fused_wg_fwd<fp16_t, 64, 64, 1, 64, 0, 1>"
    assert _forward_kernel(_problem(2, "float16", 64)) == "na_fused_wg_fwd<fp16_t, 64, 8, 8, 64, 0, 1>"
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", "2")
    assert _forward_kernel(_problem(2, "float16", 64)) == "na_fused_wg_fwd<fp16_t, 64, 16, 8, 64, 0, 2>"
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", "4")
    with pytest.raises(ValueError, match="NA_RTC_WGMMA_WARPGROUPS must be 1 or 2"):
        _forward_kernel(_problem(1, "float16", 64))


def test_the_chunk_keys_setting(monkeypatch):
    """NA_RTC_WGMMA_CHUNK_KEYS picks a built chunk size of the forward (the table's warpgroups only: with one
    warpgroup it keeps the table's); the backward kernels keep theirs."""
    monkeypatch.setenv("NA_RTC_WGMMA_CHUNK_KEYS", "32")
    assert _forward_kernel(_problem(1, "bfloat16", 128)) == "na_fused_wg_fwd<bf16_t, 128, 128, 1, 32, 0, 2>"
    assert _forward_kernel(_problem(2, "float16", 64)) == "na_fused_wg_fwd<fp16_t, 64, 16, 8, 32, 0, 2>"
    backward = Dispatcher(None, kernel_policy(True, True)).choose("backward", _problem(2, "float16", 64))
    assert backward.kernels[1] == fused_wg_bwd.dq_name_of(64, "float16", 2) == (
        "na_fused_wg_bwd_dq<fp16_t, 64, 16, 8, 32, 0, 2>")
    # 16 KiB of Q beside three stages of 32-key chunks (it does not fit a stage)
    assert fused_wg.shared_bytes(64, "float16", 2, chunk_keys=32) == (128 * 64 + 6 * 32 * 64) * 2
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", "1")
    assert _forward_kernel(_problem(2, "float16", 64)) == "na_fused_wg_fwd<fp16_t, 64, 8, 8, 64, 0, 1>"
    monkeypatch.delenv("NA_RTC_WGMMA_WARPGROUPS")
    monkeypatch.setenv("NA_RTC_WGMMA_CHUNK_KEYS", "64")
    assert _forward_kernel(_problem(2, "float16", 64)) == "na_fused_wg_fwd<fp16_t, 64, 16, 8, 64, 0, 2>"
    assert fused_wg.shared_bytes(64, "float16", 2, chunk_keys=64) == 6 * 64 * 64 * 2  # Q borrows stage 2
    monkeypatch.setenv("NA_RTC_WGMMA_CHUNK_KEYS", "128")
    with pytest.raises(ValueError, match="NA_RTC_WGMMA_CHUNK_KEYS must be 32 or 64"):
        _forward_kernel(_problem(1, "float16", 64))


@pytest.mark.parametrize("poisoned", ["key", "value"])
def test_nan_reach(poisoned):
    """A NaN key poisons exactly the queries that see it; a NaN value those and at most the other queries
    of its block's tile, 128 in 1D (0 * NaN in P V: every warp of a warpgroup multiplies every key of the
    chunks it computes)."""
    test_fused_tc.check_nan_reach(poisoned, fused_wg.BLOCK_TILES[1, fused_wg.WARPGROUPS[1]][0], wgmma=True)


@pytest.mark.parametrize("case", test_fused_tc_bwd.CASES, ids=str)  # every (ndim, head dim, dtype): asserted there
def test_wgmma_backward_matches_reference(case):
    hd = fused_wg.head_dim_bucket(case.head_dim)
    test_fused_tc_bwd.check_backward(case, fused_wg_bwd.dq_name_of(hd, case.dtype, case.ndim), wgmma=True,
                                     dkdv_kernel=fused_wg_bwd.dkdv_name_of(hd, case.dtype, case.ndim))


def test_dq_reads_q_and_dout_from_shared_memory_in_2d_at_head_dim_128():
    names = {(ndim, hd): fused_wg_bwd.dq_name_of(hd, "bfloat16", ndim) for ndim in (1, 2) for hd in fused_wg.HEAD_DIMS}
    assert {key for key, name in names.items() if name.split(", ")[-2] == "1"} == {(2, 128)}  # QS


def _problem(ndim, dtype, head_dim):
    q = torch.empty((1, *(20,) * ndim, 2, head_dim), dtype=getattr(torch, dtype))
    return na_rtc._args.fused_problem(ndim, q, q, q, 5, 1, 1, False, None, None)


@pytest.mark.parametrize("ndim, dtype, head_dim, wgmma, expected", [
    (1, "bfloat16", 128, True, "na_fused_wg_fwd<bf16_t, 128, 128, 1, 64, 1, 2>"),
    (2, "float16", 40, True, "na_fused_wg_fwd<fp16_t, 64, 16, 8, 64, 0, 2>"),
    (2, "float16", 64, False, "na_fused_tc_fwd<fp16_t, 64, 16, 8, 32, 2>"),
    (1, "float32", 64, True, "na_fused_fwd<float, 64, 32, 1>"),  # fp32: SIMT
])
def test_dispatch(ndim, dtype, head_dim, wgmma, expected):
    choice = Dispatcher(emulated.run, Policy.of(True, wgmma)).choose("forward", _problem(ndim, dtype, head_dim))
    assert choice.kernels == (expected,)


def _call_path(backend, problem):
    """The forward path a call of ``problem`` on ``backend`` would take, with the settings as they are now."""
    return Dispatcher(None, Policy.for_call(backend, problem)).choose("forward", problem)


def test_the_setting_is_opt_in(monkeypatch):
    problem = _problem(1, "bfloat16", 64)
    monkeypatch.delenv("NA_RTC_WGMMA", raising=False)
    choice = _call_path("emulator", problem)
    assert choice.path == "mma.sync" and dict(choice.skipped)["wgmma"] == (
        "opt-in: NA_RTC_WGMMA=1 turns the wgmma kernels on")
    monkeypatch.setenv("NA_RTC_WGMMA", "1")
    assert _call_path("emulator", problem).path == "wgmma"
    monkeypatch.setenv("NA_RTC_WGMMA", "maybe")
    with pytest.raises(ValueError, match="NA_RTC_WGMMA must be 1 or 0"):
        _call_path("emulator", problem)


@pytest.mark.parametrize("arch, expected", [(90, True), (80, False), (100, False)])
def test_cuda_runs_it_on_sm_90_only(monkeypatch, arch, expected):
    from na_rtc.runtime import cuda

    monkeypatch.setenv("NA_RTC_WGMMA", "1")
    monkeypatch.setattr(cuda, "arch_of", lambda device: arch)
    choice = _call_path("cuda", _problem(2, "float16", 64))
    assert (choice.path == "wgmma") is expected
    if not expected:
        assert dict(choice.skipped)["wgmma"] == f"its kernels run on sm_90; this GPU is sm_{arch}"


def test_forward_and_backward_through_the_op_table(monkeypatch):
    """With NA_RTC_WGMMA=1 the emulator's fused forward, dq and dK/dV are the wgmma kernels: every gradient
    within tolerance of the float64 reference."""
    monkeypatch.setenv("NA_RTC_WGMMA", "1")
    recorder = RecordingExecutor()
    table = ops.make_ops(recorder, "emulator")
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(1, 70, 2, 64, dtype=torch.bfloat16) for _ in range(4))
    problem = na_rtc._args.fused_problem(1, q, k, v, 9, 1, 1, False, None, None)
    out, lse = table["fused_forward"](problem, q, k, v)
    dq, dk, dv, _ = table["fused_backward"](problem, grad, q, k, v, None, out, lse)
    assert recorder.names[0].startswith("na_fused_wg_fwd<")
    assert any(name.startswith("na_fused_wg_bwd_dq<") for name in recorder.names[1:])
    assert any(name.startswith("na_fused_wg_bwd_dkdv<") for name in recorder.names[1:])
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    want = na_rtc.na1d(qd, kd, vd, kernel_size=9, backend="reference")
    want.backward(grad.double())
    assert_close(out, want.detach(), "bfloat16", "forward", "out")
    for name, got, ref in (("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)):
        assert_close(got, ref, "bfloat16", "grad", name)


@pytest.mark.parametrize("case", test_fused_tc_bwd.LONG_BOX_CASES, ids=str)
def test_wgmma_backward_over_long_boxes(case):
    hd = fused_wg.head_dim_bucket(case.head_dim)
    test_fused_tc_bwd.check_backward(case, fused_wg_bwd.dq_name_of(hd, case.dtype, case.ndim), wgmma=True,
                                     dkdv_kernel=fused_wg_bwd.dkdv_name_of(hd, case.dtype, case.ndim))


def test_a_forward_compiles_only_the_forward_family():
    """The forward's kernels are a family of their own (what a first forward call compiles), and the backward
    family holds every dq and dK/dV kernel the backward launches."""
    from na_rtc.runtime.families import FAMILIES, family_of

    forward, backward = FAMILIES["fused_wg"], FAMILIES["fused_wg_bwd"]
    assert forward.source == "na_fused_wg.cu" and backward.source == "na_fused_wg_bwd.cu"
    assert all(name.startswith("na_fused_wg_fwd<") for name in forward.names)
    assert {name.split("<")[0] for name in backward.names} == {"na_fused_wg_bwd_dq", "na_fused_wg_bwd_dkdv"}
    backward_run = RecordingExecutor()
    test_fused_bwd._run(next(c for c in test_fused_tc_bwd.CASES if c.rpb), backward_run, tensor_cores=True,
                        wgmma=True)
    assert {family_of(name).source for name in backward_run.names if "_wg_" in name} == {"na_fused_wg_bwd.cu"}
    forward_run = RecordingExecutor()
    _run(test_fused_tc.CONFIGS[0], executor=forward_run)
    assert [family_of(name) for name in forward_run.names] == [forward]
