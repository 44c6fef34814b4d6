"""The fused forward kernel (``cuda_src/na_fused.cu``) through the emulator.

* output and logsumexp against the float64 reference over a seeded sweep
  (1D/2D, kernel sizes 2 to 13 in 2D and 2 to 65 in 1D plus a 1D k = 255,
  odd and even, stride 1 to k, dilation 1 to 4, every causal combination,
  rpb, scale, head dims 16 to 128 and an odd one, fp32/fp16/bf16, heads-first
  views, batch and heads > 1, sizes that are not multiples of the tile), with
  the tolerances of docs/design/testing.md#tolerances (``NA_RTC_SWEEP=large``: 400 draws);
* kernel size equal to the input size (non-causal) is full attention;
* run-to-run determinism (bitwise);
* a NaN key poisons every query whose window holds it, and no query of a
  tile that does not see it;
* the tile table, the family and the dispatcher's choice agree.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import assert_close, RecordingExecutor, SweepConfig, sweep_bias, sweep_inputs

import na_rtc
from na_rtc import _args, config
from na_rtc.runtime import emulated, registry, tiling
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused
from na_rtc.runtime.policy import Policy
from na_rtc.window import Axis

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")

DTYPES = ["float32", "float16", "bfloat16"]
HEAD_DIMS = [16, 32, 64, 128, 40]


@dataclasses.dataclass(frozen=True)
class Config(SweepConfig):
    stride: tuple = ()
    scale: float | None = None

    def __str__(self):
        strides = "s" + "x".join(str(s) for s in self.stride)
        scale = "" if self.scale is None else f"-scale{self.scale:g}"
        return f"{super().__str__()}-{strides}{scale}"


def random_config(seed: int) -> Config:
    rng = np.random.default_rng(5000 + seed)
    ndim, dtype, head_dim = 1 + seed % 2, DTYPES[(seed // 2) % 3], HEAD_DIMS[seed % len(HEAD_DIMS)]
    while True:
        high = 66 if ndim == 1 else 14
        kernel = tuple(int(rng.integers(2, high)) for _ in range(ndim))
        dilation = tuple(int(rng.integers(1, 5)) for _ in range(ndim))
        if ndim == 2 and math.prod(k * d for k, d in zip(kernel, dilation)) > 500:
            continue  # keep the emulator quick
        if ndim == 1 and kernel[0] * dilation[0] > 160:
            continue
        stride = tuple(int(rng.integers(1, k + 1)) for k in kernel)
        spatial = tuple(k * d + int(rng.integers(0, 12)) for k, d in zip(kernel, dilation))
        causal = tuple(bool(rng.random() < 0.4) for _ in range(ndim))
        rpb = all(k % 2 for k in kernel) and not any(causal) and rng.random() < 0.7
        scale = None if rng.random() < 0.7 else 0.3
        return Config(spatial, kernel, dilation, causal, int(rng.integers(1, 3)), int(rng.integers(1, 4)),
                      head_dim, bool(rpb), bool(rng.random() < 0.4), dtype, stride, scale)


CONFIGS = [random_config(seed) for seed in range(48 if config.sweep_size() == "small" else 400)]
# corners a random draw may miss: a very large 1D kernel, every causal combination in 2D,
# even kernels with strides, stride = kernel (blocked attention), the odd head dim in the
# largest bucket, a tile-sized group split by dilation, batch and heads > 1
CONFIGS += [
    Config((300,), (255,), (1,), (False,), 1, 2, 32, True, False, "float32", (1,)),
    Config((270,), (255,), (1,), (True,), 1, 1, 16, False, True, "bfloat16", (7,)),
    Config((131,), (64,), (2,), (False,), 2, 1, 64, False, True, "float16", (64,)),
    Config((19, 21), (4, 6), (2, 3), (True, True), 1, 2, 40, False, False, "float32", (3, 2)),
    Config((17, 9), (3, 5), (4, 1), (False, True), 2, 3, 128, False, True, "float16", (1, 5)),
    Config((18, 14), (6, 7), (1, 2), (True, False), 1, 2, 64, False, False, "bfloat16", (2, 7)),
    Config((12, 12), (4, 4), (1, 1), (False, False), 2, 2, 32, False, True, "float32", (4, 4)),
    Config((13, 11), (13, 11), (1, 1), (False, False), 1, 2, 100, True, False, "float32", (1, 1)),
    Config((30, 20), (9, 5), (3, 2), (False, False), 1, 1, 128, True, True, "bfloat16", (5, 3)),
    # the 256 bucket (a warp per query): full and odd head dims, 1D and 2D
    Config((40,), (9,), (2,), (True,), 1, 2, 256, False, False, "float16", (2,)),
    Config((14, 12), (5, 3), (2, 1), (False, True), 2, 1, 200, False, True, "float32", (2, 1)),
    Config((11, 13), (5, 5), (1, 1), (False, False), 1, 2, 256, True, False, "bfloat16", (1, 1)),
]


def _problem(cfg: Config, q, k, v, bias):
    return _args.fused_problem(cfg.ndim, q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.causal,
                               cfg.scale, bias)


def _run(cfg: Config, executor=emulated.run, arrays=None):
    (q, k, v), _ = sweep_inputs(cfg, 3) if arrays is None else (arrays, None)
    bias, _ = sweep_bias(cfg)
    problem = _problem(cfg, q, k, v, bias)
    kernels = Dispatcher(executor, Policy.of())  # tensor cores off: the SIMT kernel
    assert kernels.choose("forward", problem).path == "simt"
    return kernels.forward(problem, q, k, v, bias)


def _reference(cfg: Config, q64, k64, v64, bias64):
    fn = getattr(na_rtc, f"na{cfg.ndim}d")
    return fn(q64, k64, v64, cfg.kernel_size, stride=cfg.stride, dilation=cfg.dilation, is_causal=cfg.causal,
              scale=cfg.scale, rpb=bias64, return_lse=True, backend="reference")


def assert_forward_matches_reference(cfg: Config, out, lse):
    """A kernel's (out, lse) on the sweep inputs of ``cfg`` against the float64 reference (docs/design/testing.md#tolerances)."""
    (q, _, _), (q64, k64, v64) = sweep_inputs(cfg, 3)
    _, bias64 = sweep_bias(cfg)
    want_out, want_lse = _reference(cfg, q64, k64, v64, bias64)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and tuple(out.shape) == cfg.shape
    assert_close(out, want_out, cfg.dtype, "forward", "out")
    assert_close(lse, want_lse, cfg.dtype, "forward", "lse")


# ---------------------------------------------------------------- against the float64 reference


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_fused_matches_reference(cfg):
    recorder = RecordingExecutor()
    out, lse = _run(cfg, recorder)
    (q, _, _), (q64, k64, v64) = sweep_inputs(cfg, 3)
    _, bias64 = sweep_bias(cfg)
    want_out, want_lse = _reference(cfg, q64, k64, v64, bias64)
    bias, _ = sweep_bias(cfg)
    expected_name, = Dispatcher(None, Policy.of()).choose("forward", _problem(cfg, q, q, q, bias)).kernels
    assert recorder.names == [expected_name]
    assert str(out.dtype) == f"torch.{cfg.dtype}" and str(lse.dtype) == "torch.float32"
    assert tuple(out.shape) == cfg.shape and tuple(lse.shape) == cfg.shape[:-1]
    assert_close(out, want_out, cfg.dtype, "forward", "out")
    assert_close(lse, want_lse, cfg.dtype, "forward", "lse")


def test_every_causal_combination_and_stride_is_swept():
    seen_2d = {c.causal for c in CONFIGS if c.ndim == 2}
    assert seen_2d == {(a, b) for a in (False, True) for b in (False, True)}
    assert {c.causal for c in CONFIGS if c.ndim == 1} == {(False,), (True,)}
    assert any(s > 1 for c in CONFIGS for s in c.stride)
    assert any(s == k for c in CONFIGS for s, k in zip(c.stride, c.kernel_size) if k > 1)
    assert max(c.kernel_size[0] for c in CONFIGS if c.ndim == 1) == 255
    assert {c.dtype for c in CONFIGS} == set(DTYPES) and any(c.rpb for c in CONFIGS)


def test_full_kernel_is_full_attention():
    for cfg in (Config((23,), (23,), (1,), (False,), 2, 2, 48, False, False, "float32", (1,)),
                Config((7, 9), (7, 9), (1, 1), (False, False), 1, 3, 32, False, True, "float32", (1, 1))):
        out, lse = _run(cfg)
        _, (q64, k64, v64) = sweep_inputs(cfg, 3)
        b, h, d = cfg.batch, cfg.heads, cfg.head_dim
        q, k, v = (torch.from_numpy(a).reshape(b, -1, h, d).transpose(1, 2) for a in (q64, k64, v64))
        logits = (q @ k.transpose(-1, -2)) * d**-0.5
        want = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(cfg.shape)
        want_lse = torch.logsumexp(logits, -1).transpose(1, 2).reshape(cfg.shape[:-1])
        assert_close(out, want, "float32", "forward", "out")
        assert_close(lse, want_lse, "float32", "forward", "lse")


# ---------------------------------------------------------------- determinism and non-finite inputs


def _bits(x):
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)


def test_fused_is_deterministic():
    for cfg in (next(c for c in CONFIGS if c.ndim == 2 and c.rpb), CONFIGS[-3], CONFIGS[1]):
        first, second = _run(cfg), _run(cfg)
        for a, b in zip(first, second):
            assert torch.equal(_bits(a), _bits(b)), cfg


def _windows(axis: Axis, i: int) -> tuple[int, int]:
    """[start, end) in group coordinates of query i (the reference's window math)."""
    from na_rtc import window

    return window.window(axis, i)


def _tile_index(axis_length, dilation, tile, i):
    """Which tile of its axis query i falls in (group, tile within the group)."""
    return i % dilation, (i // dilation) // tile


@pytest.mark.parametrize("ndim", [1, 2])
def test_nan_key_poisons_its_queries_only(ndim):
    if ndim == 1:
        cfg = Config((150,), (9,), (2,), (False,), 1, 1, 32, False, False, "float32", (1,))
        where = (77,)
    else:
        cfg = Config((30, 26), (5, 3), (1, 2), (True, False), 1, 1, 64, False, False, "float16", (2, 1))
        where = (13, 11)
    assert_nan_key_poisons_its_queries_only(cfg, where)


def assert_nan_key_poisons_its_queries_only(cfg: Config, where: tuple):
    """A NaN in the key at spatial position ``where`` (head 0) makes exactly the queries that see it non-finite
    (and certainly none of a tile without such a query)."""
    ndim = cfg.ndim
    (q, k, v), _ = sweep_inputs(cfg, 3)
    k = k.clone()
    k[(0, *where, 0, 3)] = float("nan")
    out, lse = _run(cfg, arrays=(q, k, v))
    problem = _problem(cfg, q, k, v, None)
    tile = fused.TILES[(ndim, fused.head_dim_bucket(cfg.head_dim), cfg.dtype)]
    finite = torch.isfinite(out.double()).all(-1)[0, ..., 0] & torch.isfinite(lse.double())[0, ..., 0]
    seen = np.ones(cfg.spatial, dtype=bool)
    same_tile = np.ones(cfg.spatial, dtype=bool)
    for axis_index, axis in enumerate(problem.axes):
        j = where[axis_index]
        sees = np.zeros(axis.length, dtype=bool)
        tiles = np.zeros(axis.length, dtype=bool)
        poisoned_tiles = set()
        for i in range(axis.length):
            start, end = _windows(axis, i)
            if i % axis.dilation == j % axis.dilation and start <= j // axis.dilation < end:
                sees[i] = True
                poisoned_tiles.add(_tile_index(axis.length, axis.dilation, tile[axis_index], i))
        for i in range(axis.length):
            tiles[i] = _tile_index(axis.length, axis.dilation, tile[axis_index], i) in poisoned_tiles
        shape = [1] * ndim
        shape[axis_index] = axis.length
        seen &= sees.reshape(shape)
        same_tile &= tiles.reshape(shape)
    finite = finite.numpy()
    assert seen.any() and not finite[seen].any(), "a query whose window holds the NaN is finite"
    assert finite[~same_tile].all(), "a query of a tile that does not see the NaN is poisoned"
    # (this kernel masks per query, so in fact exactly the queries that see the NaN are poisoned)
    assert (finite == ~seen).all()


# ---------------------------------------------------------------- the table, the family, the choice


def test_table_and_family_agree():
    for ranks in ({1, 2}, {3}):  # the family and its 3D twin
        family = registry.for_rank("fused", min(ranks))
        assert set(family.names) == {fused.kernel_name_of(hd, dt, t) for (nd, hd, dt), t in fused.TILES.items()
                                     if nd in ranks}
    for (ndim, hd, dtype), tile in fused.TILES.items():
        assert hd in fused.HEAD_DIMS and dtype in DTYPES and len(tile) == max(ndim, 2)
        queries = math.prod(tile)
        assert tile[1] == 1 if ndim == 1 else min(tile) > 1
        assert fused.THREADS % queries == 0 and 32 % (fused.THREADS // queries) == 0
        assert hd % (fused.THREADS // queries) == 0
        family = registry.for_rank("fused", ndim)
        name = fused.kernel_name_of(hd, dtype, tile)
        assert family.launch_threads[name] == fused.THREADS
        assert family.launch_shared_bytes[name] == fused.shared_bytes(hd, dtype, ndim) <= fused.SHARED_BUDGET
        assert fused.shared_bytes(hd, dtype, ndim) == 2 * fused.chunk_keys(hd, ndim) * hd * tiling.ITEMSIZE[dtype]


def _empty_problem(ndim, dtype, head_dim, kernel=3, length=20, stride=1):
    q = torch.empty((1, *(length,) * ndim, 2, head_dim), dtype=getattr(torch, dtype))
    return _args.fused_problem(ndim, q, q, q, kernel, stride, 1, False, None, None)


@pytest.mark.parametrize("ndim, dtype, head_dim, expected", [
    (1, "float32", 16, "na_fused_fwd<float, 32, 64, 1>"),
    (1, "float16", 64, "na_fused_fwd<fp16_t, 64, 32, 1>"),
    (1, "bfloat16", 100, "na_fused_fwd<bf16_t, 128, 16, 1>"),
    (2, "float32", 40, "na_fused_fwd<float, 64, 8, 4>"),
    (2, "bfloat16", 32, "na_fused_fwd<bf16_t, 32, 8, 8>"),
    (2, "float16", 128, "na_fused_fwd<fp16_t, 128, 4, 4>"),
    (1, "float32", 129, "na_fused_fwd<float, 256, 8, 1>"),
    (2, "bfloat16", 256, "na_fused_fwd<bf16_t, 256, 4, 2>"),
    (1, "float64", 32, None),
    (2, "float32", 257, None),
])
def test_covers_and_kernel_name(ndim, dtype, head_dim, expected):
    choice = Dispatcher(emulated.run, Policy.of()).choose("forward", _empty_problem(ndim, dtype, head_dim, stride=2))
    if expected is None:
        assert choice.path is None and choice.kernels == ()
        assert dict(choice.skipped)["simt"].startswith(f"no fused kernel for {ndim}D {dtype} at head_dim {head_dim}")
    else:
        assert choice.path == "simt" and choice.kernels == (expected,)
