"""Bad input gets a TypeError/ValueError that names the argument (docs/design/testing.md#bad-input).

One table: each row is a call that must fail, the exception type, and a piece
of the message that names the argument and what is allowed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import na_rtc

F32 = np.float32
Q1 = np.zeros((1, 16, 2, 4), F32)  # [batch, length, heads, dim]
Q2 = np.zeros((1, 8, 9, 2, 4), F32)  # [batch, height, width, heads, dim]
ATTN1 = np.zeros((1, 16, 2, 5), F32)  # k = 5
RPB1 = np.zeros((2, 9), F32)  # k = 5
RPB2 = np.zeros((2, 5, 7), F32)  # k = (3, 4)... used with k = (3, 4): wrong on purpose where noted
Q3 = np.zeros((1, 6, 7, 8, 2, 4), F32)  # [batch, depth, height, width, heads, dim]


def na1d(**overrides):
    args = dict(query=Q1, key=Q1, value=Q1, kernel_size=5)
    args.update(overrides)
    return lambda: na_rtc.na1d(**args)


def na2d(**overrides):
    args = dict(query=Q2, key=Q2, value=Q2, kernel_size=3)
    args.update(overrides)
    return lambda: na_rtc.na2d(**args)


def na3d(**overrides):
    args = dict(query=Q3, key=Q3, value=Q3, kernel_size=3)
    args.update(overrides)
    return lambda: na_rtc.na3d(**args)


def qk1(**overrides):
    args = dict(query=Q1, key=Q1, kernel_size=5)
    args.update(overrides)
    return lambda: na_rtc.na1d_qk(**args)


def av1(**overrides):
    args = dict(attn=ATTN1, value=Q1, kernel_size=5)
    args.update(overrides)
    return lambda: na_rtc.na1d_av(**args)


CASES = {
    # rank and shapes
    "query-rank-1d": (na1d(query=Q2, key=Q2, value=Q2), ValueError, "query must have 4 dimensions"),
    "query-rank-2d": (na2d(query=Q1, key=Q1, value=Q1), ValueError, "query must have 5 dimensions"),
    "key-shape": (na1d(key=np.zeros((1, 15, 2, 4), F32)), ValueError, "key must have the shape of query"),
    "value-shape": (na1d(value=np.zeros((1, 15, 2, 8), F32)), ValueError, "value must have the shape of query"),
    "head-dim-zero": (na1d(query=np.zeros((1, 16, 2, 0), F32), key=np.zeros((1, 16, 2, 0), F32),
                           value=np.zeros((1, 16, 2, 0), F32)), ValueError, "head_dim"),
    # dtypes and array kinds
    "integer-dtype": (na1d(query=Q1.astype(np.int32), key=Q1.astype(np.int32), value=Q1.astype(np.int32)),
                      TypeError, "query must have a floating dtype"),
    "dtype-mismatch": (na1d(key=Q1.astype(np.float64)), TypeError, "key has dtype float64 but query has float32"),
    "not-an-array": (na1d(query=Q1.tolist()), TypeError, "query must be a NumPy array, CuPy array or torch tensor"),
    "numpy-torch-mix": (na1d(key=torch.zeros(1, 16, 2, 4)), TypeError, "key is a torch.Tensor on cpu but query is a numpy.ndarray"),
    "device-mismatch": (lambda: na_rtc.na1d(torch.zeros(1, 16, 2, 4), torch.zeros(1, 16, 2, 4, device="meta"),
                                            torch.zeros(1, 16, 2, 4), 5), ValueError, "key is on meta but query is on cpu"),
    # kernel size, stride, dilation, causal
    "kernel-size-1": (na1d(kernel_size=1), ValueError, "kernel_size must be >= 2"),
    "kernel-too-large": (na1d(kernel_size=17), ValueError, "kernel_size * dilation must not exceed the input size"),
    "kernel-times-dilation": (na1d(kernel_size=5, dilation=4), ValueError, "kernel_size 5 * dilation 4 = 20"),
    "kernel-size-float": (na1d(kernel_size=5.0), TypeError, "kernel_size must be an int or a tuple of 1 ints"),
    "kernel-size-bool": (na1d(kernel_size=True), TypeError, "kernel_size must be an int"),
    "kernel-size-tuple-length": (na2d(kernel_size=(3, 3, 3)), TypeError, "kernel_size must be an int or a tuple of 2 ints"),
    "kernel-too-large-2d-axis-1": (na2d(kernel_size=(3, 10)), ValueError, "axis 1 has size 9"),
    # shape errors say how the shape was read and where heads-first code goes
    "kernel-too-large-names-the-layout": (na2d(kernel_size=(3, 10)), ValueError,
                                          "query has shape (1, 8, 9, 2, 4). na_rtc's ops take heads-last tensors "
                                          "[batch, height, width, heads, head_dim]"),
    "key-shape-points-to-compat": (na1d(key=np.zeros((1, 15, 2, 4), F32)), ValueError,
                                   "runs unchanged through na_rtc.compat.natten014 / natten017"),
    "rank-points-to-compat": (na1d(query=Q2, key=Q2, value=Q2), ValueError, "na_rtc.compat.natten014"),
    "attn-shape-names-the-layout": (av1(attn=np.zeros((1, 15, 2, 5), F32)), ValueError,
                                    "value has shape (1, 16, 2, 4). na_rtc's ops take heads-last tensors "
                                    "[batch, length, heads, head_dim]"),
    "grad-shape-names-the-layout": (lambda: na_rtc.na1d_backward(np.zeros((1, 16, 2, 3), F32), Q1, Q1, Q1, 5),
                                    ValueError, "na_rtc's ops take heads-last tensors"),
    "stride-zero": (na1d(stride=0), ValueError, "stride must be between 1 and kernel_size"),
    "stride-above-kernel": (na1d(stride=6), ValueError, "stride must be between 1 and kernel_size"),
    "dilation-zero": (na1d(dilation=0), ValueError, "dilation must be >= 1"),
    "causal-not-bool": (na1d(is_causal=1), TypeError, "is_causal must be a bool or a tuple of 1 bools"),
    "causal-tuple-length": (na2d(is_causal=(True,)), TypeError, "is_causal must be a bool or a tuple of 2 bools"),
    "scale-string": (na1d(scale="0.5"), TypeError, "scale must be a real number"),
    # relative positional bias
    "rpb-even-kernel": (na1d(kernel_size=4, rpb=np.zeros((2, 7), F32)), ValueError, "rpb needs an odd kernel_size"),
    "rpb-with-causal": (na1d(rpb=RPB1, is_causal=True), ValueError, "rpb cannot be combined with is_causal"),
    "rpb-shape": (na1d(rpb=np.zeros((2, 5), F32)), ValueError, "rpb must have shape [heads, *(2 * kernel_size - 1)] = (2, 9)"),
    "rpb-heads": (na1d(rpb=np.zeros((3, 9), F32)), ValueError, "rpb must have shape"),
    "rpb-shape-2d": (na2d(kernel_size=(3, 5), rpb=np.zeros((2, 5, 5), F32)), ValueError, "(2, 5, 9)"),
    "rpb-integer": (na1d(rpb=np.zeros((2, 9), np.int64)), TypeError, "rpb must have a floating dtype"),
    "rpb-kind": (na1d(rpb=torch.zeros(2, 9)), TypeError, "rpb is a torch.Tensor on cpu but query is a numpy.ndarray"),
    "rpb-heads-names-the-axis": (na1d(rpb=np.zeros((3, 9), F32)), ValueError, "heads = 2 is query's axis -2"),
    # rpb dtype: the inputs' own, or float32 beside float16/bfloat16 (a full-precision parameter under AMP)
    "rpb-float64-with-float32": (na1d(rpb=RPB1.astype(np.float64)), TypeError,
                                 "rpb has dtype float64 but query has float32: rpb must be float32 with float32 "
                                 "inputs"),
    "rpb-float16-with-float32": (na1d(rpb=RPB1.astype(np.float16)), TypeError,
                                 "rpb has dtype float16 but query has float32"),
    "rpb-float32-with-float64": (lambda: na_rtc.na1d(*(Q1.astype(np.float64),) * 3, 5, rpb=RPB1), TypeError,
                                 "rpb must be float64 with float64 inputs"),
    "rpb-float64-with-float16": (lambda: na_rtc.na1d(*(Q1.astype(np.float16),) * 3, 5, rpb=RPB1.astype(np.float64)),
                                 TypeError, "rpb must be float16 or float32 with float16 inputs"),
    "rpb-bfloat16-with-float16": (lambda: na_rtc.na1d(*(torch.zeros(1, 16, 2, 4, dtype=torch.float16),) * 3, 5,
                                                      rpb=torch.zeros(2, 9, dtype=torch.bfloat16)),
                                  TypeError, "rpb has dtype bfloat16 but query has float16"),
    "qk-rpb-float64-with-float32": (qk1(rpb=RPB1.astype(np.float64)), TypeError, "rpb has dtype float64"),
    "backward-rpb-float64-with-float32": (lambda: na_rtc.na1d_backward(Q1, Q1, Q1, Q1, 5, rpb=RPB1.astype(np.float64)),
                                          TypeError, "rpb has dtype float64"),
    "qk-backward-rpb-float64-with-float32": (lambda: na_rtc.na1d_qk_backward(ATTN1, Q1, Q1, 5,
                                                                             rpb=RPB1.astype(np.float64)),
                                             TypeError, "rpb has dtype float64"),
    "qk-rpb-shape": (qk1(rpb=np.zeros((2, 7), F32)), ValueError, "rpb must have shape"),
    "qk-key-shape": (qk1(key=np.zeros((1, 16, 2, 5), F32)), ValueError, "key must have the shape of query"),
    "qk-key-heads-not-dividing": (qk1(key=np.zeros((1, 16, 3, 4), F32)), ValueError,
                                  "key has 3 heads, which must divide query's 2 heads"),
    "qk-stride-not-accepted": (lambda: na_rtc.na1d_qk(Q1, Q1, 5, stride=2), TypeError, "stride"),
    # split AV
    "attn-last-dim": (av1(attn=np.zeros((1, 16, 2, 4), F32)), ValueError, "attn's last dimension must be the number of window slots"),
    "attn-rank": (av1(attn=np.zeros((16, 2, 5), F32)), ValueError, "attn must have 4 dimensions"),
    "attn-spatial": (av1(attn=np.zeros((1, 15, 2, 5), F32)), ValueError, "attn must have shape"),
    "attn-2d-slots": (lambda: na_rtc.na2d_av(np.zeros((1, 8, 9, 2, 8), F32), Q2, 3), ValueError, "prod(kernel_size) = 9"),
    "attn-dtype": (av1(attn=ATTN1.astype(np.float64)), TypeError, "attn has dtype float64 but value has float32"),
    # backward functions
    "grad-out-shape": (lambda: na_rtc.na1d_backward(np.zeros((1, 16, 2, 3), F32), Q1, Q1, Q1, 5), ValueError,
                       "grad_out must have shape (1, 16, 2, 4)"),
    "output-without-lse": (lambda: na_rtc.na1d_backward(Q1, Q1, Q1, Q1, 5, output=Q1), ValueError,
                           "output and logsumexp must be given together"),
    "lse-shape": (lambda: na_rtc.na1d_backward(Q1, Q1, Q1, Q1, 5, output=Q1, logsumexp=np.zeros((1, 16), F32)),
                  ValueError, "logsumexp must have shape (1, 16, 2)"),
    "grad-attn-shape": (lambda: na_rtc.na1d_qk_backward(Q1, Q1, Q1, 5), ValueError, "grad_attn must have shape (1, 16, 2, 5)"),
    "av-grad-out-dtype": (lambda: na_rtc.na1d_av_backward(Q1.astype(np.float64), ATTN1, Q1, 5), TypeError,
                          "grad_out has dtype float64"),
    # 3D: per-axis arguments are triples, the first axis depth or time
    "query-rank-3d": (na3d(query=Q2, key=Q2, value=Q2), ValueError,
                      "query must have 6 dimensions [batch, depth, height, width, heads, head_dim] (heads-last)"),
    "key-shape-3d": (na3d(key=np.zeros((1, 6, 7, 7, 2, 4), F32)), ValueError, "key must have the shape of query"),
    "kernel-size-tuple-length-3d": (na3d(kernel_size=(3, 3)), TypeError,
                                    "kernel_size must be an int or a tuple of 3 ints"),
    "dilation-tuple-length-3d": (na3d(dilation=(1, 2)), TypeError, "dilation must be an int or a tuple of 3 ints"),
    "causal-tuple-length-3d": (na3d(is_causal=(True, False)), TypeError,
                               "is_causal must be a bool or a tuple of 3 bools"),
    "stride-above-kernel-3d": (na3d(stride=(1, 4, 1)), ValueError, "stride must be between 1 and kernel_size"),
    "kernel-too-large-3d-axis-2": (na3d(kernel_size=(3, 3, 9)), ValueError, "axis 2 has size 8"),
    "kernel-times-dilation-3d-axis-0": (na3d(dilation=(3, 1, 1)), ValueError, "kernel_size 3 * dilation 3 = 9"),
    "kernel-too-large-names-the-3d-layout": (na3d(kernel_size=(7, 3, 3)), ValueError,
                                             "query has shape (1, 6, 7, 8, 2, 4). na_rtc's ops take heads-last tensors "
                                             "[batch, depth, height, width, heads, head_dim]"),
    "3d-shape-points-to-compat-017": (na3d(kernel_size=(7, 3, 3)), ValueError,
                                      "runs unchanged through na_rtc.compat.natten017"),
    "rpb-shape-3d": (na3d(kernel_size=(3, 3, 5), rpb=np.zeros((2, 5, 5, 5), F32)), ValueError, "(2, 5, 5, 9)"),
    "rpb-2d-shape-in-3d": (na3d(rpb=np.zeros((2, 5, 5), F32)), ValueError,
                           "rpb must have shape [heads, *(2 * kernel_size - 1)] = (2, 5, 5, 5)"),
    "rpb-with-causal-in-time": (na3d(rpb=np.zeros((2, 5, 5, 5), F32), is_causal=(True, False, False)), ValueError,
                                "rpb cannot be combined with is_causal"),
    "rpb-even-kernel-3d": (na3d(kernel_size=(3, 4, 3), rpb=np.zeros((2, 5, 7, 5), F32)), ValueError,
                           "rpb needs an odd kernel_size"),
    "attn-3d-slots": (lambda: na_rtc.na3d_av(np.zeros((1, 6, 7, 8, 2, 26), F32), Q3, 3), ValueError,
                      "prod(kernel_size) = 27"),
    "attn-3d-spatial": (lambda: na_rtc.na3d_av(np.zeros((1, 6, 7, 7, 2, 27), F32), Q3, 3), ValueError,
                        "attn must have shape [batch, *spatial, heads, slots] = (1, 6, 7, 8, 2, 27)"),
    "qk-stride-not-accepted-3d": (lambda: na_rtc.na3d_qk(Q3, Q3, 3, stride=2), TypeError, "stride"),
    "grad-attn-shape-3d": (lambda: na_rtc.na3d_qk_backward(Q3, Q3, Q3, 3), ValueError,
                           "grad_attn must have shape (1, 6, 7, 8, 2, 27)"),
    "grad-out-shape-3d": (lambda: na_rtc.na3d_backward(Q3[..., :3], Q3, Q3, Q3, 3), ValueError,
                          "grad_out must have shape (1, 6, 7, 8, 2, 4)"),
    "av-grad-out-dtype-3d": (lambda: na_rtc.na3d_av_backward(Q3.astype(np.float64), np.zeros((1, 6, 7, 8, 2, 27), F32),
                                                             Q3, 3), TypeError, "grad_out has dtype float64"),
    # backends
    "unknown-backend": (na1d(backend="tpu"), ValueError, "unknown backend 'tpu'"),
    "3d-cuda-backend-for-numpy": (na3d(backend="cuda"), ValueError, "the cuda backend cannot run numpy arrays on CPU"),
    "cuda-backend-for-numpy": (na1d(backend="cuda"), ValueError, "the cuda backend cannot run numpy arrays on CPU"),
}


@pytest.mark.parametrize("call, error, message", CASES.values(), ids=CASES.keys())
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert message in str(raised.value)


RPB_BACKENDS = ["reference", "emulator", "cuda"]
RPB_OPS = {
    "fused": lambda q, rpb, backend: na_rtc.na1d(q, q, q, 5, rpb=rpb, backend=backend),
    "qk": lambda q, rpb, backend: na_rtc.na1d_qk(q, q, 5, rpb=rpb, backend=backend),
    "fused-backward": lambda q, rpb, backend: na_rtc.na1d_backward(q, q, q, q, 5, rpb=rpb, backend=backend),
    "qk-backward": lambda q, rpb, backend: na_rtc.na1d_qk_backward(
        torch.zeros(1, 16, 2, 5, dtype=q.dtype), q, q, 5, rpb=rpb, backend=backend),
}


@pytest.mark.parametrize("backend", RPB_BACKENDS)
@pytest.mark.parametrize("op", RPB_OPS.values(), ids=RPB_OPS.keys())
@pytest.mark.parametrize("dtype, rpb_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                              (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float64)],
                         ids=["fp32-fp64", "fp64-fp32", "fp16-bf16", "bf16-fp64"])
def test_a_mixed_rpb_dtype_is_refused_by_every_op_on_every_backend(backend, op, dtype, rpb_dtype):
    q = torch.zeros(1, 16, 2, 4, dtype=dtype)
    with pytest.raises(TypeError, match=f"rpb has dtype {str(rpb_dtype)[6:]} but query has {str(dtype)[6:]}"):
        op(q, torch.zeros(2, 9, dtype=rpb_dtype), backend)


@pytest.mark.parametrize("backend", ["reference", "emulator"])
@pytest.mark.parametrize("op", RPB_OPS.values(), ids=RPB_OPS.keys())
@pytest.mark.parametrize("dtype, rpb_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)], ids=["fp16-fp32", "bf16-fp32",
                                                                                      "bf16-bf16"])
def test_a_float32_rpb_beside_half_inputs_runs(backend, op, dtype, rpb_dtype):
    q = torch.randn(1, 16, 2, 4).to(dtype)
    result = op(q, torch.zeros(2, 9, dtype=rpb_dtype), backend)
    if isinstance(result, tuple):  # gradients: drpb has the bias' dtype
        assert result[-1].dtype == rpb_dtype


def test_unknown_backend_fails_at_use_backend():
    with pytest.raises(ValueError, match="unknown backend 'fpga'; choose one of reference"):
        na_rtc.use_backend("fpga")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_unavailable_backend_says_why(monkeypatch, kind):
    emulator = na_rtc.backends.get("emulator")
    monkeypatch.setattr(emulator, "probe", lambda: (False, "no C++ compiler found (set CXX)"))
    monkeypatch.setattr(emulator, "_ops", None)  # ops loaded by earlier tests would skip the probe
    q = Q1 if kind == "numpy" else pytest.importorskip("torch").from_numpy(Q1)
    # (torch calls probe inside the custom op, numpy calls in backends.select: same message)
    with pytest.raises(RuntimeError, match=r"the emulator backend is not available here: no C\+\+ compiler found"):
        na_rtc.na1d(q, q, q, 5, backend="emulator")


@pytest.mark.parametrize("kernel_size", [(5,), [5]], ids=["tuple", "list"])
def test_per_axis_sequences_are_accepted(kernel_size):
    out = na_rtc.na1d(Q1, Q1, Q1, kernel_size)
    assert out.shape == Q1.shape


def test_numpy_integer_scalars_are_accepted():
    out = na_rtc.na2d(Q2, Q2, Q2, np.int64(3), dilation=(np.int32(2), 1), is_causal=(np.bool_(True), False))
    assert out.shape == Q2.shape
