"""3D neighborhood attention on the split kernels (straightforward and tiled), against the float64 reference.

The emulator runs them on the CPU (always), the GPU under the ``gpu`` marker.
``na3d_qk``, ``na3d_av`` and their gradients have no other kernels; ``na3d``
and its backward run them composed (qk, softmax, av) wherever no fused kernel
serves 3D. Swept per axis: odd and even kernels, dilation, causal flags; and
the bias, heads-first views (strided, no copies), every dtype and head dims
inside and past the tiled kernels' buckets. ``NA_RTC_SWEEP=small`` (CI) runs
a sweep that shows every value of every swept dimension at least once
(checked by a test below); ``large`` runs many more random configurations.
Tolerances are the project's table (``helpers.assert_close``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import (RecordingExecutor, SweepConfig, assert_close, make_inputs, misaligned_copy, noncontiguous,
                     sweep_bias, sweep_inputs, to_numpy64)

import na_rtc
from na_rtc import _args, config
from na_rtc.runtime import emulated, registry
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import tiled, tiled_bwd
from na_rtc.runtime.policy import Policy


def _usable(name: str) -> bool:
    return na_rtc.backends.get(name).probe()[0]


BACKENDS = [
    pytest.param("emulator", marks=pytest.mark.skipif(not _usable("emulator"), reason="emulator needs a C++ compiler")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _usable("cuda"), reason="no usable GPU")]),
]

DTYPES = ("float64", "float32", "float16", "bfloat16")
#: past the tiled kernels' buckets (3, 8: small; 160: past 128) and at them
HEAD_DIMS = (3, 8, 32, 64, 128, 160)
SMALL = config.sweep_size() == "small"


def _config(seed: int) -> SweepConfig:
    """Configuration ``seed``: dtype, head dim and layout cycle through their values (so a small sweep shows
    each), the window is drawn."""
    rng = np.random.default_rng(3000 + seed)
    kernel = tuple(int(rng.integers(2, 5)) for _ in range(3))
    dilation = tuple(int(rng.integers(1, 3)) for _ in range(3))
    spatial = tuple(k * d + int(rng.integers(0, 3)) for k, d in zip(kernel, dilation))
    causal = tuple(bool(rng.random() < 0.3) for _ in range(3))
    rpb = all(k % 2 for k in kernel) and not any(causal) and bool(rng.random() < 0.7)
    return SweepConfig(spatial, kernel, dilation, causal, 1 + seed % 2, 1 + (seed // 2) % 2,
                       HEAD_DIMS[seed % len(HEAD_DIMS)], rpb, seed % 4 in (1, 2), DTYPES[seed % len(DTYPES)])


def _corner(spatial, kernel, dilation, causal, rpb, dtype, head_dim=8, heads_first=False):
    return SweepConfig(spatial, kernel, dilation, causal, 1, 2, head_dim, rpb, heads_first, dtype)


CONFIGS = [_config(seed) for seed in range(12 if SMALL else 80)]
# what a random draw may miss: causal in time only, odd windows with a bias (k=3, 5 and the video window
# (3, 7, 7)), even windows, dilation on one axis, sizes that are no tile multiple
CONFIGS += [
    _corner((5, 6, 7), (3, 3, 3), (1, 1, 1), (True, False, False), False, "float32", heads_first=True),
    _corner((5, 9, 7), (3, 3, 3), (1, 2, 1), (False, False, False), True, "float32", head_dim=32),
    _corner((6, 7, 5), (5, 5, 5), (1, 1, 1), (False, False, False), True, "float16", head_dim=64),
    _corner((4, 8, 9), (3, 7, 7), (1, 1, 1), (False, False, False), True, "bfloat16", head_dim=32, heads_first=True),
    _corner((5, 6, 8), (2, 4, 2), (2, 1, 3), (False, True, False), False, "float64"),
    _corner((7, 5, 6), (4, 2, 3), (1, 2, 1), (True, True, True), False, "float16", head_dim=128),
]


def _rpb(cfg: SweepConfig, like):
    if not cfg.rpb:
        return None, None
    shape = (cfg.heads, *(2 * k - 1 for k in cfg.kernel_size))
    bias_dtype = np.float64 if cfg.dtype == "float64" else np.float32  # float32 under mixed precision
    (bias,), (bias64,) = make_inputs(np.random.default_rng(99), shape, bias_dtype)
    return (torch.from_numpy(bias) if isinstance(like, torch.Tensor) else bias), bias64


def _inputs(cfg: SweepConfig, count: int, shape, seed: int = 0):
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else np.dtype(cfg.dtype)
    arrays, arrays64 = make_inputs(np.random.default_rng(seed), shape, dtype, count)
    if cfg.heads_first:
        arrays = [noncontiguous(a) for a in arrays]
    return arrays, arrays64


def _place(x, backend: str):
    """CPU arrays as they are; torch CUDA tensors for the GPU."""
    if backend != "cuda" or x is None:
        return x
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).cuda()


def _assert_grads(got, want, dtype, names):
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
        else:
            assert_close(a, b, dtype, "grad", name)


def test_the_small_sweep_shows_every_value_of_every_swept_dimension():
    def seen(attribute):
        return {getattr(cfg, attribute) for cfg in CONFIGS}

    assert seen("dtype") == set(DTYPES) and seen("head_dim") >= set(HEAD_DIMS)
    assert seen("rpb") == seen("heads_first") == {True, False}
    for axis in range(3):
        assert {cfg.kernel_size[axis] % 2 for cfg in CONFIGS} == {0, 1}
        assert {cfg.dilation[axis] > 1 for cfg in CONFIGS} == {True, False}
        assert {cfg.causal[axis] for cfg in CONFIGS} == {True, False}
    assert (True, False, False) in seen("causal")


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_split_ops_and_gradients(backend, cfg):
    slots = int(np.prod(cfg.kernel_size))
    (q, k, v, g), (_, k64, v64, g64) = _inputs(cfg, 4, cfg.shape)
    (weights, grad_attn), (weights64, grad_attn64) = _inputs(cfg, 2, (*cfg.shape[:-1], slots), seed=1)
    rpb, rpb64 = _rpb(cfg, q)
    q = q * cfg.head_dim**-0.5  # split-op tests pre-scale the query, rounded to the dtype
    q64 = to_numpy64(q)
    q, k, v, g, weights, grad_attn, rpb = (_place(x, backend) for x in (q, k, v, g, weights, grad_attn, rpb))
    window = cfg.window

    attn = na_rtc.na3d_qk(q, k, **window, rpb=rpb, backend=backend)
    assert_close(attn, na_rtc.na3d_qk(q64, k64, **window, rpb=rpb64, backend="reference"), cfg.dtype, "forward",
                 "attn")
    out = na_rtc.na3d_av(weights, v, **window, backend=backend)
    assert_close(out, na_rtc.na3d_av(weights64, v64, **window, backend="reference"), cfg.dtype, "forward", "av")
    got = na_rtc.na3d_qk_backward(grad_attn, q, k, **window, rpb=rpb, backend=backend)
    want = na_rtc.na3d_qk_backward(grad_attn64, q64, k64, **window, rpb=rpb64, backend="reference")
    _assert_grads(got, want, cfg.dtype, ("dq", "dk", "drpb"))
    got = na_rtc.na3d_av_backward(g, weights, v, **window, backend=backend)
    want = na_rtc.na3d_av_backward(g64, weights64, v64, **window, backend="reference")
    _assert_grads(got, want, cfg.dtype, ("dattn", "dv"))


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_na3d_composed_forward_lse_and_gradients(backend, cfg):
    (q, k, v, g), (q64, k64, v64, g64) = _inputs(cfg, 4, cfg.shape)
    rpb, rpb64 = _rpb(cfg, q)
    q, k, v, g, rpb = (_place(x, backend) for x in (q, k, v, g, rpb))
    out, lse = na_rtc.na3d(q, k, v, **cfg.window, rpb=rpb, return_lse=True, backend=backend)
    ref_out, ref_lse = na_rtc.na3d(q64, k64, v64, **cfg.window, rpb=rpb64, return_lse=True, backend="reference")
    assert_close(out, ref_out, cfg.dtype, "forward", "out")
    assert_close(lse, ref_lse, cfg.dtype, "forward", "lse")
    got = na_rtc.na3d_backward(g, q, k, v, **cfg.window, rpb=rpb, backend=backend)
    want = na_rtc.na3d_backward(g64, q64, k64, v64, **cfg.window, rpb=rpb64, backend="reference")
    _assert_grads(got, want, cfg.dtype, ("dq", "dk", "dv", "drpb"))


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.dtype in ("float32", "float64")][:2], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_autograd_through_the_kernels(backend, cfg):
    (q, k, v), _ = _inputs(cfg, 3, cfg.shape)
    inputs = [_place(torch.as_tensor(np.asarray(x)), backend).requires_grad_() for x in (q, k, v)]
    rpb, _ = _rpb(cfg, inputs[0])
    if rpb is not None:
        inputs.append(_place(rpb, backend).requires_grad_())
    with na_rtc.use_backend(backend):
        out = na_rtc.na3d(*inputs[:3], **cfg.window, rpb=inputs[3] if rpb is not None else None)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref_inputs = [x.detach().cpu().double().requires_grad_() for x in inputs]
    ref_out = na_rtc.na3d(*ref_inputs[:3], **cfg.window, rpb=ref_inputs[3] if rpb is not None else None,
                          backend="reference")
    ref_grads = torch.autograd.grad(ref_out.square().sum(), ref_inputs)
    assert_close(out, ref_out, cfg.dtype, "forward", "out")
    for name, got, want in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads):
        assert_close(got, want, cfg.dtype, "grad", name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_bitwise_deterministic(backend):
    cfg = CONFIGS[-4]  # a bias, fp16: the bias gradient's reduction runs too
    (q, k, v, g), _ = _inputs(cfg, 4, cfg.shape)
    rpb, _ = _rpb(cfg, q)
    q, k, v, g, rpb = (_place(x, backend) for x in (q, k, v, g, rpb))
    first, second = (na_rtc.na3d_backward(g, q, k, v, **cfg.window, rpb=rpb, backend=backend) for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(to_numpy64(a), to_numpy64(b))


def test_a_3d_stride_without_a_covering_fused_kernel_is_a_clear_error():
    q = np.zeros((1, 6, 6, 6, 1, 4), np.float64)  # the composed split kernels have no stride
    with pytest.raises(ValueError, match="stride .* needs the fused forward kernels, which do not cover"):
        na_rtc.na3d(q, q, q, 3, stride=(1, 2, 1), backend="emulator")


# ---------------------------------------------------------------- which kernels serve


def _problem_of(dtype, head_dim, kernel, spatial=(9, 10, 11)):
    q = torch.empty((1, *spatial, 2, head_dim), dtype=getattr(torch, dtype))
    return _args.qk_problem(3, q, q, kernel, 1, False, None)


def _choose(role, dtype, head_dim, kernel, weights=None, spatial=(9, 10, 11)):
    weights = weights or dtype
    args = (weights, dtype) if role == "inverse" else (weights,)
    return Dispatcher(None, Policy.of()).choose(role, _problem_of(dtype, head_dim, kernel, spatial), *args)


#: the windows that matter in 3D (k = 7, the video window (3, 7, 7)) run tiled at every head-dim bucket
TILED_CHOICES = [(dtype, hd, kernel, op, weights)
                 for dtype in ("float32", "float16", "bfloat16") for hd in (32, 64, 128) for kernel in (7, (3, 7, 7))
                 for op in ("qk", "av") for weights in {dtype, "float32"}]


@pytest.mark.parametrize("dtype, head_dim, kernel, op, weights", TILED_CHOICES, ids=str)
def test_the_3d_windows_that_matter_run_tiled(dtype, head_dim, kernel, op, weights):
    choice = _choose(op, dtype, head_dim, kernel, weights)
    bucket = tiled.head_dim_bucket(head_dim)
    tile = tiled.TILES[3, bucket, dtype]
    assert choice.path == "tiled" and choice.kernels == (tiled.kernel_name(op, dtype, weights, bucket, tile),)
    assert tiled.shared_bytes(_problem_of(dtype, head_dim, kernel), op, tile, bucket, weights) <= tiled.SHARED_BUDGET


#: the backward's split kernels at the windows that matter: the inverse at every bucket, the bias gradient's
#: partial pass with the largest tile that fits (a 7x7x7 window's gradients: the 2x2x2 tile)
BACKWARD_CHOICES = [(dtype, hd, kernel) for dtype in ("float32", "float16", "bfloat16") for hd in (16, 32, 64, 128)
                    for kernel in (3, 7, (3, 7, 7))]


@pytest.mark.parametrize("dtype, head_dim, kernel", BACKWARD_CHOICES, ids=str)
def test_the_backward_of_the_3d_windows_that_matter_runs_tiled(dtype, head_dim, kernel):
    for weights in {dtype, "float32"}:
        inverse = _choose("inverse", dtype, head_dim, kernel, weights)
        bucket = tiled_bwd.head_dim_bucket(head_dim)
        assert inverse.kernels == (tiled_bwd.inv_name(weights, dtype, bucket, tiled_bwd.INV_TILES[3, bucket, dtype]),)
        bias = _choose("bias_grad", dtype, head_dim, kernel, weights)
        assert bias.path == "tiled" and bias.kernels[1] == tiled_bwd.RPB_REDUCE
        assert bias.kernels[0] in {tiled_bwd.rpb_name(weights, tile) for tile in tiled_bwd.RPB_TILES[3]}
        if kernel == 7 and weights == "float32":  # 64 queries x 343 float32 gradients do not fit: the smaller tile
            assert bias.kernels[0] == tiled_bwd.rpb_name(weights, (2, 2, 2))


@pytest.mark.parametrize("dtype, head_dim, kernel, forward_why, inverse_why", [
    ("float32", 128, 9, "the window 9x9x9 needs", None),
    ("float64", 32, 3, "no tile for 3D float64", "dtype float64"),
    ("float16", 160, 3, "no tile for 3D float16 at head_dim 160", "head_dim 160 > 128"),
], ids=["large-window", "float64", "head-dim-past-the-buckets"])
def test_what_the_tiled_kernels_do_not_cover_runs_straightforward(dtype, head_dim, kernel, forward_why, inverse_why):
    for role, why in (("qk", forward_why), ("av", forward_why), ("inverse", inverse_why)):
        choice = _choose(role, dtype, head_dim, kernel)
        if why is None:  # the inverse stages a few rows at a time: it serves this window
            assert choice.path == "tiled"
            continue
        assert choice.path == "straightforward" and choice.kernels[0].endswith(", 3>"), choice
        assert why in dict(choice.skipped)["tiled"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_every_3d_role_has_straightforward_kernels_for_any_head_dim_and_window(dtype):
    for role in ("qk", "av", "inverse", "bias_grad", "softmax", "softmax_backward"):
        weights = "float64" if dtype == "float64" else "float32" if role.startswith("softmax") else dtype
        choice = _choose(role, dtype, 200, 15, weights, (15, 16, 17))  # past every bucket; a window too large for
        # the bias gradient's partial sums
        assert choice.path == "straightforward" and choice.kernels[0].endswith(", 3>"), choice


def test_the_3d_twins_list_every_dtype_and_head_dim_bucket_of_their_families():
    assert {name.replace(", 3>", ">") for name in registry.get("naive_3d").names} == set(registry.get("naive").names)
    for dtype in ("float32", "float16", "bfloat16"):
        assert {hd for (ndim, hd, d) in tiled.TILES if ndim == 3 and d == dtype} == set(tiled.HEAD_DIMS)
    twin = {name.rsplit(", 3, ", 1)[0] for name in registry.get("tiled_3d").names}
    assert len(twin) == len(registry.get("tiled_3d").names) == 30  # (qk, av) x weights x bucket x dtype
    for dtype in ("float32", "float16", "bfloat16"):
        assert {hd for (ndim, hd, d) in tiled_bwd.INV_TILES if ndim == 3 and d == dtype} == \
            set(tiled_bwd.HEAD_DIM_BUCKETS)
    assert all(", 3, " in name for name in registry.get("tiled_bwd_3d").names)


def test_explain_shows_the_3d_kernels_of_each_launch():
    q = np.zeros((1, 6, 7, 8, 2, 32), np.float32)  # (na3d itself runs the fused SIMT kernels here)
    text = str(na_rtc.explain("na3d_qk", q, q, kernel_size=(3, 7, 7), backward=True, backend="emulator"))
    assert "qk: tiled na_tiled_qk<float, float, 32, 4, 4, 3, 4>" in text
    assert "av: tiled na_tiled_av<float, float, 32, 4, 4, 3, 4>" in text
    q = np.zeros((1, 6, 7, 8, 2, 8), np.float64)  # no fused kernel: the split kernels composed
    text = str(na_rtc.explain("na3d", q, q, q, kernel_size=3, backward=True, backend="emulator"))
    assert "softmax: straightforward na_softmax_fwd<double, 3>" in text
    assert "qk: straightforward na_qk_fwd<double, double, 3>" in text
    assert "inverse: straightforward na_inv_fwd<double, double, 3>" in text


# ---------------------------------------------------------------- tiled == straightforward, bit for bit


def _bits(x):
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)


#: tiled configurations: boxes of several x planes, sizes that are no tile multiple, dilation, causal axes, a bias
BITWISE = [
    _corner((9, 10, 7), (7, 3, 5), (1, 1, 1), (False, False, False), True, "float32", head_dim=32),
    _corner((6, 9, 11), (3, 3, 3), (2, 1, 3), (True, False, True), False, "float16", head_dim=64, heads_first=True),
    _corner((5, 8, 9), (3, 7, 7), (1, 1, 1), (False, False, False), True, "bfloat16", head_dim=100),
    _corner((7, 5, 6), (4, 2, 3), (1, 2, 1), (True, True, False), False, "float32", head_dim=128),
]


@pytest.mark.skipif(not _usable("emulator"), reason="emulator needs a C++ compiler")
@pytest.mark.parametrize("cfg", BITWISE, ids=str)
def test_tiled_3d_equals_straightforward_bit_for_bit(cfg):
    """Same accumulation order (d in order for qk; slots in row-major order, plane after plane, for av; queries
    in x, y, z order for the inverse)."""
    (q, k, v), _ = sweep_inputs(cfg, 3, cfg.shape)
    bias, _ = sweep_bias(cfg)
    slots = int(np.prod(cfg.kernel_size))
    recorder = RecordingExecutor()
    tiled_kernels, naive_kernels = Dispatcher(recorder), Dispatcher(emulated.run, Policy.of(tiled=False))
    problem = _args.qk_problem(3, q, k, cfg.kernel_size, cfg.dilation, cfg.causal, bias)
    for out_dtype, scale, fill, b in ((cfg.dtype, 1.0, -math.inf, bias), ("float32", 0.3, -math.inf, bias),
                                      ("float32", 1.0, 0.0, None)):
        got = tiled_kernels.qk(problem, q, k, b, out_dtype, scale, fill)
        assert recorder.names[-1].startswith("na_tiled_qk<") and recorder.names[-1].endswith(">")
        assert torch.equal(_bits(got), _bits(naive_kernels.qk(problem, q, k, b, out_dtype, scale, fill)))
    for weights_dtype in (cfg.dtype, "float32"):
        (w,), _ = sweep_inputs(dataclasses.replace(cfg, dtype=weights_dtype), 1, (*cfg.shape[:-1], slots), seed=1)
        got = tiled_kernels.av(problem, w, v)
        assert recorder.names[-1].startswith("na_tiled_av<")
        assert torch.equal(_bits(got), _bits(naive_kernels.av(problem, w, v)))
        # the inverse neighborhood (dK, dV): keys sum their queries in the same order
        got = tiled_kernels.inverse(problem, w, q, 0.5)
        assert recorder.names[-1].startswith("na_tiled_inv<")
        assert torch.equal(_bits(got), _bits(naive_kernels.inverse(problem, w, q, 0.5)))


@pytest.mark.skipif(not _usable("emulator"), reason="emulator needs a C++ compiler")
def test_vector_and_element_staging_agree_bit_for_bit():
    """Aligned rows are staged with 16-byte loads, misaligned ones element by element: same bits."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 6, 7, 9, 2, 32).half() for _ in range(3))
    attn = torch.softmax(na_rtc.na3d_qk(q, k, 3, backend="emulator").float(), -1).half()
    aligned = (na_rtc.na3d_qk(q, k, 3, backend="emulator"), na_rtc.na3d_av(attn, v, 3, backend="emulator"))
    q2, k2, v2, attn2 = map(misaligned_copy, (q, k, v, attn))
    assert all(t.data_ptr() % 16 != 0 for t in (q2, k2, v2, attn2))
    element = (na_rtc.na3d_qk(q2, k2, 3, backend="emulator"), na_rtc.na3d_av(attn2, v2, 3, backend="emulator"))
    for a, b in zip(aligned, element):
        assert torch.equal(_bits(a), _bits(b))


# ---------------------------------------------------------------- first-use verification


def test_every_3d_instantiation_the_dispatcher_picks_is_reached_by_a_selftest_canary():
    """``selftest --full``'s 3D split canaries launch every 3D split instantiation, except what the self-test
    checks in no rank: float64 (it runs float32, float16 and bfloat16), the head-dim-16 bucket of the inverse
    (its head dims start at 32), and the straightforward bias gradient of 16-bit logit gradients (windows past
    14 per axis: a canary of that size would take minutes)."""
    from na_rtc.runtime import composed
    from na_rtc.verify import canary, selftest

    where = selftest.Target("cuda", "cuda:0", 90, "torch", "a stand-in sm_90")
    dispatcher, reached = Dispatcher(None, where.policy()), set()
    for unit in selftest.units(where, "full"):
        if unit.problem.ndim == 3 and unit.candidate.path == "split":
            test = canary.split_canary_problem(unit.problem)
            for role, args in composed.launches(unit.candidate.op, test):
                reached |= set(dispatcher.choose(role, test, *args).kernels)
    picked = {name for family in ("naive_3d", "tiled_3d", "tiled_bwd_3d") for name in registry.get(family).names}
    unchecked = {name for name in picked if "double" in name or name.startswith("na_tiled_inv") and ", 16, " in name
                 or name in ("na_rpb_bwd<fp16_t, 3>", "na_rpb_bwd<bf16_t, 3>")}
    assert picked - reached == unchecked
