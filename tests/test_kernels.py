"""The straightforward CUDA kernels against the float64 reference, on the
emulator (CPU, always) and on the GPU (``gpu`` marker, skipped without one).

Every op and every gradient over a seeded sweep of configurations (1D/2D,
odd/even kernels, dilation, causal per axis, rpb, heads-first views, every
dtype), with the tolerances of docs/design/testing.md#tolerances. ``NA_RTC_SWEEP=large``
multiplies the number of configurations.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import assert_close, make_inputs, noncontiguous, to_numpy64, SweepConfig

import na_rtc
from na_rtc import config, reference


def _usable(name: str) -> bool:
    return na_rtc.backends.get(name).probe()[0]


BACKENDS = [
    pytest.param("emulator", marks=pytest.mark.skipif(not _usable("emulator"), reason="emulator needs a C++ compiler")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _usable("cuda"), reason="no usable GPU")]),
]


def place(x, backend: str):
    """Inputs for ``backend``: CPU arrays as they are; torch CUDA tensors for the GPU."""
    if backend != "cuda" or x is None:
        return x
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).cuda()

SEEDS = range(40 if config.sweep_size() == "small" else 300)
DTYPES = ["float64", "float32", "float16", "bfloat16"]


Config = SweepConfig



def random_config(seed: int) -> Config:
    rng = np.random.default_rng(1000 + seed)
    ndim = 1 + seed % 2
    kernel = tuple(int(rng.integers(2, 10 if ndim == 1 else 6)) for _ in range(ndim))
    dilation = tuple(int(rng.integers(1, 4)) for _ in range(ndim))
    spatial = tuple(k * d + int(rng.integers(0, 6)) for k, d in zip(kernel, dilation))
    causal = tuple(bool(rng.random() < 0.3) for _ in range(ndim))
    rpb = all(k % 2 for k in kernel) and not any(causal) and rng.random() < 0.7
    dtype = DTYPES[seed % len(DTYPES)]
    # stride is a fused-op feature: kernels exist for fp32/fp16/bf16 (fp64 composes split kernels: stride 1)
    stride = tuple(int(rng.integers(1, k + 1)) if dtype != "float64" and rng.random() < 0.4 else 1 for k in kernel)
    return Config(spatial, kernel, dilation, causal, int(rng.integers(1, 3)), int(rng.integers(1, 3)),
                  int(rng.choice([3, 8, 16])), bool(rpb), bool(rng.random() < 0.4), dtype, stride)


CONFIGS = [random_config(seed) for seed in SEEDS]
# the corners a random draw may miss: an even kernel, every causal combination, a large 1D kernel
CONFIGS += [
    Config((11,), (4,), (2,), (False,), 1, 2, 8, False, False, "float32"),
    Config((7, 9), (3, 3), (1, 2), (True, False), 1, 1, 8, False, True, "float32"),
    Config((6, 7), (3, 4), (1, 1), (False, True), 2, 1, 4, False, False, "float64"),
    Config((9, 8), (3, 5), (2, 1), (True, True), 1, 2, 8, False, False, "float16"),
    Config((70,), (63,), (1,), (False,), 1, 1, 8, True, False, "float32"),
    Config((13, 11), (5, 3), (2, 3), (False, False), 1, 2, 8, True, True, "bfloat16"),
]


def _inputs(cfg: Config, count: int, shape, seed=0):
    rng = np.random.default_rng(seed)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype == "bfloat16" else np.dtype(cfg.dtype)
    arrays, arrays64 = make_inputs(rng, shape, dtype, count)
    if cfg.heads_first:
        arrays = [noncontiguous(a) for a in arrays]
    return arrays, arrays64


def _rpb(cfg: Config, like):
    if not cfg.rpb:
        return None, None
    shape = (cfg.heads, *(2 * k - 1 for k in cfg.kernel_size))
    # a float32 parameter, as with mixed precision; float64 for float64 problems
    bias_dtype = np.float64 if cfg.dtype == "float64" else np.float32
    (bias,), (bias64,) = make_inputs(np.random.default_rng(99), shape, bias_dtype)
    if isinstance(like, torch.Tensor):
        bias = torch.from_numpy(bias)
    return bias, bias64


def _fns(cfg):
    if cfg.ndim == 1:
        return dict(fused=na_rtc.na1d, bwd=na_rtc.na1d_backward, qk=na_rtc.na1d_qk, av=na_rtc.na1d_av,
                    qk_bwd=na_rtc.na1d_qk_backward, av_bwd=na_rtc.na1d_av_backward)
    return dict(fused=na_rtc.na2d, bwd=na_rtc.na2d_backward, qk=na_rtc.na2d_qk, av=na_rtc.na2d_av,
                qk_bwd=na_rtc.na2d_qk_backward, av_bwd=na_rtc.na2d_av_backward)


def _shape(cfg):
    return (cfg.batch, *cfg.spatial, cfg.heads, cfg.head_dim)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_forward_and_gradients(backend, cfg):
    f = _fns(cfg)
    (q, k, v, g), (q64, k64, v64, g64) = _inputs(cfg, 4, _shape(cfg))
    rpb, rpb64 = _rpb(cfg, q)
    q, k, v, g, rpb = (place(x, backend) for x in (q, k, v, g, rpb))
    stride = cfg.stride or 1
    out, lse = f["fused"](q, k, v, **cfg.window, stride=stride, rpb=rpb, return_lse=True, backend=backend)
    ref_out, ref_lse = f["fused"](q64, k64, v64, **cfg.window, stride=stride, rpb=rpb64, return_lse=True,
                                  backend="reference")
    assert_close(out, ref_out, cfg.dtype, "forward", "out")
    assert_close(lse, ref_lse, cfg.dtype, "forward", "lse")
    grads = f["bwd"](g, q, k, v, **cfg.window, stride=stride, rpb=rpb, backend=backend)
    ref_grads = f["bwd"](g64, q64, k64, v64, **cfg.window, stride=stride, rpb=rpb64, backend="reference")
    for name, got, want in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads):
        if want is None:
            assert got is None
            continue
        # drpb sums many terms; its tolerance is the dtype's grad row (computed in float32, the bias dtype)
        assert_close(got, want, cfg.dtype, "grad", name)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_split_ops_and_gradients(backend, cfg):
    f = _fns(cfg)
    slots = int(np.prod(cfg.kernel_size))
    (q, k, v, g), (q64, k64, v64, g64) = _inputs(cfg, 4, _shape(cfg))
    (weights, grad_attn), (weights64, grad_attn64) = _inputs(cfg, 2, (*_shape(cfg)[:-1], slots), seed=1)
    rpb, rpb64 = _rpb(cfg, q)
    scale = cfg.head_dim**-0.5
    q = q * scale  # split-op tests pre-scale the query (docs/design/testing.md#kernels), rounded to the dtype
    q64 = to_numpy64(q)
    q, k, v, g, weights, grad_attn, rpb = (place(x, backend) for x in (q, k, v, g, weights, grad_attn, rpb))
    attn = f["qk"](q, k, **cfg.window, rpb=rpb, backend=backend)
    assert_close(attn, f["qk"](q64, k64, **cfg.window, rpb=rpb64, backend="reference"), cfg.dtype, "forward", "attn")
    out = f["av"](weights, v, **cfg.window, backend=backend)
    assert_close(out, f["av"](weights64, v64, **cfg.window, backend="reference"), cfg.dtype, "forward", "av")
    got = f["qk_bwd"](grad_attn, q, k, **cfg.window, rpb=rpb, backend=backend)
    want = f["qk_bwd"](grad_attn64, q64, k64, **cfg.window, rpb=rpb64, backend="reference")
    for name, a, b in zip(("dq", "dk", "drpb"), got, want):
        if b is None:
            assert a is None
        else:
            assert_close(a, b, cfg.dtype, "grad", name)
    got = f["av_bwd"](g, weights, v, **cfg.window, backend=backend)
    want = f["av_bwd"](g64, weights64, v64, **cfg.window, backend="reference")
    for name, a, b in zip(("dattn", "dv"), got, want):
        assert_close(a, b, cfg.dtype, "grad", name)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.dtype in ("float32", "float64")][:4], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_autograd(backend, cfg):
    (q, k, v), _ = _inputs(dataclasses.replace(cfg, heads_first=False), 3, _shape(cfg))
    q, k, v = (place(torch.from_numpy(np.ascontiguousarray(x)), backend).requires_grad_() for x in (q, k, v))
    rpb, _ = _rpb(cfg, q)
    if rpb is not None:
        rpb = place(rpb, backend).requires_grad_()
    inputs = [x for x in (q, k, v, rpb) if x is not None]
    with na_rtc.use_backend(backend):
        out = _fns(cfg)["fused"](q, k, v, **cfg.window, rpb=rpb)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref_inputs = [x.detach().cpu().double().requires_grad_() for x in inputs]
    ref_out = _fns(cfg)["fused"](*ref_inputs[:3], **cfg.window, rpb=ref_inputs[3] if rpb is not None else None,
                                 backend="reference")
    ref_grads = torch.autograd.grad(ref_out.square().sum(), ref_inputs)
    assert_close(out, ref_out, cfg.dtype, "forward", "out")
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, cfg.dtype, "grad", "grad")


def test_stride_without_a_covering_fused_kernel_is_a_clear_error():
    q = np.zeros((1, 12, 1, 4), np.float64)  # no fused kernel for float64: the composed path has no stride
    with pytest.raises(ValueError, match="stride .* needs the fused forward kernels, which do not cover"):
        na_rtc.na1d(q, q, q, 4, stride=2, backend="emulator")


def test_emulator_results_are_deterministic():
    cfg = CONFIGS[1]
    (q, k, v, g), _ = _inputs(cfg, 4, _shape(cfg))
    first = _fns(cfg)["bwd"](g, q, k, v, **cfg.window, backend="emulator")
    second = _fns(cfg)["bwd"](g, q, k, v, **cfg.window, backend="emulator")
    for a, b in zip(first[:3], second[:3]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reference_module_is_the_spec_for_the_kernels():
    assert reference.OPS.keys() == na_rtc.backends.get("emulator").ops.keys()
