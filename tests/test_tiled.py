"""The tiled split-op forward kernels (``cuda_src/na_tiled.cu``) through the emulator.

* against the float64 reference over a seeded sweep (1D/2D, kernel sizes 3 to
  13 and 63, odd and even, dilation 1 to 4, causal per axis, rpb, scale,
  fill, head dims 16 to 128 and odd buckets, fp32/fp16/bf16, heads-first
  views, sizes that are not multiples of the tile), with the
  tolerances of docs/design/testing.md#tolerances;
* against the naive kernels bit for bit (same accumulation order, same
  compiler);
* the dispatcher's choice: tiled where a tiled kernel covers the problem,
  naive otherwise, and the kernel launched is the one ``choice`` names;
* run-to-run determinism.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import assert_close, misaligned_copy, RecordingExecutor, SweepConfig, sweep_bias, sweep_inputs

import na_rtc
from na_rtc import _args
from na_rtc.runtime import emulated, registry
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import tiled
from na_rtc.runtime.policy import Policy
from na_rtc.runtime.tiling import CTYPES

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")

DTYPES = ["float32", "float16", "bfloat16"]
HEAD_DIMS = [16, 32, 64, 128, 24, 40]


Recorder = RecordingExecutor


Config = SweepConfig



def _problem(cfg: Config, q):
    return _args.qk_problem(cfg.ndim, q, q, cfg.kernel_size, cfg.dilation, cfg.causal, None)


def _covered(cfg: Config) -> bool:
    """Every op of the sweep (qk, av with weights in the element or accumulator dtype) runs tiled."""
    q = torch.empty(cfg.shape, dtype=getattr(torch, cfg.dtype))
    problem, k = _problem(cfg, q), Dispatcher(emulated.run)
    ops = [("qk", cfg.dtype), ("qk", "float32"), ("av", cfg.dtype), ("av", "float32")]
    return all(k.choose(op, problem, w).path == "tiled" for op, w in ops)


def random_config(seed: int) -> Config:
    rng = np.random.default_rng(2000 + seed)
    ndim, dtype, head_dim = 1 + seed % 2, DTYPES[(seed // 2) % 3], HEAD_DIMS[seed % len(HEAD_DIMS)]
    while True:
        kernel = tuple(int(rng.integers(3, 14)) for _ in range(ndim))
        dilation = tuple(int(rng.integers(1, 5)) for _ in range(ndim))
        if ndim == 2 and math.prod(k * d for k, d in zip(kernel, dilation)) > 400:
            continue  # keep the emulator quick
        spatial = tuple(k * d + int(rng.integers(0, 9)) for k, d in zip(kernel, dilation))
        causal = tuple(bool(rng.random() < 0.3) for _ in range(ndim))
        rpb = all(k % 2 for k in kernel) and not any(causal) and rng.random() < 0.7
        cfg = Config(spatial, kernel, dilation, causal, int(rng.integers(1, 3)), int(rng.integers(1, 3)),
                     head_dim, bool(rpb), bool(rng.random() < 0.4), dtype)
        if _covered(cfg):
            return cfg


CONFIGS = [random_config(seed) for seed in range(24)]
# corners a random draw may miss: a large 1D kernel, even kernels, causal on both axes,
# a tile-sized group split by dilation, an odd head dim in the largest bucket
CONFIGS += [
    Config((70,), (63,), (1,), (False,), 1, 2, 16, True, False, "float32"),
    Config((200,), (63,), (3,), (True,), 1, 1, 32, False, True, "bfloat16"),
    Config((131,), (8,), (1,), (False,), 2, 1, 64, False, True, "float16"),
    Config((19, 21), (4, 6), (2, 3), (True, True), 1, 2, 40, False, False, "float32"),
    Config((17, 9), (3, 5), (4, 1), (False, True), 1, 1, 128, False, True, "float16"),
    Config((9, 10), (5, 5), (1, 1), (False, False), 2, 1, 100, True, False, "bfloat16"),
]
assert all(_covered(cfg) for cfg in CONFIGS)


def _reference(cfg: Config, op: str):
    fn = {("qk", 1): na_rtc.na1d_qk, ("qk", 2): na_rtc.na2d_qk, ("av", 1): na_rtc.na1d_av, ("av", 2): na_rtc.na2d_av}
    window = dict(kernel_size=cfg.kernel_size, dilation=cfg.dilation, is_causal=cfg.causal)
    return lambda *arrays, **kw: fn[op, cfg.ndim](*arrays, **window, **kw, backend="reference")


def _qk_variants(cfg: Config):
    """(out dtype, scale, fill, with rpb): the split op's logits, the fused path's scaled
    logits in the accumulator dtype, and the backward's gradient-shaped product (fill 0)."""
    return [(cfg.dtype, 1.0, -math.inf, cfg.rpb), ("float32", cfg.head_dim**-0.5, -math.inf, cfg.rpb),
            ("float32", 1.0, 0.0, False)]


def _qk_both(cfg: Config):
    """For every qk variant: (variant, tiled logits, naive logits, kernel names launched tiled)."""
    (q, k), _ = sweep_inputs(cfg, 2, cfg.shape)
    bias, _ = sweep_bias(cfg)
    problem, recorder = _problem(cfg, q), Recorder()
    tiled_kernels, naive_kernels = Dispatcher(recorder), Dispatcher(emulated.run, Policy.of(tiled=False))
    for variant in _qk_variants(cfg):
        out_dtype, scale, fill, with_rpb = variant
        b = bias if with_rpb else None
        got = tiled_kernels.qk(problem, q, k, b, out_dtype, scale, fill)
        yield variant, got, naive_kernels.qk(problem, q, k, b, out_dtype, scale, fill), recorder.names[-1]


def _av_both(cfg: Config):
    """For weights in the element and the accumulator dtype: (weights dtype, tiled, naive, kernel)."""
    slots = math.prod(cfg.kernel_size)
    (v,), _ = sweep_inputs(cfg, 1, cfg.shape)
    recorder = Recorder()
    tiled_kernels, naive_kernels = Dispatcher(recorder), Dispatcher(emulated.run, Policy.of(tiled=False))
    # the problem as the public op validates it (weights in the element dtype); the fused
    # path then passes float32 probabilities to the same problem
    problem = _args.av_problem(cfg.ndim, torch.empty((*cfg.shape[:-1], slots), dtype=v.dtype), v,
                               cfg.kernel_size, cfg.dilation, cfg.causal)
    for weights_dtype in (cfg.dtype, "float32"):
        (w,), _ = sweep_inputs(dataclasses.replace(cfg, dtype=weights_dtype), 1, (*cfg.shape[:-1], slots), seed=1)
        got = tiled_kernels.av(problem, w, v)
        yield weights_dtype, got, naive_kernels.av(problem, w, v), recorder.names[-1]


# ---------------------------------------------------------------- (a) against the float64 reference


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_tiled_qk_matches_reference(cfg):
    (_, _), (q64, k64) = sweep_inputs(cfg, 2, cfg.shape)
    _, bias64 = sweep_bias(cfg)
    reference = _reference(cfg, "qk")
    for (out_dtype, scale, fill, with_rpb), got, _, name in _qk_both(cfg):
        assert name.startswith("na_tiled_qk<"), name
        want = reference(q64 * scale, k64, rpb=bias64 if with_rpb else None)
        want = np.where(np.isneginf(want), fill, want)  # slots outside causal windows hold `fill`
        # the tolerance is the input dtype's: the float32 logits carry the inputs' rounding
        assert_close(got, want, cfg.dtype, "forward", f"attn ({out_dtype}, scale {scale:g}, fill {fill})")


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_tiled_av_matches_reference(cfg):
    slots = math.prod(cfg.kernel_size)
    (_,), (v64,) = sweep_inputs(cfg, 1, cfg.shape)
    reference = _reference(cfg, "av")
    for weights_dtype, got, _, name in _av_both(cfg):
        assert name.startswith("na_tiled_av<"), name
        _, (w64,) = sweep_inputs(dataclasses.replace(cfg, dtype=weights_dtype), 1, (*cfg.shape[:-1], slots), seed=1)
        assert_close(got, reference(w64, v64), cfg.dtype, "forward", f"av (weights {weights_dtype})")


# ---------------------------------------------------------------- (b) against the naive kernels, bit for bit


def _bits(x):
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=str)
def test_tiled_equals_naive_bit_for_bit(cfg):
    for variant, got, want, _ in _qk_both(cfg):
        assert torch.equal(_bits(got), _bits(want)), f"qk {variant}"
    for weights_dtype, got, want, _ in _av_both(cfg):
        assert torch.equal(_bits(got), _bits(want)), f"av weights {weights_dtype}"


# ---------------------------------------------------------------- (c) the dispatcher's choice


def _problem_of(ndim, dtype, head_dim, kernel, length=70, stride=1):
    shape = (1, *(length,) * ndim, 2, head_dim)
    q = torch.empty(shape, dtype=getattr(torch, dtype))
    problem = _args.qk_problem(ndim, q, q, kernel, 1, False, None)
    if stride != 1:  # split ops take no stride; the dispatcher must still refuse one
        problem = dataclasses.replace(problem, axes=tuple(dataclasses.replace(a, stride=stride) for a in problem.axes))
    return problem


CHOICES = [
    # ndim, dtype, head dim, kernel, op, weights dtype, expected kernel
    (1, "float32", 64, 7, "qk", None, "na_tiled_qk<float, float, 64, 64, 1>"),
    (1, "float32", 16, 13, "av", "float32", "na_tiled_av<float, float, 32, 64, 1>"),
    (1, "float16", 100, 9, "qk", "float32", "na_tiled_qk<fp16_t, float, 128, 32, 1>"),
    (1, "bfloat16", 64, 9, "av", "float32", "na_tiled_av<float, bf16_t, 64, 64, 1>"),
    (2, "float32", 32, 7, "qk", None, "na_tiled_qk<float, float, 32, 8, 8>"),
    (2, "float32", 64, 7, "qk", None, "na_tiled_qk<float, float, 64, 4, 4>"),
    (2, "float16", 64, 7, "av", None, "na_tiled_av<fp16_t, fp16_t, 64, 8, 8>"),
    (2, "bfloat16", 128, 5, "qk", None, "na_tiled_qk<bf16_t, bf16_t, 128, 4, 4>"),
    # 1D float32, head dim 64, tile 64: (64 + k - 1) rows of 65 floats fit 48 KiB up to k = 62
    (1, "float32", 64, 39, "qk", None, "na_tiled_qk<float, float, 64, 64, 1>"),
    (1, "float32", 64, 63, "qk", None, "na_qk_fwd<float, float>"),
    # 2D float32, head dim 128, tile 4x4: k = 7 needs (16 + 100) * 129 * 4 bytes > 48 KiB
    (2, "float32", 128, 7, "qk", None, "na_qk_fwd<float, float>"),
    (2, "float32", 128, 5, "qk", None, "na_tiled_qk<float, float, 128, 4, 4>"),
    # what no tiled kernel serves: float64, head dim > 128, foreign weights dtype
    (1, "float64", 32, 7, "qk", None, "na_qk_fwd<double, double>"),
    (2, "float64", 32, 3, "av", None, "na_av_fwd<double, double>"),
    (1, "float32", 129, 7, "qk", None, "na_qk_fwd<float, float>"),
    (2, "float16", 256, 3, "av", None, "na_av_fwd<fp16_t, fp16_t>"),
    (1, "float32", 32, 7, "av", "float64", "na_av_fwd<double, float>"),
]


@pytest.mark.parametrize("ndim, dtype, head_dim, kernel, op, weights, expected", CHOICES,
                         ids=[f"{c[0]}d-{c[1]}-D{c[2]}-k{c[3]}-{c[4]}-{c[6].split('<')[0]}" for c in CHOICES])
def test_choice(ndim, dtype, head_dim, kernel, op, weights, expected):
    problem = _problem_of(ndim, dtype, head_dim, kernel)
    choice = Dispatcher(emulated.run).choose(op, problem, weights or dtype)
    assert choice.kernels == (expected,) and choice.path == ("tiled" if expected.startswith("na_tiled_") else
                                                              "straightforward")


def test_choice_refuses_stride():
    problem = _problem_of(2, "float32", 32, 5, stride=2)
    choice = Dispatcher(emulated.run).choose("qk", problem)
    assert choice.kernels == ("na_qk_fwd<float, float>",)
    assert choice.skipped == (("tiled", "stride > 1 (the split kernels take none)"),)


def test_shared_memory_of_the_choices_is_within_budget():
    for ndim, dtype, head_dim, kernel, op, weights, expected in CHOICES:
        problem = _problem_of(ndim, dtype, head_dim, kernel)
        hd = tiled.head_dim_bucket(head_dim)
        tile = tiled.TILES.get((ndim, hd, dtype))
        if tile is None or weights == "float64":  # no table entry, or a weights dtype no tiled kernel takes
            continue
        smem = tiled.shared_bytes(problem, op, tile, hd, weights or dtype)
        assert (smem <= tiled.SHARED_BUDGET) == expected.startswith("na_tiled_"), (expected, smem)


def test_table_and_family_agree():
    names = set(registry.get("tiled").names)
    for (ndim, hd, dtype), tile in tiled.TILES.items():
        assert hd in tiled.HEAD_DIMS and dtype != "float64"
        if ndim == 3:  # the 3D twin's (tests/test_split_3d.py)
            continue
        tx, ty = tile
        assert ty == 1 if ndim == 1 else ty > 1
        assert f"na_tiled_qk<{CTYPES[dtype]}, float, {hd}, {tx}, {ty}>" in names
    assert all(registry.get("tiled").launch_shared_bytes[n] == tiled.SHARED_BUDGET for n in names)


def test_fallback_launches_the_naive_kernel():
    recorder = Recorder()
    q = torch.randn(1, 10, 2, 130)
    problem = _args.qk_problem(1, q, q, 3, 1, False, None)
    kernels = Dispatcher(recorder)
    got = kernels.qk(problem, q, q, None, "float32", 1.0, -math.inf)
    assert recorder.names == list(kernels.choose("qk", problem).kernels) == ["na_qk_fwd<float, float>"]
    assert_close(got, na_rtc.na1d_qk(q.double(), q.double(), 3, backend="reference"), "float32", "forward")


# ---------------------------------------------------------------- (d) determinism


def test_tiled_is_deterministic():
    cfg = next(c for c in CONFIGS if c.ndim == 2 and c.rpb)
    first = [got for _, got, _, _ in _qk_both(cfg)] + [got for _, got, _, _ in _av_both(cfg)]
    second = [got for _, got, _, _ in _qk_both(cfg)] + [got for _, got, _, _ in _av_both(cfg)]
    for a, b in zip(first, second):
        assert torch.equal(_bits(a), _bits(b))


# ---------------------------------------------------------------- (e) 16-byte staging


@pytest.mark.parametrize("ndim, dtype, head_dim", [(1, "float16", 32), (2, "bfloat16", 64), (2, "float32", 24)])
def test_vector_and_element_staging_agree_bit_for_bit(ndim, dtype, head_dim):
    """Aligned rows are staged with 16-byte loads, misaligned ones element by element: same bits."""
    torch.manual_seed(7)
    shape = (2, *(13,) * ndim, 3, head_dim)
    q, k, v = (torch.randn(shape).to(getattr(torch, dtype)) for _ in range(3))
    qk, av = (getattr(na_rtc, f"na{ndim}d_{op}") for op in ("qk", "av"))
    problem = _args.qk_problem(ndim, q, k, 5, 1, False, None)
    assert Dispatcher(emulated.run).choose("qk", problem).kernels[0].startswith("na_tiled_qk")
    assert all(t.data_ptr() % 16 == 0 for t in (q, k, v))
    attn = torch.softmax(qk(q, k, 5, backend="emulator").float(), -1).to(q.dtype)
    aligned = (qk(q, k, 5, backend="emulator"), av(attn, v, 5, backend="emulator"))
    q2, k2, v2, attn2 = map(misaligned_copy, (q, k, v, attn))
    assert all(t.data_ptr() % 16 != 0 for t in (q2, k2, v2, attn2))
    element = (qk(q2, k2, 5, backend="emulator"), av(attn2, v2, 5, backend="emulator"))
    for a, b in zip(aligned, element):
        assert torch.equal(_bits(a), _bits(b))
