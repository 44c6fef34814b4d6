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
* run-to-run determinism (bitwise), NaN propagation (the fused rule of
  tests/test_fused.py and tests/test_nonfinite.py), offsets past 2^31
  (tests/test_scale.py);
* the twins' tables, names and the dispatcher's choice.

The kernels are driven through the dispatcher, as the 1D/2D family tests do
(tests/test_fused.py, tests/test_fused_bwd.py, whose helpers these reuse).
GPU-marked twins run the sweeps on the ``cuda`` executor.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import test_fused
import test_fused_bwd
import test_gpu_sweeps
import test_nonfinite
import test_scale
from helpers import RecordingExecutor, assert_close, kernel_policy, sweep_inputs
from test_fused import Config
from test_fused_bwd import Case

import na_rtc
from na_rtc import _args, config
from na_rtc.runtime import emulated, registry
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused, fused_bwd
from na_rtc.runtime.policy import Policy

HERE = Path(__file__).resolve().parent
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


# ---------------------------------------------------------------- determinism, non-finite inputs, large offsets


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


NONFINITE = dict(spatial=(6, 7, 7), kernel_size=(3, 3, 3), dilation=(1, 2, 1), is_causal=(True, False, False))


@needs_emulator
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("poisoned", ["key", "value"])
def test_backward_poisons_exactly_what_depends_on_the_nan(poisoned):
    """tests/test_nonfinite.py's rule in 3D: dq of the queries that see the NaN, dk of every key they see, dv of
    those keys for a NaN key; the other head stays finite."""
    (q, k, v), token = test_nonfinite._poisoned_inputs(NONFINITE, np.nan, poisoned)
    grad_out = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
    window = test_nonfinite._window(NONFINITE)
    problem = _args.fused_problem(3, q, k, v, window["kernel_size"], 1, window["dilation"], window["is_causal"],
                                  None, None)
    kernels = Dispatcher(emulated.run, kernel_policy())
    out, lse = kernels.forward(problem, q, k, v, None)
    dq, dk, dv, _ = kernels.backward(problem, grad_out, q, k, v, None, out, lse)
    queries = test_nonfinite._seen_by(NONFINITE, token)
    keys = test_nonfinite._seen_by_any(NONFINITE, queries)
    assert queries.any() and not keys.all()
    expected = {"dq": queries, "dk": keys, "dv": keys if poisoned == "key" else np.zeros_like(keys)}
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        np.testing.assert_array_equal(~np.isfinite(grad[0, ..., 1, :]).all(-1), expected[name], err_msg=name)
        assert np.isfinite(grad[0, ..., 0, :]).all(), name


def run_offsets_case() -> None:
    """Forward and backward (fp32, bias) on inputs whose batch 1 starts past 2^31 elements, against the reference
    on compact copies (raises on a mismatch; a wrapped 32-bit offset reads outside the mapping and crashes)."""
    shape, kernel = (2, 5, 4, 6, 2, 8), (3, 3, 3)
    keep, (q, k, v, g) = test_scale.sparse_inputs(4, shape, "float32")
    assert q.strides[0] // q.itemsize > 2**31
    rpb = np.random.default_rng(2).standard_normal((2, 5, 5, 5)).astype(np.float32)
    problem = _args.fused_problem(3, q, k, v, kernel, 1, 1, False, None, rpb)
    kernels = Dispatcher(emulated.run, kernel_policy())
    out, lse = kernels.forward(problem, q, k, v, rpb)
    grads = kernels.backward(problem, g, q, k, v, rpb, out, lse)
    compact = [np.ascontiguousarray(x) for x in (q, k, v, g)]
    want_out, want_lse = na_rtc.na3d(*compact[:3], kernel, rpb=rpb, return_lse=True, backend="reference")
    want = na_rtc.na3d_backward(compact[3], *compact[:3], kernel, rpb=rpb, backend="reference")
    assert_close(out, want_out, "float32", "forward", "out")
    assert_close(lse, want_lse, "float32", "forward", "lse")
    for name, got, expected in zip(("dq", "dk", "dv", "drpb"), grads, want):
        assert_close(got, expected, "float32", "grad", name)
    del keep


@needs_emulator
@test_scale.needs_mapping
def test_offsets_past_2_to_the_31():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import test_fused_3d
        test_fused_3d.run_offsets_case()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"exit status {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


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
