"""The reference backend (na_rtc.reference) against the literal definition.

Forward ops are compared with the brute-force loops of ``oracle.py``; the
backward functions with torch autograd through dense, independently built
float64 oracles (neighbor masks from the same loops), and with ``gradcheck``.
Identities of docs/design/definition.md and the tolerance table (docs/design/testing.md#tolerances) for
low-precision inputs complete the picture.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import na_rtc
from na_rtc import reference as R
from helpers import assert_close, make_inputs, noncontiguous, to_numpy64
from oracle import (
    oracle_av,
    oracle_na,
    oracle_neighbor_mask,
    oracle_qk,
    oracle_slot_index,
    per_axis,
)

# ------------------------------------------------------------------ cases


def _fmt(value):
    if isinstance(value, tuple):
        if all(isinstance(v, bool) for v in value):
            return "".join("T" if v else "F" for v in value)
        return "x".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Case:
    spatial: tuple
    kernel: int | tuple
    stride: int | tuple = 1
    dilation: int | tuple = 1
    causal: bool | tuple = False
    rpb: bool = False
    batch: int = 2
    heads: int = 2
    head_dim: int = 4

    @property
    def ndim(self):
        return len(self.spatial)

    @property
    def id(self):
        size = f"L{self.spatial[0]}" if self.ndim == 1 else _fmt(self.spatial)
        parts = [f"{self.ndim}d", size, f"k{_fmt(self.kernel)}"]
        if self.stride != 1:
            parts.append(f"s{_fmt(self.stride)}")
        if self.dilation != 1:
            parts.append(f"d{_fmt(self.dilation)}")
        if self.causal is True:
            parts.append("causal")
        elif isinstance(self.causal, tuple):
            parts.append(f"causal{_fmt(self.causal)}")
        if self.rpb:
            parts.append("rpb")
        if (self.batch, self.heads, self.head_dim) != (2, 2, 4):
            parts.append(f"b{self.batch}h{self.heads}d{self.head_dim}")
        return "-".join(parts)

    @property
    def kernels(self):
        return per_axis(self.kernel, self.ndim)

    @property
    def qkv_shape(self):
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    @property
    def attn_shape(self):
        return (self.batch, *self.spatial, self.heads, math.prod(self.kernels))

    @property
    def rpb_shape(self):
        return (self.heads, *(2 * k - 1 for k in self.kernels))

    @property
    def split(self):
        """Split ops take no stride."""
        return self.stride == 1 or set(per_axis(self.stride, self.ndim)) == {1}

    def rng(self, salt=""):
        return np.random.default_rng(zlib.crc32((self.id + salt).encode()))

    def fused_kwargs(self):
        return dict(kernel_size=self.kernel, stride=self.stride, dilation=self.dilation,
                    is_causal=self.causal)

    def split_kwargs(self):
        return dict(kernel_size=self.kernel, dilation=self.dilation, is_causal=self.causal)


FUSED_CASES = [
    Case((9,), 3, rpb=True),
    Case((8,), 4),
    Case((11,), 3, dilation=2, rpb=True),
    Case((10,), 4, stride=2, dilation=2, causal=True),
    Case((9,), 3, stride=3, causal=True),
    Case((12,), 5, stride=3, rpb=True),
    Case((7,), 7, batch=1, heads=3, head_dim=3),
    Case((13,), 2, stride=2, dilation=3),
    Case((6,), 3, causal=True, batch=3, heads=1, head_dim=5),
    Case((6, 7), 3, rpb=True),
    Case((7, 6), (3, 4), stride=(1, 2), dilation=(2, 1), causal=(True, False)),
    Case((8, 5), (2, 3), stride=(2, 3), causal=(False, True)),
    Case((6, 6), 3, dilation=2, rpb=True, batch=1),
    Case((5, 8), (4, 2), stride=(4, 1), causal=True),
    Case((9, 4), 3, stride=(3, 2), dilation=(3, 1), rpb=True, batch=1, heads=3),
    # causal without stride: the split ops' -inf slots
    Case((10,), 4, dilation=2, causal=True),
    Case((6, 5), (3, 2), dilation=(1, 2), causal=(True, False)),
    Case((5, 6), (2, 3), causal=True, heads=1),
    Case((4, 6), (4, 3), dilation=(1, 2), causal=(False, True)),
    # 3D, [batch, depth/time, height, width, heads, dim]: tiny, the oracle loops over every (query, neighbor)
    Case((4, 5, 3), 3, rpb=True, batch=1),
    Case((4, 4, 5), (2, 3, 4), stride=(2, 1, 3), causal=(True, False, False)),  # causal in time only
    Case((5, 4, 4), (2, 2, 3), dilation=(2, 1, 1), causal=(True, False, True), batch=1),
    Case((3, 4, 6), 3, dilation=(1, 1, 2), rpb=True, batch=1, heads=1),
    Case((4, 4, 4), (4, 2, 3), stride=(4, 2, 1), heads=1),
]
CASES_3D = [c for c in FUSED_CASES if c.ndim == 3]
SPLIT_CASES = [c for c in FUSED_CASES if c.split]
RPB_CASES = [c for c in FUSED_CASES if c.rpb]
IDS = lambda cases: [c.id for c in cases]  # noqa: E731

NA = {1: R.na1d, 2: R.na2d, 3: R.na3d}
QK = {1: R.na1d_qk, 2: R.na2d_qk, 3: R.na3d_qk}
AV = {1: R.na1d_av, 2: R.na2d_av, 3: R.na3d_av}
NA_BWD = {1: R.na1d_backward, 2: R.na2d_backward, 3: R.na3d_backward}
QK_BWD = {1: R.na1d_qk_backward, 2: R.na2d_qk_backward, 3: R.na3d_qk_backward}
AV_BWD = {1: R.na1d_av_backward, 2: R.na2d_av_backward, 3: R.na3d_av_backward}


@functools.lru_cache(maxsize=None)
def fused_data(case: Case):
    """float64 NumPy inputs and the oracle's (out, lse)."""
    (q, k, v), _ = make_inputs(case.rng("qkv"), case.qkv_shape, np.float64, 3)
    rpb = make_inputs(case.rng("rpb"), case.rpb_shape, np.float64)[0][0] if case.rpb else None
    out, lse = oracle_na(q, k, v, case.kernel, case.stride, case.dilation, case.causal, None, rpb)
    return q, k, v, rpb, out, lse


@functools.lru_cache(maxsize=None)
def split_data(case: Case):
    """Inputs and oracle outputs of qk (pre-scaled query) and av (random weights,
    including the slots past causal windows, which av must ignore)."""
    q, k, v, rpb, _, _ = fused_data(case)
    q = q * case.head_dim ** -0.5
    attn = oracle_qk(q, k, case.kernel, case.dilation, case.causal, rpb)
    (weights,), _ = make_inputs(case.rng("attn"), case.attn_shape, np.float64)
    out = oracle_av(weights, v, case.kernel, case.dilation, case.causal)
    return q, k, v, rpb, attn, weights, out


def as_lib(lib, x, layout="contiguous"):
    if x is None:
        return None
    if lib == "torch":
        x = torch.from_numpy(np.array(x))
    if layout == "heads-first-view":
        x = noncontiguous(x)
    return x


def kind_ok(lib, x, dtype=np.float64):
    if lib == "torch":
        return isinstance(x, torch.Tensor) and x.dtype == getattr(torch, np.dtype(dtype).name)
    return isinstance(x, np.ndarray) and x.dtype == np.dtype(dtype)


LIBS = ["numpy", "torch"]
LAYOUTS = ["contiguous", "heads-first-view"]


# ------------------------------------------------------------------ forward vs oracle


@pytest.mark.parametrize("case", FUSED_CASES, ids=IDS(FUSED_CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lib", LIBS)
def test_fused_matches_oracle(lib, layout, case):
    q, k, v, rpb, out_ref, lse_ref = fused_data(case)
    q, k, v = (as_lib(lib, x, layout) for x in (q, k, v))
    out, lse = NA[case.ndim](q, k, v, **case.fused_kwargs(), rpb=as_lib(lib, rpb), return_lse=True)
    assert kind_ok(lib, out) and kind_ok(lib, lse)
    assert_close(out, out_ref, np.float64, "forward", "out")
    assert_close(lse, lse_ref, np.float64, "forward", "lse")
    # return_lse=False gives the output alone, the same values
    alone = NA[case.ndim](q, k, v, **case.fused_kwargs(), rpb=as_lib(lib, rpb))
    assert_close(alone, out_ref, np.float64, "forward", "out")


@pytest.mark.parametrize("case", FUSED_CASES[:3] + FUSED_CASES[9:11], ids=IDS(FUSED_CASES[:3] + FUSED_CASES[9:11]))
def test_fused_explicit_scale(case):
    q, k, v, rpb, _, _ = fused_data(case)
    out_ref, lse_ref = oracle_na(q, k, v, case.kernel, case.stride, case.dilation, case.causal, 0.37, rpb)
    out, lse = NA[case.ndim](q, k, v, **case.fused_kwargs(), scale=0.37, rpb=rpb, return_lse=True)
    assert_close(out, out_ref, np.float64, "forward", "out")
    assert_close(lse, lse_ref, np.float64, "forward", "lse")


@pytest.mark.parametrize("case", SPLIT_CASES, ids=IDS(SPLIT_CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lib", LIBS)
def test_qk_matches_oracle(lib, layout, case):
    q, k, _, rpb, attn_ref, _, _ = split_data(case)
    attn = QK[case.ndim](as_lib(lib, q, layout), as_lib(lib, k, layout), **case.split_kwargs(),
                         rpb=as_lib(lib, rpb))
    assert kind_ok(lib, attn)
    assert_close(attn, attn_ref, np.float64, "forward", "attn")


@pytest.mark.parametrize("case", SPLIT_CASES, ids=IDS(SPLIT_CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lib", LIBS)
def test_av_matches_oracle(lib, layout, case):
    _, _, v, _, _, weights, out_ref = split_data(case)
    out = AV[case.ndim](as_lib(lib, weights, layout), as_lib(lib, v, layout), **case.split_kwargs())
    assert kind_ok(lib, out)
    assert_close(out, out_ref, np.float64, "forward", "out")


@st.composite
def random_cases(draw):
    """Small random problems: 1D, 2D or 3D, per-axis k (odd or even), s, d, causal; rpb when allowed."""
    ndim = draw(st.integers(1, 3))
    max_length = {1: 12, 2: 6, 3: 4}[ndim]
    spatial, kernel, stride, dilation, causal = [], [], [], [], []
    for _ in range(ndim):
        k = draw(st.integers(2, 5 if ndim == 1 else 3))
        d = draw(st.integers(1, max(1, max_length // k)))
        spatial.append(draw(st.integers(k * d, max(k * d, max_length))))
        kernel.append(k)
        stride.append(draw(st.integers(1, k)))
        dilation.append(d)
        causal.append(draw(st.booleans()))
    rpb = not any(causal) and all(k % 2 for k in kernel) and draw(st.booleans())
    return Case(tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal), rpb,
                batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)),
                head_dim=draw(st.integers(1, 3)))


@settings(max_examples=40, deadline=None)
@given(random_cases())
def test_random_configs_match_oracle(case):
    q, k, v, rpb, out_ref, lse_ref = fused_data(case)
    out, lse = NA[case.ndim](q, k, v, **case.fused_kwargs(), rpb=rpb, return_lse=True)
    assert_close(out, out_ref, np.float64, "forward", f"out {case.id}")
    assert_close(lse, lse_ref, np.float64, "forward", f"lse {case.id}")
    split = Case(case.spatial, case.kernel, 1, case.dilation, case.causal, case.rpb,
                 case.batch, case.heads, case.head_dim)
    q, k, v, rpb, attn_ref, weights, av_ref = split_data(split)
    assert_close(QK[case.ndim](q, k, **split.split_kwargs(), rpb=rpb), attn_ref, np.float64,
                 "forward", f"attn {split.id}")
    assert_close(AV[case.ndim](weights, v, **split.split_kwargs()), av_ref, np.float64,
                 "forward", f"av {split.id}")


def test_qk_causal_slots_hold_minus_inf():
    # L=5, k=3, causal: windows [0], [0,1], [0,1,2], [1,2,3], [2,3,4]
    q = np.ones((1, 5, 1, 1))
    attn = R.na1d_qk(q, q, 3, is_causal=True)[0, :, 0, :]
    expected = np.array([[1, -np.inf, -np.inf], [1, 1, -np.inf], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(attn, expected)


# ------------------------------------------------------------------ dense torch oracles (autograd)


def _dense_fused(case, q, k, v, rpb, scale=None):
    """Masked full attention over the oracle's neighbor mask: (out, lse), differentiable."""
    mask, bias_index = oracle_neighbor_mask(case.spatial, case.kernel, case.stride, case.dilation,
                                            case.causal)
    B, H, D = case.batch, case.heads, case.head_dim
    N = math.prod(case.spatial)
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = (x.reshape(B, N, H, D) for x in (q, k, v))
    logits = scale * torch.einsum("bnhd,bmhd->bhnm", qf, kf)
    if rpb is not None:
        index = (slice(None), *(torch.from_numpy(bias_index[..., a]) for a in range(case.ndim)))
        logits = logits + rpb[index][None]  # [1, H, N, N]
    logits = logits.masked_fill(~torch.from_numpy(mask), -math.inf)
    out = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(logits, -1), vf)
    lse = torch.logsumexp(logits, -1).transpose(1, 2)
    return out.reshape(case.qkv_shape), lse.reshape(case.qkv_shape[:-1])


def _slot_bias(case, rpb, bias_index):
    index = (slice(None), *(torch.from_numpy(bias_index[..., a]) for a in range(case.ndim)))
    return rpb[index].permute(1, 0, 2)  # [N, H, K]


def _dense_qk(case, q, k, rpb):
    keys, bias_index = oracle_slot_index(case.spatial, case.kernel, case.dilation, case.causal)
    B, H, D = case.batch, case.heads, case.head_dim
    N = math.prod(case.spatial)
    valid = torch.from_numpy(keys >= 0)
    gathered = k.reshape(B, N, H, D)[:, torch.from_numpy(np.maximum(keys, 0))]  # [B, N, K, H, D]
    attn = torch.einsum("bnhd,bnkhd->bnhk", q.reshape(B, N, H, D), gathered)
    if rpb is not None:
        attn = attn + _slot_bias(case, rpb, bias_index)[None]
    attn = attn.masked_fill(~valid[None, :, None, :], -math.inf)
    return attn.reshape(case.attn_shape)


def _dense_av(case, attn, v):
    keys, _ = oracle_slot_index(case.spatial, case.kernel, case.dilation, case.causal)
    B, H, D = case.batch, case.heads, case.head_dim
    N, K = keys.shape
    valid = torch.from_numpy(keys >= 0)
    weights = attn.reshape(B, N, H, K).masked_fill(~valid[None, :, None, :], 0.0)
    gathered = v.reshape(B, N, H, D)[:, torch.from_numpy(np.maximum(keys, 0))]
    return torch.einsum("bnhk,bnkhd->bnhd", weights, gathered).reshape(case.qkv_shape)


def _leaves(*arrays):
    return [None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=True)
            for a in arrays]


def _grads(output, grad, leaves):
    output.backward(torch.from_numpy(grad))
    return [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("case", FUSED_CASES[:6] + FUSED_CASES[9:12], ids=IDS(FUSED_CASES[:6] + FUSED_CASES[9:12]))
def test_dense_oracle_agrees_with_loop_oracle(case):
    """The dense torch oracle used for gradients is itself the definition."""
    q, k, v, rpb, out_ref, lse_ref = fused_data(case)
    out, lse = _dense_fused(case, *(None if x is None else torch.from_numpy(x) for x in (q, k, v, rpb)))
    assert_close(out, out_ref, np.float64, "forward", "dense out")
    assert_close(lse, lse_ref, np.float64, "forward", "dense lse")
    if case.split:
        sq, sk, sv, srpb, attn_ref, weights, av_ref = split_data(case)
        t = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
        assert_close(_dense_qk(case, t(sq), t(sk), t(srpb)), attn_ref, np.float64, "forward", "dense attn")
        assert_close(_dense_av(case, t(weights), t(sv)), av_ref, np.float64, "forward", "dense av")


# ------------------------------------------------------------------ backward vs dense autograd

BWD_CASES = FUSED_CASES[:6] + FUSED_CASES[9:]


@pytest.mark.parametrize("case", BWD_CASES, ids=IDS(BWD_CASES))
@pytest.mark.parametrize("lib", LIBS)
def test_fused_backward_matches_autograd_oracle(lib, case):
    q, k, v, rpb, _, _ = fused_data(case)
    (dout,), _ = make_inputs(case.rng("dout"), case.qkv_shape, np.float64)
    leaves = _leaves(q, k, v, rpb)
    out_ref, _ = _dense_fused(case, *leaves)
    expected = _grads(out_ref, dout, leaves)

    args = [as_lib(lib, x) for x in (dout, q, k, v)]
    rpb_lib = as_lib(lib, rpb)
    recomputed = NA_BWD[case.ndim](*args, **case.fused_kwargs(), rpb=rpb_lib)
    out, lse = NA[case.ndim](*args[1:], **case.fused_kwargs(), rpb=rpb_lib, return_lse=True)
    saved = NA_BWD[case.ndim](*args, **case.fused_kwargs(), rpb=rpb_lib, output=out, logsumexp=lse)
    for grads in (recomputed, saved):
        assert len(grads) == 4
        for name, got, want in zip(("dq", "dk", "dv", "drpb"), grads, expected):
            if want is None:
                assert got is None, name
            else:
                assert kind_ok(lib, got), name
                assert_close(got, want, np.float64, "grad", name)


@pytest.mark.parametrize("case", BWD_CASES, ids=IDS(BWD_CASES))
def test_fused_torch_autograd_matches_autograd_oracle(case):
    """Gradients of a loss on the output and the logsumexp (both differentiable)."""
    q, k, v, rpb, _, _ = fused_data(case)
    (dout,), _ = make_inputs(case.rng("dout"), case.qkv_shape, np.float64)
    (dlse,), _ = make_inputs(case.rng("dlse"), case.qkv_shape[:-1], np.float64)

    def grads(out, lse, leaves):
        torch.autograd.backward((out, lse), (torch.from_numpy(dout), torch.from_numpy(dlse)))
        return [None if x is None else x.grad for x in leaves]

    leaves = _leaves(q, k, v, rpb)
    expected = grads(*_dense_fused(case, *leaves), leaves)
    ours = _leaves(q, k, v, rpb)
    out, lse = NA[case.ndim](*ours[:3], **case.fused_kwargs(), rpb=ours[3], return_lse=True)
    for name, got, want in zip(("dq", "dk", "dv", "drpb"), grads(out, lse, ours), expected):
        if want is not None:
            assert_close(got, want, np.float64, "grad", name)


@pytest.mark.parametrize("case", SPLIT_CASES, ids=IDS(SPLIT_CASES))
@pytest.mark.parametrize("lib", LIBS)
def test_qk_backward_matches_autograd_oracle(lib, case):
    q, k, _, rpb, _, _, _ = split_data(case)
    # gradients arrive in every slot; those past a causal window must be ignored
    (dattn,), _ = make_inputs(case.rng("dattn"), case.attn_shape, np.float64)
    leaves = _leaves(q, k, rpb)
    expected = _grads(_dense_qk(case, *leaves), dattn, leaves)
    grads = QK_BWD[case.ndim](*(as_lib(lib, x) for x in (dattn, q, k)), **case.split_kwargs(),
                              rpb=as_lib(lib, rpb))
    assert len(grads) == 3
    for name, got, want in zip(("dq", "dk", "drpb"), grads, expected):
        if want is None:
            assert got is None, name
        else:
            assert kind_ok(lib, got), name
            assert_close(got, want, np.float64, "grad", name)
    # torch autograd through the reference
    ours = _leaves(q, k, rpb)
    attn = QK[case.ndim](ours[0], ours[1], **case.split_kwargs(), rpb=ours[2])
    for name, got, want in zip(("dq", "dk", "drpb"), _grads(attn, dattn, ours), expected):
        if want is not None:
            assert_close(got, want, np.float64, "grad", name)


@pytest.mark.parametrize("case", SPLIT_CASES, ids=IDS(SPLIT_CASES))
@pytest.mark.parametrize("lib", LIBS)
def test_av_backward_matches_autograd_oracle(lib, case):
    _, _, v, _, _, weights, _ = split_data(case)
    (dout,), _ = make_inputs(case.rng("dout"), case.qkv_shape, np.float64)
    leaves = _leaves(weights, v)
    expected = _grads(_dense_av(case, *leaves), dout, leaves)  # dattn is 0 past causal windows
    grads = AV_BWD[case.ndim](*(as_lib(lib, x) for x in (dout, weights, v)), **case.split_kwargs())
    assert len(grads) == 2
    for name, got, want in zip(("dattn", "dv"), grads, expected):
        assert kind_ok(lib, got), name
        assert_close(got, want, np.float64, "grad", name)
    ours = _leaves(weights, v)
    out = AV[case.ndim](*ours, **case.split_kwargs())
    for name, got, want in zip(("dattn", "dv"), _grads(out, dout, ours), expected):
        assert_close(got, want, np.float64, "grad", name)


def test_backward_accepts_noncontiguous_inputs():
    case = FUSED_CASES[10]  # 2D, causal on one axis, stride and dilation
    q, k, v, _, _, _ = fused_data(case)
    (dout,), _ = make_inputs(case.rng("dout"), case.qkv_shape, np.float64)
    plain = R.na2d_backward(dout, q, k, v, **case.fused_kwargs())
    views = R.na2d_backward(*(noncontiguous(x) for x in (dout, q, k, v)), **case.fused_kwargs())
    for name, a, b in zip(("dq", "dk", "dv"), views, plain):
        assert_close(a, b, np.float64, "grad", name)


# ------------------------------------------------------------------ gradcheck


def _tiny(case):
    return Case(case.spatial, case.kernel, case.stride, case.dilation, case.causal, case.rpb,
                batch=1, heads=2, head_dim=2)


GRADCHECK_FUSED = [
    Case((6,), 3), Case((7,), 3, rpb=True), Case((8,), 4, stride=2, causal=True),
    Case((9,), 3, stride=3, dilation=2), Case((7,), 3, stride=2, rpb=True),
    Case((4, 5), 3, rpb=True), Case((5, 4), (2, 3), stride=(2, 1), causal=(True, False)),
    Case((6, 4), (2, 2), dilation=(2, 1), causal=(False, True)),
    Case((3, 3, 4), 3, rpb=True), Case((4, 3, 3), (2, 3, 2), stride=(2, 1, 1), causal=(True, False, False)),
]
GRADCHECK_SPLIT = [
    Case((7,), 3, rpb=True), Case((6,), 4, causal=True), Case((9,), 3, dilation=2),
    Case((4, 5), 3, rpb=True), Case((5, 4), (3, 2), dilation=(1, 2), causal=(True, False)),
    Case((3, 4, 3), 3, rpb=True), Case((4, 3, 3), (2, 3, 2), dilation=(2, 1, 1), causal=(True, False, True)),
]


def _gradcheck_inputs(case, salt, *shapes):
    rng = case.rng(salt)
    return [torch.tensor(rng.standard_normal(s), dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("case", GRADCHECK_FUSED, ids=IDS(GRADCHECK_FUSED))
def test_gradcheck_fused(case):
    case = _tiny(case)
    shapes = [case.qkv_shape] * 3 + ([case.rpb_shape] if case.rpb else [])
    inputs = _gradcheck_inputs(case, "gradcheck", *shapes)
    kwargs = case.fused_kwargs()

    def fn(q, k, v, rpb=None):
        return NA[case.ndim](q, k, v, **kwargs, scale=0.8, rpb=rpb)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("case", GRADCHECK_SPLIT, ids=IDS(GRADCHECK_SPLIT))
def test_gradcheck_qk(case):
    case = _tiny(case)
    shapes = [case.qkv_shape] * 2 + ([case.rpb_shape] if case.rpb else [])
    inputs = _gradcheck_inputs(case, "gradcheck-qk", *shapes)
    kwargs = case.split_kwargs()

    def fn(q, k, rpb=None):
        attn = QK[case.ndim](q, k, **kwargs, rpb=rpb)
        # gradcheck perturbs inputs; -inf slots have no gradient, keep them finite
        return torch.where(torch.isfinite(attn), attn, torch.zeros_like(attn))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("case", GRADCHECK_SPLIT, ids=IDS(GRADCHECK_SPLIT))
def test_gradcheck_av(case):
    case = _tiny(case)
    inputs = _gradcheck_inputs(case, "gradcheck-av", case.attn_shape, case.qkv_shape)
    kwargs = case.split_kwargs()
    assert torch.autograd.gradcheck(lambda a, v: AV[case.ndim](a, v, **kwargs), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_composed_split_ops():
    """qk -> softmax -> av, differentiated end to end, in 2D with rpb."""
    case = Case((3, 4), 3, rpb=True, batch=1, heads=1, head_dim=2)
    q, k, v, rpb = _gradcheck_inputs(case, "composed", case.qkv_shape, case.qkv_shape,
                                     case.qkv_shape, case.rpb_shape)

    def fn(q, k, v, rpb):
        attn = torch.softmax(R.na2d_qk(q * 0.7, k, 3, rpb=rpb), -1)
        return R.na2d_av(attn, v, 3)

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb), eps=1e-6, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------ identities (section 2)


def _softmax(x):
    m = x.max(-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(-1, keepdims=True), (m + np.log(e.sum(-1, keepdims=True)))[..., 0]


def _full_attention(q, k, v, scale, mask=None):
    """Heads-last attention over flattened tokens with an optional [N, N] mask."""
    B, H = q.shape[0], q.shape[-2]
    qf, kf, vf = (x.reshape(B, -1, H, x.shape[-1]) for x in (q, k, v))
    logits = scale * np.einsum("bnhd,bmhd->bhnm", qf, kf)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    p, lse = _softmax(logits)
    out = np.einsum("bhnm,bmhd->bnhd", p, vf)
    return out.reshape(q.shape[:-1] + (v.shape[-1],)), lse.transpose(0, 2, 1).reshape(q.shape[:-1])


@pytest.mark.parametrize("spatial,kernel,dilation", [
    ((9,), 9, 1), ((10,), 10, 1), ((5, 6), (5, 6), 1), ((4, 7), (4, 7), 1), ((3, 4, 5), (3, 4, 5), 1),
], ids=["1d-L9-k9", "1d-L10-k10", "2d-5x6-k5x6", "2d-4x7-k4x7", "3d-3x4x5-k3x4x5"])
def test_kernel_equal_to_length_is_full_attention(spatial, kernel, dilation):
    rng = np.random.default_rng(1)
    (q, k, v), _ = make_inputs(rng, (2, *spatial, 3, 4), np.float64, 3)
    out, lse = NA[len(spatial)](q, k, v, kernel, dilation=dilation, return_lse=True)
    want_out, want_lse = _full_attention(q, k, v, 0.5)
    assert_close(out, want_out, np.float64, "forward", "out")
    assert_close(lse, want_lse, np.float64, "forward", "lse")


@pytest.mark.parametrize("L", [6, 11])
def test_causal_kernel_equal_to_length_is_causal_attention(L):
    rng = np.random.default_rng(L)
    (q, k, v), _ = make_inputs(rng, (2, L, 2, 3), np.float64, 3)
    out, lse = R.na1d(q, k, v, L, is_causal=True, return_lse=True)
    want_out, want_lse = _full_attention(q, k, v, 3 ** -0.5, np.tril(np.ones((L, L), dtype=bool)))
    assert_close(out, want_out, np.float64, "forward", "out")
    assert_close(lse, want_lse, np.float64, "forward", "lse")


def _blocked_mask(lengths, kernels, dilations):
    """Tokens attend within their (dilation group, block of k group coordinates), per axis."""
    per_axis_masks = []
    for L, k, d in zip(lengths, kernels, dilations):
        i = np.arange(L)
        same_group = (i[:, None] % d) == (i[None, :] % d)
        same_block = ((i[:, None] // d) // k) == ((i[None, :] // d) // k)
        per_axis_masks.append(same_group & same_block)
    mask = per_axis_masks[0]
    for m in per_axis_masks[1:]:
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(
            mask.shape[0] * m.shape[0], -1)
    return mask


@pytest.mark.parametrize("spatial,kernel,dilation", [
    ((12,), 4, 1), ((12,), 3, 2), ((6, 8), (3, 4), 1), ((8, 6), (2, 3), (2, 1)), ((4, 6, 4), (2, 3, 2), (1, 1, 2)),
], ids=["1d-L12-k4", "1d-L12-k3-d2", "2d-6x8-k3x4", "2d-8x6-k2x3-d2x1", "3d-4x6x4-k2x3x2-d1x1x2"])
def test_stride_equal_to_kernel_is_blocked_attention(spatial, kernel, dilation):
    rng = np.random.default_rng(2)
    (q, k, v), _ = make_inputs(rng, (2, *spatial, 2, 4), np.float64, 3)
    out, lse = NA[len(spatial)](q, k, v, kernel, stride=kernel, dilation=dilation, return_lse=True)
    mask = _blocked_mask(spatial, per_axis(kernel, len(spatial)), per_axis(dilation, len(spatial)))
    want_out, want_lse = _full_attention(q, k, v, 0.5, mask)
    assert_close(out, want_out, np.float64, "forward", "out")
    assert_close(lse, want_lse, np.float64, "forward", "lse")


COMPOSE_CASES = [c for c in SPLIT_CASES] + [Case((7, 7), (3, 5), dilation=(2, 1), rpb=True),
                                             Case((4, 6, 5), (3, 3, 5), dilation=(1, 2, 1), rpb=True, batch=1)]


@pytest.mark.parametrize("case", COMPOSE_CASES, ids=IDS(COMPOSE_CASES))
@pytest.mark.parametrize("lib", LIBS)
def test_fused_equals_softmax_of_split_ops(lib, case):
    """fused(q, k, v, scale, rpb) == av(softmax(qk(scale * q, k, rpb)), v)."""
    (q, k, v), _ = make_inputs(case.rng("compose"), case.qkv_shape, np.float64, 3)
    rpb = make_inputs(case.rng("rpb"), case.rpb_shape, np.float64)[0][0] if case.rpb else None
    scale = 0.61
    q, k, v, rpb = (as_lib(lib, x) for x in (q, k, v, rpb))
    out, lse = NA[case.ndim](q, k, v, **case.split_kwargs(), scale=scale, rpb=rpb, return_lse=True)
    logits = to_numpy64(QK[case.ndim](q * scale, k, **case.split_kwargs(), rpb=rpb))
    weights, want_lse = _softmax(logits)
    composed = AV[case.ndim](as_lib(lib, weights), v, **case.split_kwargs())
    assert_close(out, composed, np.float64, "forward", "out")
    assert_close(lse, want_lse, np.float64, "forward", "lse")


@pytest.mark.parametrize("case", [c for c in RPB_CASES if c.split], ids=IDS([c for c in RPB_CASES if c.split]))
def test_rpb_shifts_logits_by_relative_position(case):
    q, k, _, rpb, _, _, _ = split_data(case)
    with_bias = QK[case.ndim](q, k, **case.split_kwargs(), rpb=rpb)
    without = QK[case.ndim](q, k, **case.split_kwargs())
    _, bias_index = oracle_slot_index(case.spatial, case.kernel, case.dilation, case.causal)
    # shift[n, h, t] = rpb[h, *bias_index[n, t]]
    shift = rpb[(slice(None), *(bias_index[..., a] for a in range(case.ndim)))].transpose(1, 0, 2)
    expected = shift.reshape(case.attn_shape[1:])[None]
    assert_close(with_bias - without, np.broadcast_to(expected, case.attn_shape), np.float64,
                 "forward", "attn shift")


def test_rpb_one_hot_hand_checked():
    # L=5, k=3: query 0 window [0,1,2] -> offsets 0,1,2 -> rpb indices 2,3,4;
    # query 2 window [1,2,3] -> indices 1,2,3; query 4 window [2,3,4] -> 0,1,2.
    q = np.zeros((1, 5, 1, 2))
    rpb = np.arange(5, dtype=np.float64)[None] * 10
    attn = R.na1d_qk(q, q, 3, rpb=rpb)[0, :, 0, :]
    np.testing.assert_array_equal(attn, [[20, 30, 40], [10, 20, 30], [10, 20, 30],
                                         [10, 20, 30], [0, 10, 20]])
    out, lse = R.na1d(q, q, np.ones((1, 5, 1, 2)), 3, rpb=rpb, return_lse=True)
    np.testing.assert_allclose(lse[0, :, 0], [
        np.log(np.exp([20, 30, 40]).sum()), np.log(np.exp([10, 20, 30]).sum()),
        np.log(np.exp([10, 20, 30]).sum()), np.log(np.exp([10, 20, 30]).sum()),
        np.log(np.exp([0, 10, 20]).sum())], rtol=1e-12)


# ------------------------------------------------------------------ backends and kinds agree


@pytest.mark.parametrize("case", FUSED_CASES, ids=IDS(FUSED_CASES))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numpy_and_torch_references_agree(dtype, case):
    q, k, v, rpb, _, _ = fused_data(case)
    q, k, v, rpb = (None if x is None else x.astype(dtype) for x in (q, k, v, rpb))
    np_out, np_lse = NA[case.ndim](q, k, v, **case.fused_kwargs(), rpb=rpb, return_lse=True)
    t = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
    t_out, t_lse = NA[case.ndim](t(q), t(k), t(v), **case.fused_kwargs(), rpb=t(rpb), return_lse=True)
    assert np_out.dtype == np.dtype(dtype) and t_out.dtype == getattr(torch, dtype)
    assert_close(t_out, np_out, dtype, "forward", "out")
    assert_close(t_lse, np_lse, dtype, "forward", "lse")


@pytest.mark.parametrize("op", ["na1d", "na1d_qk", "na1d_av", "na2d", "na2d_qk", "na2d_av", "na3d", "na3d_qk",
                                "na3d_av"])
def test_the_reference_module_is_the_reference_backend(op):
    """``na_rtc.reference`` holds the public functions pinned to the reference backend (CPU arrays take the blocked
    backend by default)."""
    case = {"na1d": FUSED_CASES[0], "na2d": FUSED_CASES[9], "na3d": CASES_3D[0]}[op[:4]]
    q, k, v, rpb, _, weights, _ = split_data(case)
    if op.endswith("_qk"):
        args, kwargs = (q, k), dict(case.split_kwargs(), rpb=rpb)
    elif op.endswith("_av"):
        args, kwargs = (weights, v), case.split_kwargs()
    else:
        args, kwargs = (q, k, v), dict(case.fused_kwargs(), rpb=rpb)
    np.testing.assert_array_equal(getattr(na_rtc, op)(*args, **kwargs, backend="reference"),
                                  getattr(R, op)(*args, **kwargs))


# ------------------------------------------------------------------ low precision (section 8)

LOWP_CASES = [FUSED_CASES[0], FUSED_CASES[3], FUSED_CASES[9], FUSED_CASES[10], CASES_3D[0], CASES_3D[1]]
DTYPES = [
    pytest.param(np.float32, id="numpy-fp32"),
    pytest.param(np.float16, id="numpy-fp16"),
    pytest.param(torch.float32, id="torch-fp32"),
    pytest.param(torch.float16, id="torch-fp16"),
    pytest.param(torch.bfloat16, id="torch-bf16"),
]


def _lowp(case, dtype, salt):
    rng = case.rng(salt)
    (q, k, v, dout), (q64, k64, v64, dout64) = make_inputs(rng, case.qkv_shape, dtype, 4)
    rpb = rpb64 = None
    if case.rpb:
        (rpb,), (rpb64,) = make_inputs(rng, case.rpb_shape, dtype)
    return (q, k, v, rpb, dout), (q64, k64, v64, rpb64, dout64)


def _expected_lse_dtype(dtype):
    return "float64" if dtype in (np.float64, torch.float64) else "float32"


@pytest.mark.parametrize("case", LOWP_CASES, ids=IDS(LOWP_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_fused_within_table(dtype, case):
    (q, k, v, rpb, dout), (q64, k64, v64, rpb64, dout64) = _lowp(case, dtype, "lowp")
    kw = case.fused_kwargs()
    out, lse = NA[case.ndim](q, k, v, **kw, rpb=rpb, return_lse=True)
    out64, lse64 = NA[case.ndim](q64, k64, v64, **kw, rpb=rpb64, return_lse=True)
    assert out.dtype == q.dtype
    assert str(lse.dtype).replace("torch.", "") == _expected_lse_dtype(dtype)
    assert_close(out, out64, dtype, "forward", "out")
    assert_close(lse, lse64, dtype, "forward", "lse")
    grads = NA_BWD[case.ndim](dout, q, k, v, **kw, rpb=rpb)
    grads64 = NA_BWD[case.ndim](dout64, q64, k64, v64, **kw, rpb=rpb64)
    for name, got, want in zip(("dq", "dk", "dv", "drpb"), grads, grads64):
        if want is None:
            assert got is None
            continue
        assert got.dtype == q.dtype, name
        assert_close(got, want, dtype, "grad", name)


@pytest.mark.parametrize("case", [c for c in LOWP_CASES if c.split], ids=IDS([c for c in LOWP_CASES if c.split]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_split_within_table(dtype, case):
    (q, k, v, rpb, dout), (q64, k64, v64, rpb64, dout64) = _lowp(case, dtype, "lowp-split")
    scale = case.head_dim ** -0.5  # power of two: pre-scaling is exact in every dtype
    kw = case.split_kwargs()
    attn = QK[case.ndim](q * scale, k, **kw, rpb=rpb)
    attn64 = QK[case.ndim](q64 * scale, k64, **kw, rpb=rpb64)
    assert_close(attn, attn64, dtype, "forward", "attn")
    (weights, dattn), (weights64, dattn64) = make_inputs(case.rng("w"), case.attn_shape, dtype, 2)
    out = AV[case.ndim](weights, v, **kw)
    assert_close(out, AV[case.ndim](weights64, v64, **kw), dtype, "forward", "out")
    for name, got, want in zip(
            ("dq", "dk", "drpb"), QK_BWD[case.ndim](dattn, q * scale, k, **kw, rpb=rpb),
            QK_BWD[case.ndim](dattn64, q64 * scale, k64, **kw, rpb=rpb64)):
        if want is not None:
            assert_close(got, want, dtype, "grad", name)
    for name, got, want in zip(("dattn", "dv"), AV_BWD[case.ndim](dout, weights, v, **kw),
                               AV_BWD[case.ndim](dout64, weights64, v64, **kw)):
        assert_close(got, want, dtype, "grad", name)
