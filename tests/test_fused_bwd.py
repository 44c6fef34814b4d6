"""Fused backward kernels (``cuda_src/na_fused_bwd.cu``) on the emulator.

dq, dk, dv and drpb of the fused backward (:meth:`~na_rtc.runtime.dispatch.Dispatcher.backward`)
against the float64 reference backward (docs/design/testing.md#tolerances, grad column), with
the forward's output and logsumexp taken from the reference (so these tests do
not depend on the fused forward kernel). A seeded sweep covers 1D / 2D, odd and
even kernels (2..13 in 2D, up to 65 in 1D), dilation 1..4, stride 1..k, causal
per axis, RPB on / off, head dims 16..128 and odd ones, fp32 / fp16 / bf16,
heads-first views, batch and heads > 1, sizes that are not tile multiples.
The kernels have no atomics: two runs must agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import RecordingExecutor, assert_close, kernel_policy, make_inputs, noncontiguous

import na_rtc
from na_rtc import _args
from na_rtc.runtime import emulated, registry
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused_bwd

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    spatial: tuple
    kernel_size: tuple
    stride: tuple
    dilation: tuple
    causal: tuple
    head_dim: int
    dtype: str
    rpb: bool = False
    heads_first: bool = False
    batch: int = 1
    heads: int = 2

    @property
    def ndim(self):
        return len(self.spatial)

    @property
    def shape(self):
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    def __str__(self):
        axes = ",".join(f"L{n}k{k}s{s}d{d}{'c' if c else ''}" for n, k, s, d, c in
                        zip(self.spatial, self.kernel_size, self.stride, self.dilation, self.causal))
        return (f"{self.ndim}d-{axes}-b{self.batch}h{self.heads}D{self.head_dim}-{self.dtype}"
                f"{'-rpb' if self.rpb else ''}{'-hf' if self.heads_first else ''}")


DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (16, 32, 64, 128, 24, 33)


def _random_case(seed: int) -> Case:
    rng = np.random.default_rng(9100 + seed)
    ndim = 1 + seed % 2
    kmax = 20 if ndim == 1 else 14
    kernel = tuple(int(rng.integers(2, kmax)) for _ in range(ndim))
    stride = tuple(int(rng.integers(1, k + 1)) for k in kernel)
    dilation = tuple(int(rng.integers(1, 5)) for _ in range(ndim))
    extra = 30 if ndim == 1 else 6
    spatial = tuple(k * d + int(rng.integers(0, extra)) for k, d in zip(kernel, dilation))
    causal = tuple(bool(rng.random() < 0.35) for _ in range(ndim))
    rpb = all(k % 2 for k in kernel) and not any(causal) and rng.random() < 0.8
    if ndim == 2 and np.prod(spatial) > 300:  # keep the float64 reference quick
        dilation = (1, 1)
        spatial = tuple(k + int(rng.integers(0, 4)) for k in kernel)
    return Case(spatial, kernel, stride, dilation, causal, int(HEAD_DIMS[seed % len(HEAD_DIMS)]), DTYPES[seed % 3],
                rpb, bool(rng.random() < 0.4), int(rng.integers(1, 3)), int(rng.integers(1, 3)))


CASES = [_random_case(s) for s in range(24)] + [
    # 1D kernels past 64 (the key box spans several chunks), with and without bias
    Case((70,), (65,), (1,), (1,), (False,), 32, "float32", rpb=True),
    Case((140,), (67,), (5,), (2,), (False,), 16, "bfloat16", heads=1),
    Case((80,), (66,), (3,), (1,), (True,), 64, "float16"),
    # an empty tile of a shorter dilation group (group 0 holds 65 queries, group 1 64)
    Case((129,), (5,), (1,), (2,), (False,), 32, "float32", rpb=True),
    # 2D: k = 13, blocked attention (s = k), every causal combination
    Case((19, 17), (13, 13), (1, 1), (1, 1), (False, False), 32, "float32", rpb=True),
    Case((20, 15), (5, 5), (5, 5), (1, 1), (False, False), 64, "float16", rpb=True, heads_first=True),
    Case((13, 14), (4, 6), (3, 2), (2, 2), (True, False), 64, "bfloat16", batch=2),
    Case((11, 9), (3, 3), (2, 3), (1, 1), (False, True), 128, "float32", heads_first=True, rpb=False),
    Case((12, 10), (3, 5), (1, 2), (1, 2), (True, True), 16, "float16", batch=2, heads=3),
    Case((21, 26), (5, 7), (2, 3), (4, 3), (False, False), 24, "bfloat16", heads_first=True, rpb=True),
    Case((9, 10), (3, 3), (1, 1), (3, 3), (False, False), 128, "float16", rpb=True),
    Case((17, 7), (7, 2), (7, 1), (2, 1), (False, True), 33, "float32", batch=2),
    # the 256 bucket (a warp per query / key): full and odd head dims, bias, strides, causal
    Case((30,), (7,), (2,), (2,), (False,), 256, "float16", rpb=True),
    Case((9, 8), (3, 5), (1, 2), (1, 1), (False, True), 200, "float32", heads_first=True),
    Case((10, 9), (5, 3), (1, 1), (1, 2), (False, False), 256, "bfloat16", rpb=True, batch=2),
    # head dim 128 in each fp16/bf16 layout the random cases leave out (every tensor-core instantiation)
    Case((150,), (33,), (1,), (1,), (False,), 128, "bfloat16", rpb=True),
    Case((90,), (17,), (2,), (1,), (True,), 100, "float16"),
    Case((12, 14), (5, 7), (1, 1), (1, 2), (False, True), 128, "bfloat16", heads=1),
    # 1D windows wider than a 64-key tile plus a query chunk: the dK/dV kernels' chunks where every query
    # sees every key (the wgmma kernel skips the window test there), at 64 and 32 queries a chunk
    Case((300,), (161,), (1,), (1,), (False,), 64, "bfloat16"),
    Case((260,), (97,), (1,), (2,), (True,), 128, "float16"),
    # a bias with windows wide enough that a warpgroup of the two-warpgroup wgmma dq skips chunks holding keys
    # at bias offsets of its queries (its ds there must be zero)
    Case((200,), (65,), (1,), (1,), (False,), 32, "bfloat16", rpb=True),
]


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    (q, k, v, g), (q64, k64, v64, g64) = make_inputs(rng, case.shape, TORCH_DTYPES[case.dtype], 4)
    rpb = rpb64 = None
    if case.rpb:
        (rpb,), (rpb64,) = make_inputs(rng, (case.heads, *(2 * n - 1 for n in case.kernel_size)), torch.float32)
    return (q, k, v, g, rpb), tuple(None if a is None else torch.from_numpy(a) for a in (q64, k64, v64, g64, rpb64))


def _window(case: Case):
    return dict(kernel_size=case.kernel_size, stride=case.stride, dilation=case.dilation, is_causal=case.causal)


def _forward(case: Case, q64, k64, v64, rpb64):
    """out (the tested dtype) and lse (float32) of the float64 reference forward."""
    fn = getattr(na_rtc, f"na{case.ndim}d")
    out64, lse64 = fn(q64, k64, v64, **_window(case), rpb=rpb64, return_lse=True, backend="reference")
    return out64.to(TORCH_DTYPES[case.dtype]), lse64.float()


def _run(case: Case, run=emulated.run, seed: int = 0, tensor_cores=False, wgmma=False):
    (q, k, v, g, rpb), (q64, k64, v64, g64, rpb64) = _inputs(case, seed)
    out, lse = _forward(case, q64, k64, v64, rpb64)
    if case.heads_first:
        q, k, v, g, out = (noncontiguous(a) for a in (q, k, v, g, out))
        lse = lse.movedim(-1, 1).contiguous().movedim(1, -1)  # heads-first rows too
    problem = _args.fused_problem(case.ndim, q, k, v, case.kernel_size, case.stride, case.dilation, case.causal,
                                  None, rpb)
    kernels = Dispatcher(run, kernel_policy(tensor_cores, wgmma))
    assert kernels.choose("backward", problem).path is not None
    grads = kernels.backward(problem, g, q, k, v, rpb, out, lse)
    return problem, kernels, grads, (q64, k64, v64, g64, rpb64)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_backward_matches_reference(case):
    assert_backward_matches_reference(case)


def assert_backward_matches_reference(case: Case):
    """dq, dk, dv (and drpb) of the SIMT backward against the float64 reference backward."""
    run = RecordingExecutor()
    problem, kernels, (dq, dk, dv, drpb), (q64, k64, v64, g64, rpb64) = _run(case, run)
    assert tuple(run.names) == kernels.choose("backward", problem).kernels
    assert all(name in registry.for_rank("fused_bwd", case.ndim).names for name in run.names)
    bwd = getattr(na_rtc, f"na{case.ndim}d_backward")
    ref = bwd(g64, q64, k64, v64, **_window(case), rpb=rpb64, backend="reference")
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert got.dtype == TORCH_DTYPES[case.dtype] and tuple(got.shape) == case.shape
        assert_close(got, want, case.dtype, "grad", name)
    if case.rpb:
        assert drpb.dtype == torch.float32 and tuple(drpb.shape) == tuple(ref[3].shape)
        assert_close(drpb, ref[3], case.dtype, "grad", "drpb")
    else:
        assert drpb is None and ref[3] is None


def _bits(x):
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32).numpy()


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[24 + 5], CASES[24 + 9]], ids=str)
def test_fused_backward_is_deterministic(case):
    first = _run(case)[2]
    second = _run(case)[2]
    for a, b in zip(first, second):
        if a is None:
            assert b is None
        else:
            assert np.array_equal(_bits(a), _bits(b))


def test_covers():
    kernels = Dispatcher(emulated.run, kernel_policy())

    def choice(q, *window):
        return kernels.choose("backward", _args.fused_problem(1, q, q, q, 5, *window, None, None))

    float64 = choice(torch.zeros(1, 20, 2, 32, dtype=torch.float64), 1, 1, False)
    assert float64.path is None and "float64" in dict(float64.skipped)["simt"]
    wide = choice(torch.zeros(1, 20, 2, 260), 1, 1, False)  # head dim > 256
    assert wide.path is None and wide.kernels == () and "head_dim 260" in dict(wide.skipped)["simt"]
    assert choice(torch.zeros(1, 20, 2, 128, dtype=torch.bfloat16), 3, 2, True).path == "simt"


def test_family_lists_every_table_entry():
    for (ndim, hd, dtype), cfg in fused_bwd.TABLE.items():
        names = registry.for_rank("fused_bwd", ndim).names  # 3D: the twin's
        assert fused_bwd.dq_name(dtype, hd, cfg["dq"]) in names
        assert fused_bwd.dkdv_name(dtype, hd, cfg["dkdv"]) in names
        assert len(cfg["dq"]) == len(cfg["dkdv"]) == max(ndim, 2) + 1  # the tile, then the chunk
        assert math.prod(cfg["dq"][:-1]) <= fused_bwd.THREADS and math.prod(cfg["dkdv"][:-1]) <= fused_bwd.THREADS


def test_numpy_inputs():
    """NumPy arrays (fp16, bias) run through the same plans; outputs are NumPy."""
    rng = np.random.default_rng(5)
    shape, kernel = (2, 23, 3, 20), 7
    (q, k, v, g), (q64, k64, v64, g64) = make_inputs(rng, shape, np.float16, 4)
    (rpb,), (rpb64,) = make_inputs(rng, (3, 13), np.float32)
    out64, lse64 = na_rtc.na1d(q64, k64, v64, kernel, 2, 3, rpb=rpb64, return_lse=True, backend="reference")
    problem = _args.fused_problem(1, q, k, v, kernel, 2, 3, False, None, rpb)
    dq, dk, dv, drpb = Dispatcher(emulated.run, kernel_policy()).backward(problem, g, q, k, v, rpb,
                                                                         out64.astype(np.float16),
                                                                         lse64.astype(np.float32))
    ref = na_rtc.na1d_backward(g64, q64, k64, v64, kernel, 2, 3, rpb=rpb64, backend="reference")
    for name, got, want in zip(("dq", "dk", "dv", "drpb"), (dq, dk, dv, drpb), ref):
        assert isinstance(got, np.ndarray)
        assert_close(got, want, "float16", "grad", name)
