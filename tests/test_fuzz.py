"""Argument fuzzing of the public API (issue 8, part 1).

Hypothesis draws a call: op (fused, qk, av), 1D/2D, array kind (NumPy,
torch), dtype, shapes, kernel sizes, strides, dilations, causal flags, bias,
scale and layout (contiguous or heads-first views). Half the draws are made
wrong in exactly one argument (a mutation that knows which argument it broke).
Every call must either

* return the brute-force oracle's result (tests/oracle.py,
  docs/design/definition.md with loops) within the tolerances of docs/design/testing.md#tolerances, or
* raise ValueError / TypeError whose message names the broken argument,

on the reference backend and on the emulator (the CUDA C kernels on the CPU).
Valid calls' gradients (the plain ``na*_backward`` functions) must match the
float64 reference within the gradient tolerances.
The only other outcome allowed is the documented refusal of the kernel
backends: float64 with stride > 1 has no fused kernel and no split fallback
(a ValueError that names stride).

Examples per test: NA_RTC_FUZZ_EXAMPLES (default 150); draws are derandomized
(reproducible CI) unless NA_RTC_FUZZ_RANDOM=1, for longer local hunts:

    NA_RTC_FUZZ_RANDOM=1 NA_RTC_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from helpers import assert_close, make_inputs, noncontiguous
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle_av, oracle_na, oracle_qk

import na_rtc

BACKENDS = ["reference", pytest.param("emulator", marks=pytest.mark.skipif(
    not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler"))]

FUZZ = settings(
    max_examples=int(os.environ.get("NA_RTC_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=not os.environ.get("NA_RTC_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclasses.dataclass(frozen=True)
class Call:
    op: str  # "fused", "qk" or "av"
    kind: str  # "numpy" or "torch"
    dtype: str
    spatial: tuple
    kernel_size: tuple
    stride: tuple
    dilation: tuple
    causal: tuple
    batch: int
    heads: int
    head_dim: int
    rpb: bool
    scale: float | None
    heads_first: bool
    seed: int

    @property
    def ndim(self):
        return len(self.spatial)

    @property
    def qkv_shape(self):
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    @property
    def attn_shape(self):
        return (self.batch, *self.spatial, self.heads, math.prod(self.kernel_size))


# ---------------------------------------------------------------- drawing a valid call


@st.composite
def valid_calls(draw):
    ndim = draw(st.sampled_from([1, 2]))
    op = draw(st.sampled_from(["fused", "qk", "av"]))
    kind = draw(st.sampled_from(["numpy", "torch"]))
    dtypes = ["float64", "float32", "float16"] + (["bfloat16"] if kind == "torch" else [])
    kernel = tuple(draw(st.integers(2, 4 if ndim == 2 else 7)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2 if ndim == 2 else 3)) for _ in range(ndim))
    spatial = tuple(k * d + draw(st.integers(0, 3)) for k, d in zip(kernel, dilation))
    stride = tuple(draw(st.integers(1, k)) if op == "fused" else 1 for k in kernel)
    causal = tuple(draw(st.booleans()) for _ in range(ndim))
    batch, heads = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    rpb = op != "av" and all(k % 2 for k in kernel) and not any(causal) and draw(st.booleans())
    return Call(op, kind, draw(st.sampled_from(dtypes)), spatial, kernel, stride, dilation, causal, batch, heads,
                draw(st.integers(1, 9)), rpb, draw(st.sampled_from([None, 0.7])) if op == "fused" else None,
                batch > 0 and heads > 1 and draw(st.booleans()), draw(st.integers(0, 2**16)))


# ---------------------------------------------------------------- building and calling


def _arrays(call: Call):
    """The call's inputs and their float64 copies: (q, k, v) / (q, k) / (attn, v), and rpb."""
    rng = np.random.default_rng(call.seed)
    dtype = getattr(torch, call.dtype) if call.kind == "torch" else np.dtype(call.dtype)
    shapes = {"fused": [call.qkv_shape] * 3, "qk": [call.qkv_shape] * 2, "av": [call.attn_shape, call.qkv_shape]}
    arrays, arrays64 = [], []
    for shape in shapes[call.op]:
        (x,), (x64,) = make_inputs(rng, shape, dtype)
        arrays.append(noncontiguous(x) if call.heads_first else x)
        arrays64.append(x64)
    bias = bias64 = None
    if call.rpb:
        # a float32 parameter (as with mixed precision), float64 for float64 problems
        bias_dtype = np.dtype("float64" if call.dtype == "float64" else "float32")
        bias_dtype = getattr(torch, bias_dtype.name) if call.kind == "torch" else bias_dtype
        (bias,), (bias64,) = make_inputs(rng, (call.heads, *(2 * k - 1 for k in call.kernel_size)), bias_dtype)
    return arrays, arrays64, bias, bias64


def _kwargs(call: Call, bias):
    window = dict(kernel_size=call.kernel_size, dilation=call.dilation, is_causal=call.causal)
    if call.op == "fused":
        return dict(window, stride=call.stride, scale=call.scale, rpb=bias)
    if call.op == "qk":
        return dict(window, rpb=bias)
    return window


def _function(call: Call):
    suffix = "" if call.op == "fused" else f"_{call.op}"
    return getattr(na_rtc, f"na{call.ndim}d{suffix}")


def _expected(call: Call, arrays64, bias64):
    if call.op == "fused":
        return oracle_na(*arrays64, call.kernel_size, call.stride, call.dilation, call.causal, call.scale, bias64)[0]
    if call.op == "qk":
        return oracle_qk(*arrays64, call.kernel_size, call.dilation, call.causal, bias64)
    return oracle_av(*arrays64, call.kernel_size, call.dilation, call.causal)


def _refused_by_design(call: Call, backend: str, error: Exception) -> bool:
    """float64 with stride > 1 on a kernel backend: no fused kernel, no split fallback (docs/design/api.md#the-fallback-rule)."""
    return (backend != "reference" and call.op == "fused" and call.dtype == "float64"
            and any(s > 1 for s in call.stride) and isinstance(error, ValueError) and "stride" in str(error))


# ---------------------------------------------------------------- mutations: one argument made wrong


def _other_kind(x):
    if isinstance(x, torch.Tensor):
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # NumPy has no bfloat16
    return torch.from_numpy(np.ascontiguousarray(x))


def _int_dtype(x):
    return x.to(torch.int32) if isinstance(x, torch.Tensor) else x.astype(np.int32)


def _first(call: Call):
    return "value" if call.op == "av" else "query"


def _second(call: Call):
    return "attn" if call.op == "av" else "key"


#: name -> (applies to the call?, mutate(call, positional, kwargs) -> broken argument's name)
def _set(kwargs, key, value):
    kwargs[key] = value


def _positional_index(call: Call, name: str) -> int:
    order = {"fused": ["query", "key", "value"], "qk": ["query", "key"], "av": ["attn", "value"]}[call.op]
    return order.index(name)


def _replace(positional, call, name, fn):
    i = _positional_index(call, name)
    positional[i] = fn(positional[i])
    return name


MUTATIONS = {
    "kernel too large": (lambda c: True, lambda c, p, kw: _set(kw, "kernel_size", (
        c.spatial[0] // c.dilation[0] + 1, *c.kernel_size[1:])) or "kernel_size"),
    "kernel below 2": (lambda c: True, lambda c, p, kw: _set(kw, "kernel_size", 1) or "kernel_size"),
    "kernel not an int": (lambda c: True, lambda c, p, kw: _set(kw, "kernel_size", 3.0) or "kernel_size"),
    "kernel per-axis length": (lambda c: True, lambda c, p, kw: _set(kw, "kernel_size", (3,) * (c.ndim + 1))
                               or "kernel_size"),
    "dilation zero": (lambda c: True, lambda c, p, kw: _set(kw, "dilation", 0) or "dilation"),
    "stride zero": (lambda c: c.op == "fused", lambda c, p, kw: _set(kw, "stride", 0) or "stride"),
    "stride above kernel": (lambda c: c.op == "fused", lambda c, p, kw: _set(kw, "stride", (
        c.kernel_size[0] + 1, *c.stride[1:])) or "stride"),
    "causal per-axis length": (lambda c: True, lambda c, p, kw: _set(kw, "is_causal", (False,) * (c.ndim + 1))
                               or "is_causal"),
    "integer dtype": (lambda c: True, lambda c, p, kw: _replace(p, c, _first(c), _int_dtype)),
    "wrong rank": (lambda c: True, lambda c, p, kw: _replace(p, c, _first(c), lambda x: x[..., 0])),
    "second shape": (lambda c: c.batch > 0, lambda c, p, kw: _replace(p, c, _second(c), lambda x: x[:, :-1])),
    "second dtype": (lambda c: True, lambda c, p, kw: _replace(
        p, c, _second(c), lambda x: x.to(torch.float64 if x.dtype != torch.float64 else torch.float32)
        if isinstance(x, torch.Tensor) else x.astype(np.float64 if x.dtype != np.float64 else np.float32))),
    "second kind": (lambda c: True, lambda c, p, kw: _replace(p, c, _second(c), _other_kind)),
    "value a list": (lambda c: c.op != "qk", lambda c, p, kw: _replace(p, c, "value", lambda x: x.tolist())),
    "rpb shape": (lambda c: c.rpb, lambda c, p, kw: _set(kw, "rpb", kw["rpb"][:, :-1]) or "rpb"),
    "rpb where none is allowed": (
        lambda c: c.op != "av" and (any(k % 2 == 0 for k in c.kernel_size) or any(c.causal)),
        lambda c, p, kw: _set(kw, "rpb", np.zeros((c.heads, *(2 * k - 1 for k in c.kernel_size)), np.float32)
                              if c.kind == "numpy" else
                              torch.zeros((c.heads, *(2 * k - 1 for k in c.kernel_size)))) or "rpb"),
    "scale a string": (lambda c: c.op == "fused", lambda c, p, kw: _set(kw, "scale", "0.5") or "scale"),
}


@st.composite
def broken_calls(draw):
    call = draw(valid_calls())
    names = [name for name, (applies, _) in MUTATIONS.items() if applies(call)]
    return call, draw(st.sampled_from(names))


# ---------------------------------------------------------------- the properties


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(call=valid_calls())
def test_valid_calls_equal_the_oracle(backend, call):
    arrays, arrays64, bias, bias64 = _arrays(call)
    try:
        got = _function(call)(*arrays, **_kwargs(call, bias), backend=backend)
    except ValueError as error:
        if _refused_by_design(call, backend, error):
            return
        raise
    assert type(got) is type(arrays[0]) and tuple(got.shape) == tuple(arrays[-1].shape[:-1]) + (
        call.attn_shape[-1] if call.op == "qk" else call.head_dim,)
    assert_close(got, _expected(call, arrays64, bias64), call.dtype, "forward", f"{call.op} ({backend})")


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(call=valid_calls())
def test_valid_gradients_equal_the_float64_reference(backend, call):
    arrays, arrays64, bias, bias64 = _arrays(call)
    out_shape = call.attn_shape if call.op == "qk" else call.qkv_shape
    dtype = getattr(torch, call.dtype) if call.kind == "torch" else np.dtype(call.dtype)
    (grad,), (grad64,) = make_inputs(np.random.default_rng(call.seed + 1), out_shape, dtype)
    suffix = "_backward" if call.op == "fused" else f"_{call.op}_backward"
    backward = getattr(na_rtc, f"na{call.ndim}d{suffix}")
    try:
        got = backward(grad, *arrays, **_kwargs(call, bias), backend=backend)
    except ValueError as error:
        if _refused_by_design(call, backend, error):
            return
        raise
    want = backward(grad64, *arrays64, **_kwargs(call, bias64), backend="reference")
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"gradient {i} of {call.op}"
        else:
            assert_close(a, b, call.dtype, "grad", f"gradient {i} of {call.op} ({backend})")


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(drawn=broken_calls())
def test_a_broken_argument_is_named(backend, drawn):
    call, mutation = drawn
    positional, _, bias, _ = _arrays(call)
    kwargs = _kwargs(call, bias)
    broken = MUTATIONS[mutation][1](call, positional, kwargs)
    with pytest.raises((ValueError, TypeError)) as raised:
        _function(call)(*positional, **kwargs, backend=backend)
    assert broken in str(raised.value), f"{mutation}: the message does not name {broken!r}: {raised.value}"
