"""The CPU emulator (na_rtc/emulator): the CUDA execution model it gives the
kernels, checked with the test kernels of tests/emulator_kernels/.

Expected values come from the CUDA definitions written out here in Python
(shuffle source lanes, votes), from NumPy (float16) and from an independent
float64 nearest-value reference (bfloat16).
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from na_rtc import emulator
from na_rtc.emulator import EmulatorBuildError, EmulatorCacheWarning, EmulatorError
from na_rtc.runtime.plan import Kernel, LaunchPlan, f32, i32, i64, ptr

pytestmark = pytest.mark.skipif(not emulator.available()[0], reason=f"emulator unavailable: {emulator.available()[1]}")

KERNELS = Path(__file__).parent / "emulator_kernels"
SELFTEST = KERNELS / "selftest.cu"
TINY = KERNELS / "tiny.cu"
BROKEN = KERNELS / "broken.cu"
REPO_ROOT = Path(__file__).resolve().parents[1]

NAMES = (
    "shared_isolation",
    "barrier_order",
    "shared_race",
    "barrier_reductions",
    "diverge_skip",
    "diverge_sites",
    "diverge_warp",
    "exited_lane",
    "mismatched_masks",
    "shuffles",
    "half_warp_sums",
    "votes",
    "atomics",
    "narrow",
    "widen",
    "cp_async_groups",
    "cp_async_tile",
    "cp_async_race",
    "wgmma_misuse",
    "dynamic_smem",
    "dynamic_smem_touch",
    "read_at",
    "write_at",
    "write_two",
    "stack_hog",
    "divide",
    "trap_if",
    "grid_2d",
    "rendezvous",
)

FULL = 0xFFFFFFFF
POISON32 = -1  # what a lane outside the mask reads: all ones
POISON64 = 0xFFFFFFFFFFFFFFFF


@pytest.fixture(scope="module")
def emu():
    return emulator.load_module(SELFTEST, NAMES)


def run(module, name, grid, block, *args, shared=0, checked=False, source="selftest.cu"):
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    module.launch(LaunchPlan(Kernel(source, name), grid, block, shared, tuple(args)), checked=checked)


# ---------------------------------------------------------------- shared memory and barriers


def test_shared_memory_is_per_block_while_blocks_run_concurrently(emu, monkeypatch):
    monkeypatch.setenv("NA_RTC_EMULATOR_THREADS", "2")
    grid, threads = (8, 6, 2), 96
    bad = np.zeros(8 * 6 * 2, np.int32)
    run(emu, "shared_isolation", grid, (threads,), ptr(bad), i32(20), shared=4 * threads)
    assert not bad.any(), f"blocks saw other blocks' shared memory: {np.flatnonzero(bad)}"


@pytest.mark.parametrize("block", [(256,), (7, 5, 3), (1024,), (1,)], ids=lambda b: "x".join(map(str, b)))
def test_writes_before_a_barrier_are_visible_after_it(emu, block):
    n = int(np.prod(block))
    out = np.zeros(3 * n, np.int32)
    run(emu, "barrier_order", (3,), block, ptr(out))
    t = np.arange(n)
    expected = (t + 1) % n + 1000 * 2 * ((t + 4) % n)
    assert np.array_equal(out, np.tile(expected, 3))


@pytest.mark.parametrize("mode, hidden_by", [(0, "forward"), (1, "reverse"), (2, None)],
                         ids=["read-after-write", "write-after-read", "synchronized"])
def test_the_two_schedules_expose_a_shared_memory_race_in_one_of_them(emu, monkeypatch, mode, hidden_by):
    """Without a race detector, NA_RTC_EMULATOR_SCHEDULE=reverse is how a race shows: each form of race gives
    the right answer under one schedule only, and the synchronized kernel under both."""
    right = {}
    for schedule in ("forward", "reverse"):
        monkeypatch.setenv("NA_RTC_EMULATOR_SCHEDULE", schedule)
        out = np.zeros(64, np.int32)
        run(emu, "shared_race", (1,), (64,), ptr(out), i32(mode), shared=4)
        right[schedule] = bool((out == 42).all())
    assert right == {"forward": hidden_by != "reverse", "reverse": hidden_by != "forward"}


def test_an_unknown_schedule_is_refused(emu, monkeypatch):
    monkeypatch.setenv("NA_RTC_EMULATOR_SCHEDULE", "random")
    with pytest.raises(ValueError, match="NA_RTC_EMULATOR_SCHEDULE must be forward or reverse"):
        run(emu, "shared_race", (1,), (64,), ptr(np.zeros(64, np.int32)), i32(2), shared=4)


@pytest.mark.parametrize("k", [1, 3, 1000])
def test_syncthreads_count_and_or(emu, k):
    out = np.zeros(3, np.int32)
    run(emu, "barrier_reductions", (1,), (100,), ptr(out), i32(k))
    count = sum(t % k == 0 for t in range(100))
    assert out.tolist() == [count, int(count == 100), int(count > 0)]


def test_a_thread_skipping_the_barrier_is_reported_not_hung(emu):
    out = np.zeros(64, np.int32)
    started = time.perf_counter()
    with pytest.raises(EmulatorError, match=r"barrier divergence in diverge_skip block \(0,0,0\): 63 of 64 threads "
                       r"reached __syncthreads \(selftest\.cu:\d+\); 1 exited without reaching it "
                       r"\(first: thread \(0,0,0\)\)"):
        run(emu, "diverge_skip", (2,), (64,), ptr(out))
    assert time.perf_counter() - started < 1.0


def test_threads_at_different_barriers_are_reported(emu):
    with pytest.raises(EmulatorError, match=r"barrier divergence in diverge_sites block \(0,0,0\): 32 of 64 threads "
                       r"reached __syncthreads at selftest\.cu:(\d+), but thread \(32,0,0\) reached a different "
                       r"__syncthreads at selftest\.cu:(\d+)"):
        run(emu, "diverge_sites", (1,), (64,), ptr(np.zeros(64, np.int32)))


def test_a_lane_at_another_warp_collective_is_reported(emu):
    with pytest.raises(EmulatorError, match=r"warp divergence in diverge_warp block \(0,0,0\) warp 0: thread \(5,0,0\) "
                       r"\(lane 5\) called __syncwarp with mask 0xffffffff at selftest\.cu:\d+ while lanes 0x0000001f "
                       r"wait in __shfl_xor_sync with mask 0xffffffff"):
        run(emu, "diverge_warp", (1,), (32,), ptr(np.zeros(32, np.int32)))


def test_exited_lanes_are_not_waited_for(emu):
    out = np.zeros(64, np.int32)
    run(emu, "exited_lane", (1,), (32,), ptr(out))
    t = np.arange(32)
    expected = t ^ 1
    expected[4] = POISON32  # lane 4 read the exited lane 5
    expected[5] = 0  # lane 5 wrote nothing
    assert np.array_equal(out[:32], expected)
    assert np.array_equal(out[32:], np.where(t == 5, 0, FULL & ~(1 << 5)).astype(np.uint32).view(np.int32))


def test_warp_collectives_need_one_mask(emu):
    with pytest.raises(EmulatorError, match=r"warp divergence in mismatched_masks block \(0,0,0\) warp 0: thread "
                       r"\(1,0,0\) \(lane 1\) called __shfl_sync with mask 0x00000007 .* while lanes 0x00000001 wait in "
                       r"__shfl_sync with mask 0x00000003"):
        run(emu, "mismatched_masks", (1,), (32,), ptr(np.zeros(32, np.int32)))


def test_the_full_mask_in_a_partial_last_warp(emu):
    n = 48  # the second warp has lanes 0..15: the others count as exited
    in_i = np.arange(n, dtype=np.int32)
    out_i = np.zeros(n, np.int32)
    for lane_mask, expected in ((1, in_i ^ 1), (16, np.where(in_i < 32, in_i ^ 16, POISON32))):
        run(emu, "shuffles", (1,), (n,), ptr(in_i), ptr(out_i), ptr(np.zeros(n)), ptr(np.zeros(n)), i32(3),
            i32(lane_mask), i32(32), i32(FULL))
        assert np.array_equal(out_i, expected)


def test_the_module_works_after_a_failed_launch(emu):
    for _ in range(2):
        with pytest.raises(EmulatorError):
            run(emu, "diverge_skip", (4,), (64,), ptr(np.zeros(64, np.int32)))
        out = np.zeros(64, np.int32)
        run(emu, "barrier_order", (1,), (64,), ptr(out))
        assert out[0] == 1 + 1000 * 8


# ---------------------------------------------------------------- warp collectives


def cuda_shfl_source(mode: str, lane: int, arg: int, width: int) -> int:
    """The lane whose value a CUDA __shfl*_sync returns (CUDA C++ Programming Guide)."""
    start = lane // width * width
    if mode == "idx":  # srcLane modulo width, within the caller's subsection
        return start + arg % width
    if mode == "up":  # the lower `delta` lanes of each subsection keep their value
        return lane - arg if lane - start >= arg else lane
    if mode == "down":  # the upper `delta` lanes of each subsection keep their value
        return lane + arg if lane - start + arg < width else lane
    source = lane ^ arg  # xor: later subsections cannot be read
    return source if source // width <= lane // width else lane


MODES = {"idx": 0, "up": 1, "down": 2, "xor": 3}
MASKS = {"full": FULL, "low16": 0x0000FFFF, "odd": 0xAAAAAAAA, "sparse": 0x80010F01}


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("mode", MODES)
def test_shuffles_follow_the_cuda_definition(emu, mode, mask):
    rng = np.random.default_rng(7)
    n = 64  # two warps
    in_i = rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int64).astype(np.int32)
    in_d = rng.standard_normal(n)
    for width in (32, 16, 8, 2):
        for arg in (0, 1, 3, 5, 17, 31, -1) if mode == "idx" else (0, 1, 3, 5, 17, 31):
            if mode != "idx" and arg >= 32:
                continue
            out_i = np.zeros(n, np.int32)
            out_d = np.zeros(n)
            run(emu, "shuffles", (1,), (n,), ptr(in_i), ptr(out_i), ptr(in_d), ptr(out_d), i32(MODES[mode]),
                i32(arg), i32(width), i32(mask))
            for t in range(n):
                lane, base = t % 32, t // 32 * 32
                if not mask >> lane & 1:
                    assert out_i[t] == 0x7777 and out_d[t] == -7.0
                    continue
                source = cuda_shfl_source(mode, lane, arg, width)
                where = f"{mode} width={width} arg={arg} lane={lane}"
                if mask >> source & 1:
                    assert out_i[t] == in_i[base + source], where
                    assert out_d[t] == in_d[base + source], where
                else:  # undefined in CUDA; the emulator returns all ones
                    assert out_i[t] == POISON32, where
                    assert out_d[t:t + 1].view(np.uint64)[0] == POISON64, where


def test_disjoint_partial_masks_shuffle_at_the_same_time(emu):
    x = np.random.default_rng(3).standard_normal(128).astype(np.float32)
    out = np.zeros_like(x)
    run(emu, "half_warp_sums", (1,), (128,), ptr(x), ptr(out))
    sums = x.reshape(-1, 16).astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(out.reshape(-1, 16), np.repeat(sums[:, None], 16, axis=1), rtol=1e-5, atol=1e-5)
    assert (out.reshape(-1, 16) == out.reshape(-1, 16)[:, :1]).all()  # xor trees give every lane the same sum


VOTE_MASKS = {"full": FULL, "low16": 0x0000FFFF, "ends": 0x80000001, "even": 0x55555555}


@pytest.mark.parametrize("mask", VOTE_MASKS.values(), ids=VOTE_MASKS.keys())
@pytest.mark.parametrize("fill", ["random", "none", "all"])
def test_votes_follow_the_cuda_definition(emu, mask, fill):
    rng = np.random.default_rng(11)
    n = 64
    pred = {"random": rng.choice([0, 0, 1, 2, 5], n), "none": np.zeros(n), "all": np.full(n, 3)}[fill].astype(np.int32)
    outs = [np.zeros(n, np.uint32), np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.uint32),
            np.zeros(n, np.uint32), np.zeros(n, np.uint32)]
    run(emu, "votes", (1,), (n,), ptr(pred), *map(ptr, outs), i32(mask))
    ballot, any_, all_, sums, match, active = outs
    for warp in range(2):
        p = pred[32 * warp:32 * warp + 32]
        lanes = [lane for lane in range(32) if mask >> lane & 1]
        expected_ballot = sum(1 << lane for lane in lanes if p[lane])
        for lane in range(32):
            t = 32 * warp + lane
            if lane not in lanes:
                assert ballot[t] == any_[t] == all_[t] == sums[t] == match[t] == 0x7777
                continue
            assert ballot[t] == expected_ballot
            assert any_[t] == int(expected_ballot != 0)
            assert all_[t] == int(all(p[lane] for lane in lanes))
            assert sums[t] == sum(int(p[lane]) for lane in lanes)
            assert match[t] == sum(1 << other for other in lanes if p[other] == p[lane])
    if mask == FULL:  # every lane is still running when the first one asks
        assert (active == FULL).all()


# ---------------------------------------------------------------- atomics


def test_atomics_under_contention_are_exact(emu, monkeypatch):
    monkeypatch.setenv("NA_RTC_EMULATOR_THREADS", "2")
    blocks, threads = 256, 256
    total = blocks * threads
    f, d = np.zeros(1, np.float32), np.zeros(1)
    i, u = np.zeros(1, np.int32), np.zeros(1, np.uint64)
    imax, imin = np.full(1, -1, np.int32), np.full(1, 1, np.int32)
    exch, cas = np.full(1, -1, np.int32), np.zeros(2, np.int32)
    run(emu, "atomics", (blocks,), (threads,), *map(ptr, (f, d, i, u, imax, imin, exch, cas)))
    assert f[0] == total and d[0] == total / 2 and i[0] == 2 * total and u[0] == 3 * total
    assert imax[0] == total - 1 and imin[0] == -(total - 1)
    assert 0 <= exch[0] < total
    assert cas[0] == 1 and 1 <= cas[1] <= total


# ---------------------------------------------------------------- fp16 / bf16


def conversion_inputs() -> np.ndarray:
    rng = np.random.default_rng(5)
    random_bits = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float64)
    halves = halves[np.isfinite(halves)]
    halves = np.unique(halves)
    ties = (halves[:-1] + halves[1:]) / 2  # exact in float32 (12 significant bits)
    ties32 = ties.astype(np.float32)
    assert np.array_equal(ties32.astype(np.float64), ties)
    near = np.concatenate([ties32, np.nextafter(ties32, np.float32(np.inf)), np.nextafter(ties32, np.float32(-np.inf))])
    bf = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
    bf = np.unique(bf[np.isfinite(bf)].astype(np.float64))
    bf_ties = ((bf[:-1] + bf[1:]) / 2).astype(np.float32)
    bf_near = np.concatenate([bf_ties, np.nextafter(bf_ties, np.float32(np.inf)), np.nextafter(bf_ties, np.float32(-np.inf))])
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504, 65519.996, 65520, 65536, 1e38, 3.4028235e38,
                        -3.4028235e38, 2**-24, 2**-25, 2**-25 * 1.0000001, 2**-26, 2**-14, 2**-14 * (1 - 2**-11), 1e-45,
                        -1e-45, 1.17549435e-38, 1.1754942e-38], np.float32)
    nan_payloads = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0xFFFFFFFF, 0x7FBFFFFF, 0x7F802000], np.uint32)
    return np.concatenate([random_bits.view(np.float32), near, bf_near, special, nan_payloads.view(np.float32)])


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """Nearest bfloat16 of each finite float32 by float64 distances, ties to the even bit pattern
    (NaN inputs give garbage here; callers skip them)."""
    with np.errstate(invalid="ignore"):
        return _bf16_reference(x)


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32)
    low = bits & np.uint32(0xFFFF0000)
    high = low + np.uint32(0x10000)
    sign = np.where(bits >> 31 == 1, -1.0, 1.0)
    low_value = low.view(np.float32).astype(np.float64)
    high_value = np.where((high & 0x7FFFFFFF) == 0x7F800000, sign * 2.0**128, high.view(np.float32).astype(np.float64))
    value = x.astype(np.float64)
    to_low, to_high = np.abs(value - low_value), np.abs(high_value - value)
    pick_high = (to_high < to_low) | ((to_high == to_low) & ((low >> 16) & 1 == 1))
    return np.where(pick_high, high >> 16, low >> 16).astype(np.uint16)


def test_float_to_fp16_and_bf16_round_to_nearest_even_bit_exactly(emu):
    x = conversion_inputs()
    n = x.size
    h, b = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    run(emu, "narrow", ((n + 255) // 256,), (256,), ptr(x), ptr(h), ptr(b), i64(n))
    nan = np.isnan(x)
    with np.errstate(over="ignore"):
        expected_h = x.astype(np.float16).view(np.uint16)
    bad = np.flatnonzero((h != expected_h) & ~nan)
    assert bad.size == 0, f"fp16 mismatches, e.g. {x[bad[:5]].view(np.uint32)}: {h[bad[:5]]} vs {expected_h[bad[:5]]}"
    bad = np.flatnonzero((b != bf16_reference(x)) & ~nan)
    assert bad.size == 0, f"bf16 mismatches, e.g. {x[bad[:5]].view(np.uint32)}"
    assert (h[nan] == 0x7FFF).all() and (b[nan] == 0x7FFF).all()  # the canonical NaN of cvt.rn
    for name, values in (("subnormal fp16", h[(np.abs(x) < 2**-14) & (h & 0x7FFF != 0)]), ("inf", h[h & 0x7FFF == 0x7C00])):
        assert values.size > 100, name  # the sample reaches the interesting ranges


def test_fp16_and_bf16_to_float_are_exact(emu):
    bits = np.arange(2**16, dtype=np.uint16)
    from_h, from_b = np.zeros(2**16, np.float32), np.zeros(2**16, np.float32)
    run(emu, "widen", (256,), (256,), ptr(bits), ptr(from_h), ptr(from_b), i64(2**16))
    expected_h = bits.view(np.float16).astype(np.float32)
    expected_b = (bits.astype(np.uint32) << 16).view(np.float32)
    for got, expected in ((from_h, expected_h), (from_b, expected_b)):
        nan = np.isnan(expected)
        assert np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))
        assert (got[nan].view(np.uint32) == 0x7FFFFFFF).all()


def test_torch_tensors_are_kernel_arguments(emu):
    torch = pytest.importorskip("torch")
    x = torch.tensor([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, 1e-40], dtype=torch.float32)
    h = torch.zeros(5, dtype=torch.int16)
    b = torch.zeros(5, dtype=torch.int16)
    run(emu, "narrow", (1,), (32,), ptr(x), ptr(h), ptr(b), i64(5))
    assert torch.equal(b, x.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(h, x.to(torch.float16).view(torch.int16))
    with pytest.raises(TypeError, match="argument 0 of narrow is a torch.Tensor on meta"):
        run(emu, "narrow", (1,), (32,), ptr(x.to("meta")), ptr(h), ptr(b), i64(5))


# ---------------------------------------------------------------- cp.async and dynamic shared memory


def test_cp_async_copies_only_at_the_matching_wait(emu):
    rng = np.random.default_rng(1)
    a, b, z = (rng.standard_normal(128).astype(np.float32) for _ in range(3))
    out = np.zeros(32 * 20, np.float32)
    run(emu, "cp_async_groups", (1,), (32,), ptr(a), ptr(b), ptr(z), ptr(out), shared=3 * 32 * 16)
    out = out.reshape(32, 5, 4)
    stale = np.full((32, 4), 0xFFFFFFFF, np.uint32)  # the 0xFF fill of dynamic shared memory
    assert np.array_equal(out[:, 0].view(np.uint32), stale), "read before the wait saw the copy"
    assert np.array_equal(out[:, 1], a.reshape(32, 4))
    assert np.array_equal(out[:, 2].view(np.uint32), stale), "wait_group<1> completed the newest group"
    assert np.array_equal(out[:, 3], b.reshape(32, 4))
    zfill = np.concatenate([z.reshape(32, 4)[:, :2], np.zeros((32, 2), np.float32)], axis=1)
    assert np.array_equal(out[:, 4], zfill)


def test_cp_async_tile_with_barrier(emu):
    src = np.arange(4 * 64 * 5, dtype=np.float32)
    out = np.zeros_like(src)
    run(emu, "cp_async_tile", (5,), (64,), ptr(src), ptr(out), shared=64 * 16)
    tiles = src.reshape(5, 64, 4)
    assert np.array_equal(out.reshape(5, 64, 4), np.roll(tiles, -1, axis=1))


def test_a_read_of_rows_whose_cp_async_has_not_landed_is_reported(emu):
    """ldmatrix of rows another warp's cp.async writes, with no wait and barrier between: a race on the GPU
    (the copy may land before or after), which the deferred copies alone would hide."""
    src = np.arange(128, dtype=np.uint32)
    out = np.zeros(128, np.uint32)
    run(emu, "cp_async_race", (1,), (64,), ptr(src), ptr(out), i64(1), shared=512)
    # ldmatrix x4 of rows 16 lane: lane l gets (row l / 4, elements 2 (l % 4), +1) of matrix j (rows 8j..8j+7)
    words = src.view(np.uint16).reshape(32, 8)
    want = [[int(words[8 * j + lane // 4, 2 * (lane % 4)]) | int(words[8 * j + lane // 4, 2 * (lane % 4) + 1]) << 16
             for j in range(4)] for lane in range(32)]
    assert out.reshape(32, 4).tolist() == want
    with pytest.raises(RuntimeError, match="has not landed in yet"):
        run(emu, "cp_async_race", (1,), (64,), ptr(src), ptr(out), i64(0), shared=512)


def test_wgmma_is_computed_at_the_wait_and_misuse_is_reported(emu):
    """The emulator's wgmma: each warp's rows at wgmma.wait_group, with B through the descriptor; a missing
    fence, proxy fence, cp.async wait or wgmma wait is an error, as is an SS-form A outside the shared memory
    or swizzled, and D read before the wait is stale."""
    import torch

    values = torch.arange(128, dtype=torch.float32).reshape(2, 8, 8) / 8  # [k / 8][n][k % 8], exact in bf16
    b = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).copy()
    column_sums = values.sum(dim=(0, 2)).numpy()  # D[r][n] = sum over k of B[k][n] (A is all ones)
    out = np.full(512, np.nan, np.float32)
    run(emu, "wgmma_misuse", (1,), (128,), ptr(b), ptr(out), i64(0), shared=256)
    lane = np.arange(128) % 32
    want = np.stack([column_sums[2 * (lane % 4) + (i % 2)] for i in range(4)], axis=1).reshape(-1)
    np.testing.assert_array_equal(out, want)
    for mode, message in ((1, "without a wgmma.fence"), (2, "no fence.proxy.async"), (3, "has not landed in yet"),
                          (4, "not waited for"), (6, "A element .* outside the block's 256 bytes"),
                          (7, "A descriptor .* swizzle mode 1"),
                          (8, "A registers of a wgmma.mma_async .* changed before the wgmma.wait_group")):
        with pytest.raises(EmulatorError, match=message):
            run(emu, "wgmma_misuse", (1,), (128,), ptr(b), ptr(out), i64(mode), shared=256)
    stale = np.full(512, np.nan, np.float32)
    run(emu, "wgmma_misuse", (1,), (128,), ptr(b), ptr(stale), i64(5), shared=256)
    assert (stale == 0).all()


def test_tensor_core_instructions_are_counted_per_launch(emu):
    """``last_op_counts``: the tensor-core instructions of the last launch, one per warp (a warpgroup's wgmma
    counts four), from zero at every launch; tests/test_tensor_core_work.py checks the kernels' work with
    them (the mma.sync count: the mma self-test of na_rtc/verify/primitives.py)."""
    b = np.zeros(256, np.uint8)
    out = np.zeros(512, np.float32)
    run(emu, "wgmma_misuse", (1,), (128,), ptr(b), ptr(out), i64(0), shared=256)
    assert emu.last_op_counts == {"mma.sync": 0, "wgmma": 4}
    run(emu, "wgmma_misuse", (3,), (128,), ptr(b), ptr(out), i64(0), shared=256)
    assert emu.last_op_counts == {"mma.sync": 0, "wgmma": 12}
    run(emu, "dynamic_smem", (1,), (32,), ptr(np.zeros(2, np.int32)), i64(16), shared=16)
    assert emu.last_op_counts == {"mma.sync": 0, "wgmma": 0}


@pytest.mark.parametrize("nbytes", [16, 1000, 48 * 1024, 100 * 1024, 227 * 1024])
def test_dynamic_shared_memory_of_the_requested_size(emu, nbytes):
    out = np.zeros(2, np.int32)
    run(emu, "dynamic_smem", (3,), (128,), ptr(out), i64(nbytes), shared=nbytes)
    assert out.tolist() == [3 * nbytes, 3 * nbytes]


def test_dynamic_shared_memory_overflow_is_reported(emu):
    run(emu, "dynamic_smem_touch", (1,), (32,), i64(1023), shared=1024)
    with pytest.raises(EmulatorError, match=r"out-of-bounds write of dynamic shared memory at byte offset 1024 "
                       r"\(the launch has 1024 bytes\) in dynamic_smem_touch block \(0,0,0\) thread \(0,0,0\)"):
        run(emu, "dynamic_smem_touch", (1,), (32,), i64(1024), shared=1024)
    with pytest.raises(EmulatorError, match="more than any GPU has"):
        run(emu, "dynamic_smem_touch", (1,), (32,), i64(0), shared=300 * 1024)


# ---------------------------------------------------------------- checked mode


def test_checked_mode_reports_a_read_past_the_end(emu):
    a = np.arange(10, dtype=np.float32)
    out = np.zeros(1, np.float32)
    run(emu, "read_at", (1,), (1,), ptr(a), ptr(out), i64(9), checked=True)
    assert out[0] == 9
    with pytest.raises(EmulatorError, match=r"out-of-bounds read of argument 0 at byte offset 40 \(0 bytes past the end "
                       r"of its 40-byte buffer\) in read_at block \(0,0,0\) thread \(0,0,0\)"):
        run(emu, "read_at", (1,), (1,), ptr(a), ptr(out), i64(10), checked=True)


@pytest.mark.parametrize("n", [10, 1024], ids=["gap-below", "page-aligned"])
def test_checked_mode_reports_a_write_before_the_start(emu, n):
    a = np.zeros(n, np.float32)
    pattern = "offsets -4..-1" if n == 10 else "offset -4"
    with pytest.raises(EmulatorError, match=rf"out-of-bounds write (to|of) argument 0 at byte {pattern} \(before the "
                       rf"start of its {4 * n}-byte buffer\)"):
        run(emu, "write_at", (1,), (1,), ptr(a), i64(-1), f32(5.0), checked=True)
    assert not a.any()  # a failed checked launch changes nothing


def test_checked_mode_guards_empty_buffers(emu):
    with pytest.raises(EmulatorError, match=r"out-of-bounds read of argument 0 at byte offset 0 \(0 bytes past the end "
                       r"of its 0-byte buffer\)"):
        run(emu, "read_at", (1,), (1,), ptr(np.zeros(0, np.float32)), ptr(np.zeros(1, np.float32)), i64(0), checked=True)


def test_checked_mode_from_the_environment(emu, monkeypatch):
    monkeypatch.setenv("NA_RTC_EMULATOR_CHECKED", "1")
    with pytest.raises(EmulatorError, match="out-of-bounds write of argument 0"):
        run(emu, "write_at", (1,), (1,), ptr(np.zeros(8, np.float32)), i64(8), f32(5.0))


def test_checked_mode_copies_back_only_what_changed(emu):
    base = np.zeros((10, 3), np.float32)
    run(emu, "write_two", (1,), (32,), ptr(base[:, 0]), ptr(base[:, 1]), i64(10), i64(3), i64(3), checked=True)
    assert np.array_equal(base[:, 0], np.arange(10)) and np.array_equal(base[:, 1], -np.arange(10))
    assert not base[:, 2].any()


def test_checked_mode_reports_writes_between_strided_elements(emu):
    base = np.zeros((10, 3), np.float32)
    with pytest.raises(EmulatorError, match="argument 0 is a strided view and the kernel wrote between its elements"):
        run(emu, "write_two", (1,), (32,), ptr(base[:, 0]), ptr(base[:, 1]), i64(10), i64(1), i64(3), checked=True)
    assert not base.any()


def test_checked_mode_reports_writes_to_read_only_arrays(emu):
    a = np.zeros(4, np.float32)
    a.flags.writeable = False
    with pytest.raises(EmulatorError, match="argument 0 is a read-only array"):
        run(emu, "write_at", (1,), (1,), ptr(a), i64(2), f32(1.0), checked=True)


# ---------------------------------------------------------------- faults


def test_faults_in_kernels_become_errors(emu):
    a = np.zeros(4, np.float32)
    null_index = -(a.ctypes.data // 4)  # a pointer near address 0
    with pytest.raises(EmulatorError, match=r"invalid memory write at address 0x[0-9a-f]+ in write_at block \(0,0,0\) "
                       r"thread \(0,0,0\); launch with checked=True"):
        run(emu, "write_at", (1,), (1,), ptr(a), i64(null_index), f32(1.0))
    with pytest.raises(EmulatorError, match=r"stack overflow \(each emulated thread has a 64 KiB stack\) in stack_hog"):
        run(emu, "stack_hog", (1,), (4,), ptr(np.zeros(2, np.int32)), i32(1000))
    with pytest.raises(EmulatorError, match=r"invalid memory write at address 0x0 in write_at"):
        run(emu, "write_at", (1,), (1,), ptr(None), i64(0), f32(1.0))  # None is a null pointer
    out = np.zeros(8, np.int32)
    run(emu, "stack_hog", (1,), (4,), ptr(out), i32(3))
    if platform.machine() in ("x86_64", "AMD64"):  # (AArch64 division by zero does not trap)
        with pytest.raises(EmulatorError, match="integer division by zero"):
            run(emu, "divide", (1,), (8,), ptr(out), i32(7), i32(0))
    with pytest.raises(EmulatorError, match=r"__trap\(\) called in trap_if block \(0,0,0\) thread \(3,0,0\)"):
        run(emu, "trap_if", (1,), (8,), ptr(out), i32(3))
    run(emu, "divide", (1,), (8,), ptr(out), i32(7), i32(2))
    assert (out == 3).all()


# ---------------------------------------------------------------- blocks in parallel


def test_a_2d_grid_larger_than_the_pool(emu, monkeypatch):
    monkeypatch.setenv("NA_RTC_EMULATOR_THREADS", "2")
    width, height = 100, 35
    grid = ((width + 7) // 8, (height + 3) // 4, 1)
    out = np.zeros((height, width), np.int32)
    workers = np.full(grid[0] * grid[1], -1, np.int32)
    run(emu, "grid_2d", grid, (8, 4), ptr(out), ptr(workers), i32(width), i32(height))
    y, x = np.mgrid[:height, :width]
    assert np.array_equal(out, 3 * x + 1000 * y)
    assert set(workers.tolist()) <= {0, 1}


def test_blocks_run_at_the_same_time(emu, monkeypatch):
    monkeypatch.setenv("NA_RTC_EMULATOR_THREADS", "2")
    arrived, saw = np.zeros(1, np.int32), np.zeros(2, np.int32)
    run(emu, "rendezvous", (2,), (32,), ptr(arrived), ptr(saw), i32(2), i64(5_000_000_000))
    assert saw.tolist() == [1, 1]


# ---------------------------------------------------------------- plans and arguments


def test_arguments_are_checked_against_the_kernel_signature(emu):
    assert emu.signature("write_at") == "pqf"
    a = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"argument 1 of write_at: the plan passes i32 but the kernel parameter is a "
                       r"64-bit integer"):
        run(emu, "write_at", (1,), (1,), ptr(a), i32(0), f32(1.0))
    with pytest.raises(TypeError, match="write_at takes 3 arguments, the plan passes 2"):
        run(emu, "write_at", (1,), (1,), ptr(a), i64(0))
    with pytest.raises(TypeError, match="argument 0 of write_at is a list"):
        run(emu, "write_at", (1,), (1,), ptr([1.0]), i64(0), f32(1.0))
    with pytest.raises(ValueError, match="does not fit in int"):
        run(emu, "divide", (1,), (1,), ptr(a), i32(2**31), i32(1))
    with pytest.raises(ValueError, match="kernel 'nope' is not in the emulator module of selftest.cu"):
        run(emu, "nope", (1,), (1,))


# ---------------------------------------------------------------- building and caching


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NA_RTC_CACHE_DIR", str(tmp_path))
    emulator.clear_memory_cache()
    emulator.reset_cache_stats()
    yield tmp_path
    emulator.clear_memory_cache()


def tiny_works(module) -> bool:
    x = np.arange(5, dtype=np.float32)
    out = np.zeros_like(x)
    run(module, "tiny_add", (1,), (8,), ptr(out), ptr(x), f32(0.5), i32(5), source="tiny.cu")
    return np.array_equal(out, x + 0.5)


def test_the_disk_cache_is_hit_and_a_corrupt_library_is_rebuilt(fresh_cache):
    first = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(first) and emulator.cache_stats()["compiles"] == 1
    assert first.path.parent == fresh_cache / "emulator"
    assert emulator.load_module(TINY, ["tiny_add"]) is first  # remembered in memory
    emulator.clear_memory_cache()
    second = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(second)
    assert emulator.cache_stats()["compiles"] == 1 and emulator.cache_stats()["disk_hits"] == 1
    second.path.unlink()  # (a library mapped by this process must not be rewritten in place)
    second.path.write_bytes(b"\x7fELF garbage")
    emulator.clear_memory_cache()
    with pytest.warns(EmulatorCacheWarning, match="checksum does not match"):
        third = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(third)
    assert emulator.cache_stats()["compiles"] == 2 and emulator.cache_stats()["bad_entries"] == 1


def test_an_unwritable_cache_folder_builds_privately(fresh_cache, monkeypatch):
    blocker = fresh_cache / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("NA_RTC_CACHE_DIR", str(blocker))
    with pytest.warns(EmulatorCacheWarning, match="not writable"):
        module = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(module)
    assert not str(module.path).startswith(str(blocker))


def test_compile_errors_name_the_file_and_line(fresh_cache):
    with pytest.raises(EmulatorBuildError, match=r"broken\.cu:3: .*undeclared_name") as caught:
        emulator.load_module(BROKEN, ["broken"])
    assert caught.value.file.endswith("broken.cu") and caught.value.line == 3
    with pytest.raises(EmulatorBuildError, match=r"the name expression 'tiny_add<float>' does not name a kernel"):
        emulator.load_module(TINY, ["tiny_add<float>"])


def test_a_missing_compiler_is_a_clear_error(fresh_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    available, reason = emulator.available()
    assert not available and "C++ compiler" in reason
    with pytest.raises(RuntimeError, match=r"the emulator needs a C\+\+ compiler"):
        emulator.load_module(TINY, ["tiny_add"])


# ---------------------------------------------------------------- cache faults (docs/design/compile-cache-launch.md#the-cache)


def _library(cache_root) -> Path:
    (library,) = (cache_root / "emulator").glob("tiny-*.so")
    return library


def _environment(cache_root: Path) -> dict:
    environment = dict(os.environ, NA_RTC_CACHE_DIR=str(cache_root))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    return environment


def _in_another_process(code: str, cache_root: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import sys; " + code, str(TINY)], env=_environment(cache_root),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _checksum(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _truncate(library: Path) -> None:
    library.write_bytes(library.read_bytes()[:1000])


def _flip_a_byte(library: Path) -> None:
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))


def _drop_checksum(library: Path) -> None:
    _checksum(library).unlink()


def _garbage_with_its_checksum(library: Path) -> None:  # passes the checksum, fails to load
    library.write_bytes(b"not a shared library")
    _checksum(library).write_text(hashlib.sha256(b"not a shared library").hexdigest() + "\n")


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _drop_checksum, _garbage_with_its_checksum],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_library_is_rebuilt(fresh_cache, damage):
    # built by another process: this one must not have the file mapped already
    # (the dynamic loader hands out a library it has loaded by its path again)
    _in_another_process("from na_rtc import emulator; emulator.load_module(sys.argv[1], ['tiny_add'])", fresh_cache)
    library = _library(fresh_cache)
    damage(library)
    with pytest.warns(EmulatorCacheWarning, match="unusable .*rebuilding"):
        module = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(module)
    stats = emulator.cache_stats()
    assert (stats["compiles"], stats["bad_entries"]) == (1, 1)
    emulator.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emulator.load_module(TINY, ["tiny_add"])  # the rebuilt library is whole
    assert emulator.cache_stats()["disk_hits"] == 1


def test_a_library_of_another_key_is_never_run(fresh_cache, tmp_path):
    """Another source's library (same kernel name and signature, other
    arithmetic) copied under this key's name is rebuilt, not launched."""
    other = tmp_path / "other" / "tiny.cu"
    other.parent.mkdir()
    other.write_text(TINY.read_text().replace("in[i] + value", "in[i] - value"))
    wrong = emulator.load_module(other, ["tiny_add"])
    assert not tiny_works(wrong)
    target = emulator.library_path(TINY, ["tiny_add"])  # never loaded in this process
    shutil.copy(wrong.path, target)
    shutil.copy(_checksum(wrong.path), _checksum(target))
    with pytest.warns(EmulatorCacheWarning, match="belongs to another key"):
        module = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(module)


def test_a_library_from_an_older_na_rtc_is_not_used(fresh_cache, monkeypatch):
    import na_rtc

    with monkeypatch.context() as patch:
        patch.setattr(na_rtc, "__version__", "0.0.1")
        old = emulator.load_module(TINY, ["tiny_add"]).path
    emulator.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = emulator.load_module(TINY, ["tiny_add"])
    assert module.path != old and tiny_works(module)
    assert emulator.cache_stats()["compiles"] == 2


def test_the_cache_folder_deleted_while_running(fresh_cache):
    first = emulator.load_module(TINY, ["tiny_add"])
    shutil.rmtree(fresh_cache / "emulator")
    assert tiny_works(first)  # a loaded library outlives its file
    emulator.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(module) and module.path.parent == fresh_cache / "emulator" and module.path.exists()


def _failing_run_once(monkeypatch, fault):
    """Replace the compiler run: the first call suffers ``fault(cwd)`` and
    fails as the compiler would, later calls compile for real."""
    from na_rtc.emulator import build

    real_run = build.subprocess.run
    calls = []

    def run(command, **kwargs):
        calls.append(kwargs.get("cwd"))
        if len(calls) == 1:
            message = fault(Path(kwargs["cwd"]))
            return subprocess.CompletedProcess(command, 1, "", message)
        return real_run(command, **kwargs)

    monkeypatch.setattr(build.subprocess, "run", run)
    return calls


def _delete_the_folder(work: Path) -> str:
    shutil.rmtree(work.parent)  # another process's `rm -r` of the cache during the build
    return "/usr/bin/ld: cannot open output file tiny.so: No such file or directory\n"


def _fill_the_disk(work: Path) -> str:
    return "{}: fatal error: error writing to /tmp/ccAbc.s: No space left on device\ncompilation terminated.\n".format(
        work / "tiny.cpp")


@pytest.mark.parametrize("fault", [_delete_the_folder, _fill_the_disk], ids=["folder-deleted", "disk-full"])
def test_a_build_the_folder_spoiled_is_redone_privately(fresh_cache, monkeypatch, fault):
    """A compile that failed because of the cache folder, not the source, is
    not reported as a compile error: the library is built in a private folder."""
    calls = _failing_run_once(monkeypatch, fault)
    with pytest.warns(EmulatorCacheWarning, match="not writable"):
        module = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(module) and len(calls) == 2
    assert not str(module.path).startswith(str(fresh_cache))


def test_no_folder_at_all_is_a_clear_error(fresh_cache, monkeypatch):
    from na_rtc.emulator import build

    monkeypatch.setattr(build.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 1, "", _fill_the_disk(Path(kwargs["cwd"]))))
    with pytest.warns(EmulatorCacheWarning), pytest.raises(EmulatorError, match=r"(?s)No space left on device.*"
                                                           r"free disk space, or set NA_RTC_CACHE_DIR and TMPDIR"):
        emulator.load_module(TINY, ["tiny_add"])


def test_a_full_disk_while_writing_the_checksum(fresh_cache, monkeypatch):
    from na_rtc import _diskcache

    def disk_full(fd, data):
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(_diskcache, "_write", disk_full)
        with pytest.warns(EmulatorCacheWarning, match="No space left on device"):
            module = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(module)
    assert sorted(p.name for p in (fresh_cache / "emulator").iterdir()) == []  # nothing half-written


def test_a_read_only_cache_serves_its_libraries(fresh_cache, monkeypatch):
    emulator.load_module(TINY, ["tiny_add"])
    emulator.clear_memory_cache()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    monkeypatch.setattr("os.access", lambda path, mode, **kwargs: False if mode & os.W_OK else True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = emulator.load_module(TINY, ["tiny_add"])
    assert tiny_works(module)
    # the library was served; the unwritable folder is mentioned at most once
    assert emulator.cache_stats()["disk_hits"] == 1 and emulator.cache_stats()["compiles"] == 1
    assert len(caught) <= 1


EMULATOR_WORKER = textwrap.dedent(
    """
    import contextlib, sys, time
    import numpy as np
    from na_rtc import _diskcache, emulator
    from na_rtc.runtime.plan import Kernel, LaunchPlan, f32, i32, ptr
    start, locking, source = float(sys.argv[1]), sys.argv[2], sys.argv[3]
    if locking == "unlocked":
        _diskcache.build_lock = lambda path: contextlib.nullcontext(False)
    while time.time() < start:
        time.sleep(0.001)
    module = emulator.load_module(source, ["tiny_add"])
    x = np.arange(5, dtype=np.float32)
    out = np.zeros_like(x)
    module.launch(LaunchPlan(Kernel("tiny.cu", "tiny_add"), (1, 1, 1), (8, 1, 1), 0, (ptr(out), ptr(x), f32(0.5), i32(5))))
    print(emulator.cache_stats()["compiles"], bool(np.array_equal(out, x + 0.5)))
    """
)


@pytest.mark.parametrize("locking", ["locked", "unlocked"])
def test_eight_processes_building_the_same_library_at_once(fresh_cache, locking):
    environment = _environment(fresh_cache)
    start = time.time() + 2.0
    count = 8 if locking == "locked" else 3  # unlocked, every process compiles: keep CI's two cores free
    workers = [
        subprocess.Popen([sys.executable, "-c", EMULATOR_WORKER, repr(start), locking, str(TINY)], env=environment,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    results = [worker.communicate(timeout=300) + (worker.returncode,) for worker in workers]
    for out, err, code in results:
        assert code == 0, err
    lines = [out.split() for out, _, _ in results]
    assert all(correct == "True" for _, correct in lines)
    compiles = sum(int(count) for count, _ in lines)
    assert compiles == 1 if locking == "locked" else compiles >= 1
    library = _library(fresh_cache)
    assert sorted(p.name for p in library.parent.iterdir()) == [library.name, _checksum(library).name]
