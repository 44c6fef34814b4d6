"""The tensor-core fused kernels in 3D (families ``fused_tc_3d``, ``fused_tc_bwd_3d``: the RANK 3
instantiations of ``cuda_src/na_fused_tc.cu`` and ``na_fused_tc_bwd.cu``) through the emulator.

* the forward (out, lse) over a seeded 3D sweep against the float64 reference
  (``NA_RTC_SWEEP=small`` shows every swept value at least once, ``large`` draws
  more): odd and even kernels, dilation, stride and causal per axis, rpb,
  scale, every head-dim bucket with full and partial head dims, fp16 and
  bf16, heads-first views, batch and heads > 1, sizes that are not multiples
  of the 4 x 4 x 4 tile; plus LONG_BOXES, key boxes of many chunks;
* determinism, no dependence on the emulator's schedule (long boxes), the
  reach of a NaN key or value, offsets past 2^31 elements;
* the backward (dq, dk, dv, drpb) over a seeded 3D sweep of the same
  dimensions against the float64 reference backward, from the reference's out
  and lse; LONG_BOX_CASES, key boxes (dq) and query boxes (dK/dV) of many
  chunks; determinism (bias gradients included), schedules, 2^31 offsets;
* the dispatch: 3D fp16/bf16 calls with head dims up to 128 run the 3D twins.

The kernels are driven through the dispatcher as the 1D/2D tensor-core tests
do, and ``test_through_na3d`` runs the public ``na3d`` and ``na3d_backward`` on
the emulator.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch
import test_fused
import test_fused_bwd
import test_scale
import test_schedules
from helpers import RecordingExecutor, assert_close, kernel_policy, noncontiguous, sweep_bias, sweep_inputs

import na_rtc
from na_rtc import config
from na_rtc.runtime import emulated
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused_tc, fused_tc_bwd
from na_rtc.runtime.policy import Policy

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")

DTYPES = fused_tc.DTYPES
#: every bucket in full, and partial head dims of the 32 and 128 buckets
HEAD_DIMS = (32, 64, 128, 24, 100)
Config = test_fused.Config


def random_window(rng, extra: int, largest: int, rpb_chance: float):
    """(spatial, kernel, dilation, stride, causal, rpb) of a random 3D window: up to ``extra - 1`` positions
    past k * d per axis, at most ``largest`` tokens (the float64 reference stays quick); rpb with odd kernels
    and no causal axis, at ``rpb_chance``."""
    while True:
        kernel = tuple(int(rng.integers(2, 7)) for _ in range(3))
        dilation = tuple(int(rng.integers(1, 3)) for _ in range(3))
        spatial = tuple(k * d + int(rng.integers(0, extra)) for k, d in zip(kernel, dilation))
        if math.prod(spatial) <= largest:
            break
    stride = tuple(int(rng.integers(1, k + 1)) for k in kernel)
    causal = tuple(bool(rng.random() < 0.3) for _ in range(3))
    rpb = all(k % 2 for k in kernel) and not any(causal) and rng.random() < rpb_chance
    return spatial, kernel, dilation, stride, causal, bool(rpb)


def random_config(seed: int) -> Config:
    """A random 3D forward configuration; the corners below add what draws miss."""
    rng = np.random.default_rng(7300 + seed)
    spatial, kernel, dilation, stride, causal, rpb = random_window(rng, 5, 700, 0.7)
    scale = None if rng.random() < 0.7 else 0.3
    return Config(spatial, kernel, dilation, causal, int(rng.integers(1, 3)), int(rng.integers(1, 3)),
                  HEAD_DIMS[seed % len(HEAD_DIMS)], rpb, bool(rng.random() < 0.4), DTYPES[seed % 2], stride, scale)


CONFIGS = [random_config(seed) for seed in range(10 if config.sweep_size() == "small" else 80)]
# corners a small draw may miss: causal on one axis (time) only, each axis dilated and strided alone, even
# kernels with a bias-free stride, blocked attention (stride = kernel), a kernel as long as its axis
CONFIGS += [
    Config((9, 8, 10), (5, 3, 3), (1, 1, 1), (True, False, False), 1, 2, 64, False, False, "float16", (1, 1, 1)),
    Config((7, 10, 9), (3, 5, 3), (1, 2, 1), (False, False, False), 2, 1, 32, True, True, "bfloat16", (2, 1, 3)),
    Config((8, 6, 13), (4, 3, 6), (1, 1, 2), (False, True, False), 1, 2, 128, False, True, "float16", (3, 2, 1)),
    Config((10, 9, 7), (2, 4, 7), (3, 1, 1), (False, False, True), 1, 1, 100, False, False, "bfloat16", (1, 4, 2)),
    Config((8, 8, 8), (4, 4, 4), (1, 1, 1), (False, False, False), 1, 2, 24, False, False, "float16", (4, 4, 4)),
    Config((5, 7, 6), (5, 7, 6), (1, 1, 1), (False, False, False), 1, 1, 64, False, True, "bfloat16", (1, 1, 1)),
]


def _long_box(spatial, kernel, head_dim, dtype, rpb=False, causal=(False, False, False), dilation=(1, 1, 1)):
    return Config(spatial=spatial, kernel_size=kernel, dilation=dilation, causal=causal, batch=1, heads=1,
                  head_dim=head_dim, rpb=rpb, heads_first=False, dtype=dtype, stride=(1, 1, 1))


#: key boxes of many chunks for every head-dim bucket (a 4 x 4 x 4 tile's box here is 8 x 12 x 14 keys and
#: more: dozens of chunks, each stage reused many times), with a bias, causal time and dilation
LONG_BOXES = [
    _long_box((9, 14, 16), (5, 9, 11), 32, "float16", rpb=True),
    _long_box((9, 14, 16), (5, 9, 11), 64, "bfloat16", causal=(True, False, False)),
    _long_box((8, 13, 15), (5, 9, 11), 128, "float16", rpb=True),
    _long_box((10, 12, 22), (5, 6, 10), 128, "bfloat16", dilation=(1, 1, 2)),
]


def forward(cfg: Config, executor=emulated.run, arrays=None, policy=None):
    """(out, lse) of the fused forward the dispatcher picks for ``cfg`` (tensor cores on)."""
    (q, k, v), _ = sweep_inputs(cfg, 3) if arrays is None else (arrays, None)
    bias, _ = sweep_bias(cfg)
    problem = test_fused._problem(cfg, q, k, v, bias)
    return Dispatcher(executor, policy or kernel_policy(tensor_cores=True)).forward(problem, q, k, v, bias)


assert_forward_matches_reference = test_fused.assert_forward_matches_reference


def _swept(configs):
    """Every value each swept dimension takes in ``configs`` (forward Configs or backward Cases; per axis where it
    is per axis)."""
    values = {
        "dtype": {c.dtype for c in configs},
        "bucket": {fused_tc.head_dim_bucket(c.head_dim) for c in configs},
        "partial head dim": {c.head_dim in fused_tc.HEAD_DIMS for c in configs},
        **{f"causal {axis}": {c.causal[axis] for c in configs} for axis in range(3)},
        **{f"dilated {axis}": {c.dilation[axis] > 1 for c in configs} for axis in range(3)},
        **{f"strided {axis}": {c.stride[axis] > 1 for c in configs} for axis in range(3)},
        **{f"even kernel {axis}": {c.kernel_size[axis] % 2 == 0 for c in configs} for axis in range(3)},
        "partial tile": {any(n % 4 for n in c.spatial) for c in configs},
        "rpb": {c.rpb for c in configs},
        "heads first": {c.heads_first for c in configs},
        "batch or heads > 1": {c.batch * c.heads > 1 for c in configs},
    }
    if all(hasattr(c, "scale") for c in configs):  # the forward's
        values["scale"] = {c.scale is None for c in configs}
    return values


def assert_every_value_is_swept(configs):
    assert _swept(configs) == {**dict.fromkeys(_swept(configs), {False, True}), "dtype": set(DTYPES),
                               "bucket": set(fused_tc.HEAD_DIMS)}


def test_the_sweep_shows_every_value_of_every_dimension():
    assert_every_value_is_swept(CONFIGS)
    assert any(c.causal == (True, False, False) for c in CONFIGS)  # causal in time only, the video case
    assert any(c.stride == c.kernel_size for c in CONFIGS)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_forward_matches_reference(cfg):
    run = RecordingExecutor()
    out, lse = forward(cfg, run)
    assert run.names == [fused_tc.kernel_name_of(fused_tc.head_dim_bucket(cfg.head_dim), cfg.dtype, 3)]
    assert_forward_matches_reference(cfg, out, lse)


def chunks_of(cfg) -> int:
    """Chunks of the largest key box of the 3D forward's blocks of ``cfg`` (stride 1, one dilation group)."""
    tile = fused_tc.TILES[3, 1]
    keys = math.prod(min(t + k - 1, n // d) for t, k, n, d in zip(tile, cfg.kernel_size, cfg.spatial, cfg.dilation))
    return -(-keys // fused_tc.FORWARD_3D[fused_tc.head_dim_bucket(cfg.head_dim)].chunk_keys)


def test_long_boxes_have_many_chunks_in_every_bucket():
    assert {fused_tc.head_dim_bucket(c.head_dim) for c in LONG_BOXES} == set(fused_tc.HEAD_DIMS)
    assert all(chunks_of(c) >= 20 for c in LONG_BOXES), [chunks_of(c) for c in LONG_BOXES]


@pytest.mark.parametrize("cfg", LONG_BOXES, ids=str)
def test_forward_over_long_key_boxes(cfg):
    out, lse = forward(cfg)
    assert_forward_matches_reference(cfg, out, lse)


@pytest.mark.parametrize("cfg", LONG_BOXES[:2], ids=str)
def test_forward_has_no_schedule_dependence(cfg, monkeypatch):
    def compute():
        run = RecordingExecutor()
        return run.names, forward(cfg, run)

    names = test_schedules._under_both_schedules(monkeypatch, compute)
    assert names[0].startswith("na_fused_tc_fwd<") and names[0].endswith(", 3, 4>"), names


def assert_same_bits(first, second):
    """Two runs' outputs (None where a gradient is absent) are bitwise equal."""
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a.contiguous().view(torch.uint8),
                                                        b.contiguous().view(torch.uint8))


def test_forward_is_deterministic():
    cfg = next(c for c in CONFIGS if c.rpb)
    assert_same_bits(forward(cfg), forward(cfg))


# ---------------------------------------------------------------- non-finite inputs and large offsets


def _queries_seeing(cfg, token):
    """[X, Y, Z] booleans: the queries whose neighborhood holds key position ``token``."""
    from na_rtc.window import Axis, is_neighbor

    grids = np.meshgrid(*(np.arange(n) for n in cfg.spatial), indexing="ij")
    seen = np.ones(cfg.spatial, bool)
    for grid, n, k, s, d, c, j in zip(grids, cfg.spatial, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.causal,
                                      token):
        seen &= is_neighbor(Axis(n, k, s, d, c), grid, j)
    return seen


def _same_tile(cfg, token, tile):
    """[X, Y, Z] booleans: the queries of the forward's block tile ``tile`` that holds ``token``'s position."""
    grids = np.meshgrid(*(np.arange(n) for n in cfg.spatial), indexing="ij")
    same = np.ones(cfg.spatial, bool)
    for grid, t, d, j in zip(grids, tile, cfg.dilation, token):
        same &= (grid % d == j % d) & (grid // d // t == j // d // t)
    return same


@pytest.mark.parametrize("poisoned", ["key", "value"])
def test_nan_reach(poisoned):
    """A NaN key poisons exactly the queries that see it; a NaN value those and at most other queries of
    their block tiles (0 * NaN in P V), none elsewhere."""
    check_nan_reach(poisoned, forward, fused_tc.TILES[3, 1])


def check_nan_reach(poisoned: str, forward_of, tile):
    """test_nan_reach for the forward ``forward_of(cfg, arrays=...)`` whose block tiles are ``tile``."""
    cfg = Config((9, 10, 11), (3, 5, 3), (1, 2, 1), (True, False, False), 1, 1, 32, False, False, "float16",
                 (1, 1, 2))
    (q, k, v), _ = sweep_inputs(cfg, 3)
    k, v = k.clone(), v.clone()
    token = (4, 5, 6)
    (k if poisoned == "key" else v)[(0, *token, 0, 3)] = float("nan")
    out, _ = forward_of(cfg, arrays=(q, k, v))
    bad = ~torch.isfinite(out[0, ..., 0, :].float()).all(-1).numpy()
    sees = _queries_seeing(cfg, token)
    assert sees.any() and (bad >= sees).all(), "a query whose window holds the NaN is finite"
    if poisoned == "key":
        np.testing.assert_array_equal(bad, sees)
    else:
        tiles = np.zeros_like(sees)
        for query in zip(*np.nonzero(sees)):
            tiles |= _same_tile(cfg, query, tile)
        assert (bad <= tiles).all(), "a query outside the tiles that see the NaN is poisoned"


def test_offsets_past_2_to_the_31():
    """Batch 1 of every tensor starts past 2^31 elements: the kernels' 64-bit offsets reach it."""
    cfg = Config((5, 6, 7), (3, 3, 5), (1, 1, 1), (False, False, False), 2, 2, 32, True, False, "float16",
                 (1, 1, 1))
    keep, arrays = test_scale.sparse_inputs(3, cfg.shape, "float16")
    try:
        assert arrays[0].strides[0] // 2 > 2**31
        bias, bias64 = sweep_bias(cfg)
        bias = bias.numpy()
        problem = test_fused._problem(cfg, *arrays, bias)
        out, lse = Dispatcher(emulated.run, kernel_policy(tensor_cores=True)).forward(problem, *arrays, bias)
        want_out, want_lse = test_fused._reference(cfg, *(np.ascontiguousarray(a).astype(np.float64) for a in arrays),
                                                   bias64)
        assert_close(out, want_out, cfg.dtype, "forward", "out")
        assert_close(lse, want_lse, cfg.dtype, "forward", "lse")
    finally:
        del arrays
        gc.collect()
        keep.close()


# ---------------------------------------------------------------- dispatch


def _problem(dtype, head_dim):
    q = torch.empty((1, 6, 6, 6, 2, head_dim), dtype=getattr(torch, dtype))
    return na_rtc._args.fused_problem(3, q, q, q, 3, 1, 1, False, None, None)


@pytest.mark.parametrize("dtype, head_dim, expected", [
    ("float16", 64, "na_fused_tc_fwd<fp16_t, 64, 4, 4, 32, 1, 3, 4>"),
    ("bfloat16", 100, "na_fused_tc_fwd<bf16_t, 128, 4, 4, 32, 1, 3, 4>"),
    ("float16", 20, "na_fused_tc_fwd<fp16_t, 32, 4, 4, 64, 1, 3, 4>"),
])
def test_3d_calls_run_the_3d_twin(dtype, head_dim, expected):
    choice = Dispatcher(emulated.run, kernel_policy(tensor_cores=True)).choose("forward", _problem(dtype, head_dim))
    assert choice.path == "mma.sync" and choice.kernels == (expected,)


@pytest.mark.parametrize("dtype, head_dim, z, why", [
    ("float32", 64, 6, "dtype float32"),
    ("float16", 256, 6, "head_dim 256 > 128"),
    ("float16", 32, 2**16, "a last axis of 65536 positions (3D: at most 65535)"),
])
def test_what_the_3d_twin_refuses(dtype, head_dim, z, why):
    q = np.broadcast_to(np.zeros((), np.float16 if dtype == "float16" else np.float32), (1, 6, 6, z, 2, head_dim))
    problem = na_rtc._args.fused_problem(3, q, q, q, 3, 1, 1, False, None, None)
    choice = Dispatcher(emulated.run, Policy.of(tensor_cores=True)).choose("forward", problem)
    assert why in dict(choice.skipped)["mma.sync"]


# ---------------------------------------------------------------- backward

Case = test_fused_bwd.Case


def random_case(seed: int) -> Case:
    """A random 3D backward case; the corners below add what draws miss."""
    rng = np.random.default_rng(8300 + seed)
    spatial, kernel, dilation, stride, causal, rpb = random_window(rng, 4, 600, 0.8)
    return Case(spatial, kernel, stride, dilation, causal, HEAD_DIMS[seed % len(HEAD_DIMS)], DTYPES[seed % 2], rpb,
                bool(rng.random() < 0.4), int(rng.integers(1, 3)), int(rng.integers(1, 3)))


CASES = [random_case(seed) for seed in range(10 if config.sweep_size() == "small" else 60)] + [
    Case((9, 8, 10), (5, 3, 3), (1, 1, 1), (1, 1, 1), (True, False, False), 64, "bfloat16", heads=2),
    Case((7, 10, 9), (3, 5, 3), (2, 1, 3), (1, 2, 1), (False, False, False), 32, "float16", rpb=True,
         heads_first=True, batch=2),
    Case((8, 6, 13), (4, 3, 6), (3, 2, 1), (1, 1, 2), (False, True, False), 128, "bfloat16", heads_first=True),
    Case((10, 9, 7), (2, 4, 7), (1, 4, 2), (3, 1, 1), (False, False, True), 100, "float16"),
    Case((8, 8, 8), (4, 4, 4), (4, 4, 4), (1, 1, 1), (False, False, False), 24, "bfloat16", heads=1),
    Case((7, 9, 8), (7, 3, 5), (1, 1, 1), (1, 3, 1), (False, False, False), 128, "float16", rpb=True, heads=1),
]

#: key boxes (dq) and query boxes (dK/dV) of many chunks for every head-dim bucket, with a bias and causal time
LONG_BOX_CASES = [
    Case((9, 14, 16), (5, 9, 11), (1, 1, 1), (1, 1, 1), (False, False, False), 32, "float16", rpb=True, heads=1),
    Case((9, 14, 16), (5, 9, 11), (1, 1, 1), (1, 1, 1), (True, False, False), 64, "bfloat16", heads=1),
    # at head dim 128 the dq kernel's shared memory holds a bias table of up to about 1500 entries (9 x 13 x 13)
    Case((8, 12, 13), (5, 7, 7), (1, 1, 1), (1, 1, 1), (False, False, False), 128, "float16", rpb=True, heads=1),
]


def test_the_backward_sweep_shows_every_value_of_every_dimension():
    assert_every_value_is_swept(CASES)
    assert any(c.causal == (True, False, False) for c in CASES)
    assert {fused_tc.head_dim_bucket(c.head_dim) for c in LONG_BOX_CASES} == set(fused_tc.HEAD_DIMS)


def _window(case: Case):
    return dict(kernel_size=case.kernel_size, stride=case.stride, dilation=case.dilation, is_causal=case.causal)


def backward(case: Case, seed: int = 0, arrays=None, run=None, dispatcher=None, device=None):
    """(problem, kernel names, (dq, dk, dv, drpb), float64 inputs (q, k, v, dOut, rpb)) of the fused backward the
    dispatcher picks (tensor cores on), from the float64 reference's out and lse; ``run``: a RecordingExecutor
    to launch on; ``arrays``: q, k, v, dOut as NumPy arrays; ``dispatcher`` and ``device``: another dispatcher
    and the torch device of its arrays (the GPU's)."""
    (q, k, v, g, rpb), (q64, k64, v64, g64, rpb64) = test_fused_bwd._inputs(case, seed)
    if arrays is not None:
        q, k, v, g = arrays
        q64, k64, v64, g64 = (torch.from_numpy(np.ascontiguousarray(a).astype(np.float64)) for a in arrays)
    out64, lse64 = na_rtc.na3d(q64, k64, v64, **_window(case), rpb=rpb64, return_lse=True, backend="reference")
    out, lse = out64.to(test_fused_bwd.TORCH_DTYPES[case.dtype]), lse64.float()
    if arrays is not None:  # NumPy arrays (float16): the outputs and bias too
        out, lse, rpb = out.numpy(), lse.numpy(), None if rpb is None else rpb.numpy()
    if case.heads_first:
        q, k, v, g, out = (noncontiguous(a) for a in (q, k, v, g, out))
        lse = lse.movedim(-1, 1).contiguous().movedim(1, -1)
    if device is not None:
        q, k, v, g, out, lse, rpb = (None if a is None else a.to(device) for a in (q, k, v, g, out, lse, rpb))
    problem = na_rtc._args.fused_problem(3, q, k, v, case.kernel_size, case.stride, case.dilation, case.causal,
                                         None, rpb)
    run = run or RecordingExecutor()
    grads = (dispatcher or Dispatcher(run, kernel_policy(tensor_cores=True))).backward(problem, g, q, k, v, rpb, out,
                                                                                       lse)
    return problem, tuple(run.names), grads, (q64, k64, v64, g64, rpb64)


def assert_backward_matches_reference(case: Case, grads, inputs64):
    q64, k64, v64, g64, rpb64 = inputs64
    want = na_rtc.na3d_backward(g64, q64, k64, v64, **_window(case), rpb=rpb64, backend="reference")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want):
        assert tuple(got.shape) == case.shape
        assert_close(got, ref, case.dtype, "grad", name)
    if case.rpb:
        assert_close(grads[3], want[3], case.dtype, "grad", "drpb")
    else:
        assert grads[3] is None


def _tc_kernels(case: Case) -> tuple[str, str]:
    hd = fused_tc.head_dim_bucket(case.head_dim)
    return fused_tc_bwd.dq_name_of(hd, case.dtype, 3), fused_tc_bwd.dkdv_name_of(hd, case.dtype, 3)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(case):
    _, names, grads, inputs64 = backward(case)
    assert set(_tc_kernels(case)) <= set(names), names
    assert_backward_matches_reference(case, grads, inputs64)


def box_chunks(case: Case) -> tuple[int, int]:
    """Chunks of the largest key box (dq) and query box (dK/dV) of the 3D backward's blocks of ``case``
    (stride 1, one dilation group, non-causal: both boxes are the tile plus k - 1 per axis, clipped)."""
    hd = fused_tc.head_dim_bucket(case.head_dim)
    tile = fused_tc.TILES[3, 1]
    box = math.prod(min(t + k - 1, n) for t, k, n in zip(tile, case.kernel_size, case.spatial))
    return -(-box // fused_tc_bwd.DQ_CHUNK[hd]), -(-box // fused_tc_bwd.DKDV_CHUNK[3, hd])


def test_long_backward_boxes_have_many_chunks():
    assert all(min(box_chunks(c)) >= 20 for c in LONG_BOX_CASES), [box_chunks(c) for c in LONG_BOX_CASES]


@pytest.mark.parametrize("case", LONG_BOX_CASES, ids=str)
def test_backward_over_long_boxes(case):
    _, _, grads, inputs64 = backward(case)
    assert_backward_matches_reference(case, grads, inputs64)


@pytest.mark.parametrize("case", LONG_BOX_CASES[:2], ids=str)
def test_backward_has_no_schedule_dependence(case, monkeypatch):
    def compute():
        _, names, grads, _ = backward(case)
        return names, grads

    names = test_schedules._under_both_schedules(monkeypatch, compute)
    assert set(_tc_kernels(case)) <= set(names), names


def test_backward_is_deterministic():
    case = next(c for c in CASES if c.rpb)
    assert_same_bits(backward(case)[2], backward(case)[2])


def test_backward_offsets_past_2_to_the_31():
    case = Case((5, 6, 7), (3, 3, 5), (1, 1, 1), (1, 1, 1), (False, False, False), 32, "float16", rpb=True,
                batch=2, heads=2)
    keep, arrays = test_scale.sparse_inputs(4, case.shape, "float16")
    try:
        assert arrays[0].strides[0] // 2 > 2**31
        _, names, grads, inputs64 = backward(case, arrays=arrays)
        assert set(_tc_kernels(case)) <= set(names), names
        assert_backward_matches_reference(case, grads, inputs64)
    finally:
        del arrays
        gc.collect()
        keep.close()


def test_3d_backward_runs_the_3d_twin():
    choice = Dispatcher(emulated.run, kernel_policy(tensor_cores=True)).choose("backward", _problem("float16", 64))
    assert choice.path == "mma.sync"
    assert choice.kernels[1:3] == (fused_tc_bwd.dq_name_of(64, "float16", 3),
                                   fused_tc_bwd.dkdv_name_of(64, "float16", 3))


# ---------------------------------------------------------------- through the public API


def test_through_na3d():
    """na3d and na3d_backward on the emulator run the 3D tensor-core kernels (the dispatcher's choice, as
    explain reports it) and match the reference."""
    case = next(c for c in CASES if c.rpb and not c.heads_first)
    (q, k, v, g, rpb), (q64, k64, v64, g64, rpb64) = test_fused_bwd._inputs(case)
    window = _window(case)
    explained = str(na_rtc.explain("na3d", q, k, v, **window, rpb=rpb, backward=True, backend="emulator"))
    assert fused_tc.kernel_name_of(fused_tc.head_dim_bucket(case.head_dim), case.dtype, 3) in explained
    assert all(name in explained for name in _tc_kernels(case)), explained
    out, lse = na_rtc.na3d(q, k, v, **window, rpb=rpb, return_lse=True, backend="emulator")
    want_out, want_lse = na_rtc.na3d(q64, k64, v64, **window, rpb=rpb64, return_lse=True, backend="reference")
    assert_close(out, want_out, case.dtype, "forward", "out")
    assert_close(lse, want_lse, case.dtype, "forward", "lse")
    grads = na_rtc.na3d_backward(g, q, k, v, **window, rpb=rpb, backend="emulator")
    assert_backward_matches_reference(case, grads, (q64, k64, v64, g64, rpb64))


# ---------------------------------------------------------------- on a GPU (make gpu-check)


def gpu_dispatcher(names, wgmma=False):
    """A dispatcher launching on the GPU with the mma.sync path on (with ``wgmma``: the wgmma path too, on sm_90
    GPUs only, the test skipped elsewhere), recording the kernel names in ``names``."""
    import dataclasses

    from na_rtc.runtime import cuda
    from na_rtc.runtime.policy import Settings

    arch = cuda.arch_of("cuda")
    if wgmma and arch != 90:
        pytest.skip("the wgmma kernels are built for sm_90 GPUs only")

    def run(plan):
        names.append(plan.kernel.name)
        cuda.run(plan)

    settings = dataclasses.replace(Settings.read(), tensor_cores=True, wgmma=wgmma, verify=False)
    return Dispatcher(run, Policy("cuda", arch, settings))


def _on_gpu(*arrays):
    return [None if a is None else a.to("cuda") for a in arrays]  # preserve_format: heads-first views stay so


gpu = [pytest.mark.gpu, pytest.mark.skipif(not na_rtc.backends.get("cuda").probe()[0], reason="no usable GPU")]


@pytest.mark.parametrize("cfg", [pytest.param(c, marks=gpu, id=str(c)) for c in CONFIGS + LONG_BOXES])
def test_forward_on_gpu(cfg):
    (q, k, v), _ = sweep_inputs(cfg, 3)
    bias, _ = sweep_bias(cfg)
    q, k, v, bias = _on_gpu(q, k, v, bias)
    names = []
    out, lse = gpu_dispatcher(names).forward(test_fused._problem(cfg, q, k, v, bias), q, k, v, bias)
    assert names == [fused_tc.kernel_name_of(fused_tc.head_dim_bucket(cfg.head_dim), cfg.dtype, 3)]
    assert_forward_matches_reference(cfg, out.cpu(), lse.cpu())


@pytest.mark.parametrize("case", [pytest.param(c, marks=gpu, id=str(c)) for c in CASES + LONG_BOX_CASES])
def test_backward_on_gpu(case):
    names = []
    _, _, grads, inputs64 = backward(case, dispatcher=gpu_dispatcher(names), device="cuda")
    assert set(_tc_kernels(case)) <= set(names), names
    assert_backward_matches_reference(case, [None if x is None else x.cpu() for x in grads], inputs64)
