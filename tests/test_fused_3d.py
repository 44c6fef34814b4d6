"""The fused SIMT kernels in 3D: the ``fused_3d`` and ``fused_bwd_3d`` twins of ``cuda_src/na_fused.cu`` and
``cuda_src/na_fused_bwd.cu``, through the emulator.

* forward (out, lse) and backward (dq, dk, dv, drpb) against the float64
  reference over seeded sweeps: odd and even kernels, dilation 1 to 3,
  stride 1 to k (the SIMT kernels are the 3D fused path with stride), causal
  per axis, rpb, scale, every head-dim bucket and odd head dims, fp32 / fp16 /
  bf16, heads-first views, batch and heads > 1, sizes that are not tile
  multiples. ``NA_RTC_SWEEP=small`` draws few configurations that still show
  every value of every swept dimension (a test checks it); ``large`` many;
* typical video windows (7x7x7, (3, 7, 7), (5, 7, 7), dilation 2) with a bias:
  key boxes of many chunks, bias partials within the dq kernel's shared memory;
* run-to-run determinism (bitwise) and the fused kernels' NaN rule of
  tests/test_fused.py (tests/test_nonfinite.py and tests/test_scale.py hold
  the 3D fused path, these kernels, to exact NaN reach and offsets past 2^31
  through na3d);
* the twins' tables, names and the dispatcher's choice.

The kernels are driven through the dispatcher, as the 1D/2D family tests do
(tests/test_fused.py, tests/test_fused_bwd.py, whose helpers these reuse), and
through na3d on the emulator backend. GPU-marked twins run the sweeps through
na3d on the ``cuda`` backend (tests/test_gpu_sweeps.py's checks).
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
import test_fused
import test_fused_bwd
import test_gpu_sweeps
from helpers import RecordingExecutor, assert_close, sweep_inputs
from test_fused import Config
from test_fused_bwd import Case

import na_rtc
from na_rtc import _args, config
from na_rtc.runtime import registry
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused, fused_bwd
from na_rtc.runtime.policy import Policy

needs_emulator = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                    reason="emulator needs a C++ compiler")


def on_gpu_marks(test):
    """The marks of tests/test_gpu_sweeps.py: ``gpu``, skipped without a usable GPU."""
    no_gpu = not na_rtc.backends.get("cuda").probe()[0]
    return pytest.mark.gpu(pytest.mark.skipif(no_gpu, reason="no usable GPU")(test))


DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (16, 32, 64, 128, 40, 256, 200)  # every bucket (32, 64, 128, 256), full and odd
CAUSAL = tuple(itertools.product((False, True), repeat=3))
SMALL = config.sweep_size() == "small"


# ---------------------------------------------------------------- the sweeps


def _draw(rng, seed: int, kmax: int, tokens: int):
    """A window and sizes of sweep draw ``seed``: the causal combination, dtype and head dim cycle with the seed
    (so a few draws show them all), kernels, strides, dilations and sizes are random, at most ``tokens``."""
    causal = CAUSAL[seed % len(CAUSAL)]
    while True:
        kernel = tuple(int(rng.integers(2, kmax + 1)) for _ in range(3))
        dilation = tuple(int(rng.integers(1, 4)) for _ in range(3))
        spatial = tuple(k * d + int(rng.integers(0, 4)) for k, d in zip(kernel, dilation))
        if math.prod(spatial) <= tokens:  # keep the emulator and the float64 reference quick
            break
    stride = tuple(int(rng.integers(1, k + 1)) for k in kernel)
    rpb = all(k % 2 for k in kernel) and not any(causal) and rng.random() < 0.8
    return dict(spatial=spatial, kernel_size=kernel, dilation=dilation, causal=causal, stride=stride, rpb=bool(rpb),
                heads_first=bool(rng.random() < 0.4), batch=int(rng.integers(1, 3)), heads=int(rng.integers(1, 3)),
                dtype=DTYPES[seed % 3], head_dim=HEAD_DIMS[seed % len(HEAD_DIMS)])


def forward_config(seed: int) -> Config:
    rng = np.random.default_rng(7300 + seed)
    draw = _draw(rng, seed, 5, 900)
    return Config(scale=None if rng.random() < 0.7 else 0.3, **draw)


def backward_case(seed: int) -> Case:
    return Case(**_draw(np.random.default_rng(7700 + seed), seed, 4, 500))


#: typical video windows (time first): a bias, the key box many chunks long, dilation 2
VIDEO = [
    dict(spatial=(8, 9, 10), kernel_size=(7, 7, 7), stride=(1, 1, 1), dilation=(1, 1, 1), causal=(False,) * 3,
         rpb=True, head_dim=64, dtype="float16"),
    dict(spatial=(6, 15, 14), kernel_size=(3, 7, 7), stride=(1, 1, 1), dilation=(2, 2, 2), causal=(False,) * 3,
         rpb=True, head_dim=32, dtype="float32"),
    dict(spatial=(7, 9, 8), kernel_size=(5, 7, 7), stride=(1, 2, 2), dilation=(1, 1, 1), causal=(True, False, False),
         rpb=False, head_dim=128, dtype="bfloat16", heads_first=True),
]

FORWARD = [forward_config(s) for s in range(24 if SMALL else 200)] + [
    Config(**dict(v, heads_first=v.get("heads_first", False), batch=1, heads=2)) for v in VIDEO] + [
    # blocked attention (stride = kernel) with even kernels and an empty tile of a shorter dilation group (x:
    # groups of 5 and 4 queries, two 4-query tiles each), all axes causal, the largest head dim
    Config((9, 6, 9), (4, 2, 3), (2, 1, 1), (False, False, False), 2, 1, 32, False, False, "float32", (4, 2, 3)),
    Config((9, 7, 11), (3, 3, 3), (3, 1, 2), (True, True, True), 1, 2, 64, False, True, "float16", (2, 3, 1)),
    Config((5, 5, 5), (5, 5, 5), (1, 1, 1), (False, False, False), 1, 1, 256, True, False, "bfloat16", (1, 1, 1)),
]
BACKWARD = [backward_case(s) for s in range(16 if SMALL else 150)] + [Case(**v) for v in VIDEO] + [
    Case((9, 6, 9), (4, 2, 3), (4, 2, 3), (2, 1, 1), (False, False, False), 32, "bfloat16", batch=2),
    Case((9, 7, 11), (3, 3, 3), (2, 3, 1), (3, 1, 2), (True, True, True), 64, "float16", heads_first=True),
    Case((7, 6, 8), (3, 5, 3), (1, 1, 1), (2, 1, 2), (False, False, False), 256, "float32", rpb=True),
    Case((6, 5, 7), (3, 3, 5), (3, 1, 2), (1, 1, 1), (False, False, False), 200, "bfloat16", rpb=True, heads=3),
]


def _seen(configs, *fields) -> set:
    return {getattr(c, f) for c in configs for f in fields}


@pytest.mark.parametrize("configs", [FORWARD, BACKWARD], ids=["forward", "backward"])
def test_the_sweeps_show_every_value(configs):
    """Even the small sweep holds every value of every swept dimension at least once."""
    assert _seen(configs, "dtype") == set(DTYPES)
    assert {fused.head_dim_bucket(c.head_dim) for c in configs} == set(fused.HEAD_DIMS)
    assert any(c.head_dim not in fused.HEAD_DIMS for c in configs)  # a head dim below its bucket
    for axis in range(3):
        assert {c.causal[axis] for c in configs} == {False, True}
        assert {c.dilation[axis] for c in configs} == {1, 2, 3}
        assert {c.kernel_size[axis] % 2 for c in configs} == {0, 1}
        assert {c.stride[axis] > 1 for c in configs} == {False, True}
        assert any(c.stride[axis] == c.kernel_size[axis] for c in configs)
    assert {c.causal for c in configs} >= {(True, False, False), (True, True, True), (False, False, False)}
    for field in ("rpb", "heads_first"):
        assert _seen(configs, field) == {False, True}
    assert _seen(configs, "batch") >= {1, 2} and _seen(configs, "heads") >= {1, 2}
    # sizes that are not tile multiples (the forward's tiles; the backward's are no larger)
    assert any(n % t for c in configs for n, t in zip(c.spatial, fused.TILES[3, fused.head_dim_bucket(c.head_dim),
                                                                            c.dtype]))


# ---------------------------------------------------------------- against the float64 reference


@needs_emulator
@pytest.mark.parametrize("cfg", FORWARD, ids=str)
def test_forward_matches_reference(cfg):
    recorder = RecordingExecutor()
    out, lse = test_fused._run(cfg, recorder)
    assert len(recorder.names) == 1 and recorder.names[0] in registry.get("fused_3d").names
    test_fused.assert_forward_matches_reference(cfg, out, lse)


@needs_emulator
@pytest.mark.parametrize("case", BACKWARD, ids=str)
def test_backward_matches_reference(case):
    test_fused_bwd.assert_backward_matches_reference(case)


@needs_emulator
def test_full_kernel_is_full_attention():
    cfg = Config((4, 5, 3), (4, 5, 3), (1, 1, 1), (False,) * 3, 1, 2, 48, False, True, "float32", (1, 1, 1))
    out, lse = test_fused._run(cfg)
    _, (q64, k64, v64) = sweep_inputs(cfg, 3)
    q, k, v = (torch.from_numpy(a).reshape(1, -1, 2, 48).transpose(1, 2) for a in (q64, k64, v64))
    logits = (q @ k.transpose(-1, -2)) * 48**-0.5
    assert_close(out, (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(cfg.shape), "float32", "forward", "out")
    assert_close(lse, torch.logsumexp(logits, -1).transpose(1, 2).reshape(cfg.shape[:-1]), "float32", "forward",
                 "lse")


#: through the public API: float32 (the tensor-core kernels take float16 / bfloat16 where they serve), strides
API_CASES = [
    Case((7, 8, 9), (3, 5, 3), (2, 1, 3), (1, 1, 1), (False, False, False), 32, "float32", rpb=True),
    Case((9, 7, 8), (3, 3, 4), (1, 2, 2), (2, 1, 1), (True, False, True), 64, "float32", heads_first=True),
]


@needs_emulator
@pytest.mark.parametrize("case", API_CASES, ids=str)
def test_na3d_on_the_emulator_backend_runs_these_kernels(case):
    (q, k, v, g, rpb), (q64, k64, v64, g64, rpb64) = test_fused_bwd._inputs(case)
    window = test_fused_bwd._window(case)
    text = str(na_rtc.explain("na3d", q, k, v, **window, rpb=rpb, backward=True, backend="emulator"))
    assert "forward: simt" in text and "backward: simt" in text, text
    out, lse = na_rtc.na3d(q, k, v, **window, rpb=rpb, return_lse=True, backend="emulator")
    want_out, want_lse = na_rtc.na3d(q64, k64, v64, **window, rpb=rpb64, return_lse=True, backend="reference")
    assert_close(out, want_out, case.dtype, "forward", "out")
    assert_close(lse, want_lse, case.dtype, "forward", "lse")
    got = na_rtc.na3d_backward(g, q, k, v, **window, rpb=rpb, backend="emulator")
    want = na_rtc.na3d_backward(g64, q64, k64, v64, **window, rpb=rpb64, backend="reference")
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want):
        assert (a is None) == (b is None), name
        if b is not None:
            assert_close(a, b, case.dtype, "grad", name)


# ---------------------------------------------------------------- determinism, non-finite inputs


def _bits(x):
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)


@needs_emulator
def test_forward_and_backward_are_deterministic():
    cfg = next(c for c in FORWARD if c.rpb)
    for a, b in zip(test_fused._run(cfg), test_fused._run(cfg)):
        assert torch.equal(_bits(a), _bits(b))
    case = next(c for c in BACKWARD if c.rpb)
    for a, b in zip(test_fused_bwd._run(case)[2], test_fused_bwd._run(case)[2]):
        assert torch.equal(_bits(a), _bits(b))


@needs_emulator
def test_nan_key_poisons_its_queries_only():
    cfg = Config((9, 10, 11), (3, 5, 3), (1, 2, 1), (True, False, False), 1, 1, 32, False, False, "float32",
                 (1, 2, 1))
    test_fused.assert_nan_key_poisons_its_queries_only(cfg, (4, 5, 6))


# ---------------------------------------------------------------- the tables, the twins, the choice


def test_the_twins_mirror_their_families():
    for name in ("fused", "fused_bwd"):
        base, twin = registry.get(name), registry.get(name + registry.RANK3_SUFFIX)
        assert registry.for_rank(name, 3) is twin and twin.ranks == frozenset({3}) and base.ranks == {1, 2}
        assert set(twin.roles) == set(base.roles) and twin.source == base.source
        rank3 = re.compile(r", 3(, \d+)?>$")  # the trailing RANK (and TZ) template arguments
        assert all(rank3.search(n) or n == fused_bwd.RPB_REDUCE_3D for n in twin.names)
        assert not any(rank3.search(n) for n in base.names)
    # every dtype and head-dim bucket the 2D families cover, the 3D twins cover
    for table in (fused.TILES, fused_bwd.TABLE):
        assert {key[1:] for key in table if key[0] == 3} == {key[1:] for key in table if key[0] == 2}


def _problem(spatial, kernel, head_dim, dtype, *, rpb=False, stride=1):
    q = torch.empty((1, *spatial, 2, head_dim), dtype=getattr(torch, dtype))
    bias = torch.empty((2, *(2 * k - 1 for k in kernel)), dtype=torch.float32) if rpb else None
    return _args.fused_problem(3, q, q, q, kernel, stride, 1, False, None, bias)


@pytest.mark.parametrize("dtype, head_dim, forward, dq", [
    ("float32", 32, "na_fused_fwd<float, 32, 4, 4, 3, 4>", "na_fused_bwd_dq<float, 32, 4, 4, 32, 3, 4>"),
    ("float16", 64, "na_fused_fwd<fp16_t, 64, 2, 4, 3, 4>", "na_fused_bwd_dq<fp16_t, 64, 4, 4, 32, 3, 4>"),
    ("bfloat16", 100, "na_fused_fwd<bf16_t, 128, 2, 2, 3, 4>", "na_fused_bwd_dq<bf16_t, 128, 2, 4, 32, 3, 4>"),
    ("float32", 256, "na_fused_fwd<float, 256, 2, 2, 3, 2>", "na_fused_bwd_dq<float, 256, 2, 2, 8, 3, 2>"),
])
def test_choice_and_kernel_names(dtype, head_dim, forward, dq):
    kernels = Dispatcher(None, Policy.of())
    problem = _problem((9, 9, 9), (3, 5, 7), head_dim, dtype, stride=2)
    assert kernels.choose("forward", problem).kernels == (forward,)
    backward = kernels.choose("backward", problem)
    assert backward.path == "simt" and backward.kernels[:2] == (fused_bwd.delta_name(dtype, 3), dq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("kernel", [(7, 7, 7), (3, 7, 7), (5, 7, 7)])
def test_video_windows_with_a_bias_fit_the_backward(kernel, head_dim, dtype):
    """The dq kernel keeps a bias table's partials in shared memory: typical video windows fit every
    configuration; an 11x11x11 window's 9261 entries do not, and the rule says so (the split kernels serve
    it)."""
    kernels = Dispatcher(None, Policy.of())
    assert kernels.choose("backward", _problem((9, 9, 9), kernel, head_dim, dtype, rpb=True)).path == "simt"
    too_big = kernels.choose("backward", _problem((11, 11, 11), (11, 11, 11), head_dim, dtype, rpb=True))
    assert too_big.path != "simt" and "shared memory" in dict(too_big.skipped)["simt"]


def test_beyond_the_grid_limit_the_kernels_step_aside():
    q = np.broadcast_to(np.zeros((1, 8, 8, 8, 4, 32), np.float16), (2**27, 8, 8, 8, 4, 32))  # no memory
    problem = _args.fused_problem(3, q, q, q, 3, 1, 1, False, None, None)
    choice = Dispatcher(None, Policy.of()).choose("forward", problem)
    assert choice.path != "simt" and "more than CUDA's grid limit" in dict(choice.skipped)["simt"]


# ---------------------------------------------------------------- the same on a GPU
# tests/test_gpu_sweeps.py's checks (the public API on the cuda backend against the float64 reference) on
# the 3D sweeps


@pytest.mark.parametrize("cfg", FORWARD, ids=str)
@on_gpu_marks
def test_forward_on_gpu(cfg):
    test_gpu_sweeps.test_fused_forward_on_gpu(cfg)


@pytest.mark.parametrize("case", BACKWARD, ids=str)
@on_gpu_marks
def test_backward_on_gpu(case):
    test_gpu_sweeps.test_fused_backward_on_gpu(case)
