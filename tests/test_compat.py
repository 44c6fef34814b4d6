"""na_rtc.compat.natten014 / natten017: NATTEN's historical names, argument
order, layouts and state-dict keys, running on na_rtc's ops through strided
views.

The expected signatures and state-dict keys below are written by hand from
NATTEN's sources (SHI-Labs/NATTEN, tag v0.14.6: src/natten/functional.py,
natten1d.py, natten2d.py; tag v0.17.5 (and v0.17.0): src/natten/functional.py,
na1d.py, na2d.py, na3d.py; the deprecated 3D ops natten3dqkrpb/natten3dqk/
natten3dav from v0.15.0-v0.17.4's src/natten/functional.py, gone in v0.17.5)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import na_rtc
from na_rtc import backends
from na_rtc.compat import natten014, natten017

from helpers import assert_close
from oracle import oracle_neighbor_mask, oracle_qk

REQUIRED = inspect.Parameter.empty

# ---------------------------------------------------------------- signatures

SIGNATURES = {
    "014.natten1dqkrpb": (natten014.natten1dqkrpb, [("query", REQUIRED), ("key", REQUIRED), ("rpb", REQUIRED),
                                                    ("kernel_size", REQUIRED), ("dilation", REQUIRED)]),
    "014.natten2dqkrpb": (natten014.natten2dqkrpb, [("query", REQUIRED), ("key", REQUIRED), ("rpb", REQUIRED),
                                                    ("kernel_size", REQUIRED), ("dilation", REQUIRED)]),
    "014.natten1dqk": (natten014.natten1dqk, [("query", REQUIRED), ("key", REQUIRED), ("kernel_size", REQUIRED),
                                              ("dilation", REQUIRED)]),
    "014.natten2dqk": (natten014.natten2dqk, [("query", REQUIRED), ("key", REQUIRED), ("kernel_size", REQUIRED),
                                              ("dilation", REQUIRED)]),
    "014.natten1dav": (natten014.natten1dav, [("attn", REQUIRED), ("value", REQUIRED), ("kernel_size", REQUIRED),
                                              ("dilation", REQUIRED)]),
    "014.natten2dav": (natten014.natten2dav, [("attn", REQUIRED), ("value", REQUIRED), ("kernel_size", REQUIRED),
                                              ("dilation", REQUIRED)]),
    "014.NeighborhoodAttention1D": (natten014.NeighborhoodAttention1D, [
        ("dim", REQUIRED), ("num_heads", REQUIRED), ("kernel_size", REQUIRED), ("dilation", 1), ("bias", True),
        ("qkv_bias", True), ("qk_scale", None), ("attn_drop", 0.0), ("proj_drop", 0.0)]),
    "014.NeighborhoodAttention2D": (natten014.NeighborhoodAttention2D, [
        ("dim", REQUIRED), ("num_heads", REQUIRED), ("kernel_size", REQUIRED), ("dilation", 1), ("bias", True),
        ("qkv_bias", True), ("qk_scale", None), ("attn_drop", 0.0), ("proj_drop", 0.0)]),
    "017.na1d_qk": (natten017.na1d_qk, [("query", REQUIRED), ("key", REQUIRED), ("kernel_size", REQUIRED),
                                        ("dilation", 1), ("additional_keys", None), ("is_causal", False),
                                        ("rpb", None)]),
    "017.na2d_qk": (natten017.na2d_qk, [("query", REQUIRED), ("key", REQUIRED), ("kernel_size", REQUIRED),
                                        ("dilation", 1), ("additional_keys", None), ("is_causal", False),
                                        ("rpb", None)]),
    "017.na1d_av": (natten017.na1d_av, [("attn", REQUIRED), ("value", REQUIRED), ("kernel_size", REQUIRED),
                                        ("dilation", 1), ("additional_values", None), ("is_causal", False)]),
    "017.na2d_av": (natten017.na2d_av, [("attn", REQUIRED), ("value", REQUIRED), ("kernel_size", REQUIRED),
                                        ("dilation", 1), ("additional_values", None), ("is_causal", False)]),
    "017.na1d": (natten017.na1d, [("query", REQUIRED), ("key", REQUIRED), ("value", REQUIRED),
                                  ("kernel_size", REQUIRED), ("dilation", 1), ("is_causal", False), ("rpb", None),
                                  ("scale", None), ("additional_keys", None), ("additional_values", None),
                                  ("xformers_kwargs", None)]),
    "017.na2d": (natten017.na2d, [("query", REQUIRED), ("key", REQUIRED), ("value", REQUIRED),
                                  ("kernel_size", REQUIRED), ("dilation", 1), ("is_causal", False), ("rpb", None),
                                  ("scale", None), ("additional_keys", None), ("additional_values", None),
                                  ("xformers_kwargs", None)]),
    "017.NeighborhoodAttention1D": (natten017.NeighborhoodAttention1D, [
        ("dim", REQUIRED), ("num_heads", REQUIRED), ("kernel_size", REQUIRED), ("dilation", 1),
        ("is_causal", False), ("rel_pos_bias", False), ("qkv_bias", True), ("qk_scale", None), ("attn_drop", 0.0),
        ("proj_drop", 0.0), ("use_experimental_ops", False)]),
    "017.NeighborhoodAttention2D": (natten017.NeighborhoodAttention2D, [
        ("dim", REQUIRED), ("num_heads", REQUIRED), ("kernel_size", REQUIRED), ("dilation", 1),
        ("is_causal", False), ("rel_pos_bias", False), ("qkv_bias", True), ("qk_scale", None), ("attn_drop", 0.0),
        ("proj_drop", 0.0), ("use_experimental_ops", False)]),
    "017.na3d_qk": (natten017.na3d_qk, [("query", REQUIRED), ("key", REQUIRED), ("kernel_size", REQUIRED),
                                        ("dilation", 1), ("additional_keys", None), ("is_causal", False),
                                        ("rpb", None)]),
    # na3d_av's dilation had no default in NATTEN 0.17, unlike na1d_av's and na2d_av's
    "017.na3d_av": (natten017.na3d_av, [("attn", REQUIRED), ("value", REQUIRED), ("kernel_size", REQUIRED),
                                        ("dilation", REQUIRED), ("additional_values", None), ("is_causal", False)]),
    "017.na3d": (natten017.na3d, [("query", REQUIRED), ("key", REQUIRED), ("value", REQUIRED),
                                  ("kernel_size", REQUIRED), ("dilation", 1), ("is_causal", False), ("rpb", None),
                                  ("scale", None), ("additional_keys", None), ("additional_values", None),
                                  ("xformers_kwargs", None)]),
    "015-017.natten3dqkrpb": (natten017.natten3dqkrpb, [
        ("query", REQUIRED), ("key", REQUIRED), ("rpb", REQUIRED), ("kernel_size_d", REQUIRED),
        ("kernel_size", REQUIRED), ("dilation_d", REQUIRED), ("dilation", REQUIRED)]),
    "015-017.natten3dqk": (natten017.natten3dqk, [
        ("query", REQUIRED), ("key", REQUIRED), ("kernel_size_d", REQUIRED), ("kernel_size", REQUIRED),
        ("dilation_d", REQUIRED), ("dilation", REQUIRED)]),
    "015-017.natten3dav": (natten017.natten3dav, [
        ("attn", REQUIRED), ("value", REQUIRED), ("kernel_size_d", REQUIRED), ("kernel_size", REQUIRED),
        ("dilation_d", REQUIRED), ("dilation", REQUIRED)]),
    "017.NeighborhoodAttention3D": (natten017.NeighborhoodAttention3D, [
        ("dim", REQUIRED), ("num_heads", REQUIRED), ("kernel_size", REQUIRED), ("dilation", 1),
        ("is_causal", False), ("rel_pos_bias", False), ("qkv_bias", True), ("qk_scale", None), ("attn_drop", 0.0),
        ("proj_drop", 0.0), ("use_experimental_ops", False)]),
}


@pytest.mark.parametrize("target, expected", SIGNATURES.values(), ids=SIGNATURES.keys())
def test_historical_signature(target, expected):
    params = inspect.signature(target).parameters.values()
    assert [(p.name, p.default) for p in params] == expected
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)


def test_017_keeps_the_deprecated_014_names():
    for name in ("natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav"):
        assert getattr(natten017, name) is getattr(natten014, name)


@pytest.mark.parametrize("name", ["natten3dqkrpb", "natten3dav", "NeighborhoodAttention3D", "na3d"])
def test_014_has_no_3d_and_points_to_017(name):
    """NATTEN 0.14 had no 3D: code written for 0.15-0.17 that imports from natten014 hears where its name is."""
    with pytest.raises(AttributeError) as raised:
        getattr(natten014, name)
    assert "NATTEN 0.14, which had no 3D" in str(raised.value) and "na_rtc.compat.natten017" in str(raised.value)
    assert hasattr(natten017, name)


# ---------------------------------------------------------------- functions vs native ops

RNG = torch.Generator().manual_seed(0)


def _randn(*shape, requires_grad=False):
    return torch.randn(*shape, generator=RNG, dtype=torch.float64).requires_grad_(requires_grad)


def _heads_first(x):
    """A heads-first tensor (contiguous, as NATTEN users hold them) and its heads-last view."""
    ndim = x.dim() - 3
    first = x.permute(0, ndim + 1, *range(1, ndim + 1), ndim + 2).contiguous()
    return first, first.permute(0, *range(2, ndim + 2), 1, ndim + 2)


def _to_heads_first(x):
    ndim = x.dim() - 3
    return x.permute(0, ndim + 1, *range(1, ndim + 1), ndim + 2)


CASES = {  # name: (heads-last shape, kernel_size, dilation)
    "1d": ((2, 11, 3, 4), 3, 2),
    "2d": ((1, 7, 6, 2, 4), 3, (2, 1)),
}


@pytest.mark.parametrize("case", CASES, ids=CASES.keys())
@pytest.mark.parametrize("with_rpb", [False, True], ids=["no-rpb", "rpb"])
def test_014_functions_equal_native_ops(case, with_rpb):
    shape, kernel, dilation = CASES[case]
    ndim = len(shape) - 3
    heads = shape[-2]
    (q, q_hl), (k, k_hl), (v, v_hl) = (_heads_first(_randn(*shape)) for _ in range(3))
    rpb = _randn(heads, *(5,) * ndim) if with_rpb else None
    qkrpb, qk, av = ((natten014.natten1dqkrpb, natten014.natten1dqk, natten014.natten1dav) if ndim == 1 else
                     (natten014.natten2dqkrpb, natten014.natten2dqk, natten014.natten2dav))
    native_qk, native_av = (na_rtc.na1d_qk, na_rtc.na1d_av) if ndim == 1 else (na_rtc.na2d_qk, na_rtc.na2d_av)

    attn = qkrpb(q, k, rpb, kernel, dilation) if with_rpb else qk(q, k, kernel, dilation)
    expected = native_qk(q_hl, k_hl, kernel, dilation, rpb=rpb)
    assert attn.shape == (shape[0], heads, *shape[1:-2], 3**ndim)  # heads-first weights
    torch.testing.assert_close(attn, _to_heads_first(expected), rtol=0, atol=0)

    weights = attn.softmax(-1)
    out = av(weights, v, kernel, dilation)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _to_heads_first(native_av(weights.permute(
        0, *range(2, ndim + 2), 1, ndim + 2), v_hl, kernel, dilation)), rtol=0, atol=0)


def test_014_weights_follow_natten_layout():
    """Slot t of query (b, h, x, y) is the t-th key of its window in row-major
    order (checked against the brute-force oracle, not na_rtc)."""
    shape, kernel, dilation = CASES["2d"]
    (q, q_hl), (k, k_hl) = (_heads_first(_randn(*shape)) for _ in range(2))
    rpb = _randn(2, 5, 5)
    attn = natten014.natten2dqkrpb(q, k, rpb, kernel, dilation)
    expected = oracle_qk(q_hl.detach().numpy(), k_hl.detach().numpy(), kernel, dilation, rpb=rpb.numpy())
    assert_close(attn, _to_heads_first(torch.from_numpy(expected)), torch.float64, "forward", "attn")


SPLIT_017 = {  # name: (heads-last shape, kernel_size, dilation, is_causal, rpb)
    "1d-causal": ((2, 9, 2, 4), 4, 2, True, False),
    "1d-rpb": ((2, 9, 2, 4), 3, 1, False, True),
    "2d-causal-axis": ((1, 6, 7, 2, 4), (3, 4), (1, 1), (False, True), False),
    "2d-rpb": ((1, 6, 7, 2, 4), (3, 5), (2, 1), False, True),
    "3d-causal-in-time": ((1, 4, 5, 6, 2, 4), (2, 3, 3), (1, 1, 2), (True, False, False), False),
    "3d-rpb": ((2, 3, 5, 4, 2, 4), 3, 1, False, True),
}

QK_017 = {1: natten017.na1d_qk, 2: natten017.na2d_qk, 3: natten017.na3d_qk}
AV_017 = {1: natten017.na1d_av, 2: natten017.na2d_av, 3: natten017.na3d_av}
NATIVE_QK = {1: na_rtc.na1d_qk, 2: na_rtc.na2d_qk, 3: na_rtc.na3d_qk}
NATIVE_AV = {1: na_rtc.na1d_av, 2: na_rtc.na2d_av, 3: na_rtc.na3d_av}


@pytest.mark.parametrize("case", SPLIT_017, ids=SPLIT_017.keys())
def test_017_split_ops_equal_native_ops(case):
    shape, kernel, dilation, causal, with_rpb = SPLIT_017[case]
    ndim = len(shape) - 3
    (q, q_hl), (k, k_hl), (v, v_hl) = (_heads_first(_randn(*shape)) for _ in range(3))
    kernels = kernel if isinstance(kernel, tuple) else (kernel,) * ndim
    rpb = _randn(shape[-2], *(2 * kk - 1 for kk in kernels)) if with_rpb else None
    qk, av, native_qk, native_av = QK_017[ndim], AV_017[ndim], NATIVE_QK[ndim], NATIVE_AV[ndim]
    attn = qk(q, k, kernel, dilation, is_causal=causal, rpb=rpb)
    torch.testing.assert_close(attn, _to_heads_first(native_qk(q_hl, k_hl, kernel, dilation, causal, rpb)),
                               rtol=0, atol=0)
    weights = attn.softmax(-1)
    weights_hl = weights.permute(0, *range(2, ndim + 2), 1, ndim + 2)
    torch.testing.assert_close(av(weights, v, kernel, dilation, is_causal=causal),
                               _to_heads_first(native_av(weights_hl, v_hl, kernel, dilation, causal)), rtol=0, atol=0)


FUSED_017 = {1: (natten017.na1d, na_rtc.na1d), 2: (natten017.na2d, na_rtc.na2d), 3: (natten017.na3d, na_rtc.na3d)}


@pytest.mark.parametrize("ndim", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("scale", [None, 0.7], ids=["default-scale", "scale"])
def test_017_fused_is_heads_last_and_equals_native(ndim, scale):
    shape = {1: (2, 10, 3, 4), 2: (1, 6, 7, 2, 4), 3: (1, 6, 7, 6, 2, 4)}[ndim]
    q, k, v = (_randn(*shape) for _ in range(3))
    rpb = _randn(shape[-2], *(5,) * ndim)
    fused, native = FUSED_017[ndim]
    out = fused(q, k, v, 3, 2, False, rpb, scale)  # NATTEN 0.17's positional order
    torch.testing.assert_close(out, native(q, k, v, 3, dilation=2, scale=scale, rpb=rpb), rtol=0, atol=0)


# ---------------------------------------------------------------- additional keys / values


def _dense_with_extra(q, k, v, extra_k, extra_v, kernel, dilation, causal, scale):
    """Heads-last dense NA plus extra tokens every query sees, float64, by hand."""
    batch, *spatial, heads, dim = q.shape
    n = math.prod(spatial)
    mask, _ = oracle_neighbor_mask(tuple(spatial), kernel, 1, dilation, causal)
    qf, kf, vf = (x.reshape(batch, n, heads, dim) for x in (q, k, v))
    logits = torch.einsum("bnhd,bmhd->bhnm", qf, kf).masked_fill(~torch.from_numpy(mask), -math.inf)
    extra = torch.einsum("bnhd,bthd->bhnt", qf, extra_k)
    probs = (torch.cat([logits, extra], -1) * scale).softmax(-1)
    values = torch.cat([vf, extra_v], 1)
    return torch.einsum("bhnm,bmhd->bnhd", probs, values).reshape(q.shape)


@pytest.mark.parametrize("ndim", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_017_fused_with_additional_tokens_matches_dense(ndim):
    shape = {1: (2, 9, 2, 4), 2: (1, 5, 6, 2, 4), 3: (1, 4, 3, 5, 2, 4)}[ndim]
    kernel, dilation, causal = {1: (3, 2, True), 2: ((3, 5), (1, 1), (False, True)),
                                3: ((2, 3, 3), (1, 1, 1), (True, False, False))}[ndim]
    q, k, v = (_randn(*shape, requires_grad=True) for _ in range(3))
    extra_k, extra_v = (_randn(shape[0], 3, shape[-2], shape[-1], requires_grad=True) for _ in range(2))
    fused = FUSED_017[ndim][0]
    out = fused(q, k, v, kernel, dilation, causal, additional_keys=extra_k, additional_values=extra_v)
    expected = _dense_with_extra(q, k, v, extra_k, extra_v, kernel, dilation, causal, shape[-1] ** -0.5)
    assert_close(out, expected, torch.float64, "forward", "output")
    grad = torch.randn_like(out)
    inputs = (q, k, v, extra_k, extra_v)
    for name, a, b in zip("q k v extra_k extra_v".split(), torch.autograd.grad(out, inputs, grad),
                          torch.autograd.grad(expected, inputs, grad)):
        assert_close(a, b, torch.float64, "grad", name)


@pytest.mark.parametrize("with_rpb", [False, True], ids=["no-rpb", "rpb"])
def test_015_3d_ops_take_one_size_for_depth_and_one_for_height_and_width(with_rpb):
    """natten3dqkrpb(q, k, rpb, kernel_size_d, kernel_size, dilation_d, dilation) is na3d_qk with
    (kernel_size_d, kernel_size, kernel_size) and (dilation_d, dilation, dilation), as NATTEN 0.15-0.17.4 had it."""
    (q, q_hl), (k, k_hl), (v, v_hl) = (_heads_first(_randn(1, 3, 6, 6, 2, 4)) for _ in range(3))
    rpb = _randn(2, 5, 5, 5) if with_rpb else None
    attn = (natten017.natten3dqkrpb(q, k, rpb, 3, 3, 1, 2) if with_rpb else natten017.natten3dqk(q, k, 3, 3, 1, 2))
    expected = na_rtc.na3d_qk(q_hl, k_hl, (3, 3, 3), (1, 2, 2), rpb=rpb)
    assert attn.shape == (1, 2, 3, 6, 6, 27)  # heads-first weights
    torch.testing.assert_close(attn, _to_heads_first(expected), rtol=0, atol=0)
    weights = attn.softmax(-1)
    out = natten017.natten3dav(weights, v, 3, 3, 1, 2)
    native = na_rtc.na3d_av(weights.permute(0, 2, 3, 4, 1, 5), v_hl, (3, 3, 3), (1, 2, 2))
    torch.testing.assert_close(out, _to_heads_first(native), rtol=0, atol=0)


def test_015_3d_ops_with_a_different_depth_window_follow_the_oracle():
    """Depth and plane differ (kernel_size_d 2, kernel_size 3, dilation_d 2): NATTEN's heads-first weights,
    slot t = (td * 3 + th) * 3 + tw, checked against the brute-force oracle, not na_rtc."""
    (q, q_hl), (k, k_hl) = (_heads_first(_randn(1, 5, 4, 3, 2, 4)) for _ in range(2))
    attn = natten017.natten3dqk(q, k, 2, 3, 2, 1)
    expected = oracle_qk(q_hl.numpy(), k_hl.numpy(), (2, 3, 3), (2, 1, 1))
    assert_close(attn, _to_heads_first(torch.from_numpy(expected)), torch.float64, "forward", "attn")


@pytest.mark.parametrize("call", [lambda x: natten017.natten3dqk(x, x, (3, 3), 3, 1, 1),
                                  lambda x: natten017.natten3dav(x[..., :1].expand(*x.shape[:-1], 27), x, 3, 3, 1, 1.0)],
                         ids=["tuple-kernel-size-d", "float-dilation"])
def test_015_3d_ops_want_ints(call):
    with pytest.raises(TypeError, match="must be an int in natten3dqkrpb/natten3dqk/natten3dav"):
        call(torch.ones(1, 2, 3, 4, 5, 4))


def test_017_split_ops_with_additional_tokens_append_columns():
    (q, q_hl), (k, k_hl), (v, v_hl) = (_heads_first(_randn(2, 8, 2, 4)) for _ in range(3))
    extra_k, extra_v = _randn(2, 2, 3, 4), _randn(2, 2, 3, 4)  # [batch, heads, tokens, dim]
    attn = natten017.na1d_qk(q, k, 3, additional_keys=extra_k)
    assert attn.shape == (2, 2, 8, 3 + 3)
    torch.testing.assert_close(attn[..., :3], _to_heads_first(na_rtc.na1d_qk(q_hl, k_hl, 3)))
    torch.testing.assert_close(attn[..., 3:], q @ extra_k.transpose(-1, -2))
    weights = attn.softmax(-1)
    out = natten017.na1d_av(weights, v, 3, additional_values=extra_v)
    expected = _to_heads_first(na_rtc.na1d_av(weights[..., :3].permute(0, 2, 1, 3), v_hl, 3)) + \
        weights[..., 3:] @ extra_v
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("call, error, match", [
    (lambda q: natten017.na1d(q, q, q, 3, additional_keys=q[:, :2]), ValueError, "given together"),
    (lambda q: natten017.na1d(q, q, q, 3, xformers_kwargs={"p": 0.1}), NotImplementedError, "xformers_kwargs"),
    (lambda q: natten017.na1d(q, q, q, 3, additional_keys=q[:, :2, :1], additional_values=q[:, :2, :1]),
     ValueError, "additional_keys"),
    (lambda q: natten017.na1d_qk(q[0], q[0], 3), ValueError, "query.*heads-first"),
    (lambda q: natten014.natten1dav(q[..., 0], q, 3, 1), ValueError, "attn.*heads-first"),
    (lambda q: natten017.na1d_av(torch.ones(2, 3, 9, 5), q.permute(0, 2, 1, 3), 3,
                                 additional_values=torch.ones(2, 3, 1, 4)), ValueError, "prod\\(kernel_size\\)"),
], ids=["keys-without-values", "xformers", "extra-wrong-heads", "qk-rank", "av-rank", "av-extra-columns"])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.ones(2, 9, 3, 4))


# ---------------------------------------------------------------- no copies


class _Recorder:
    def __init__(self, monkeypatch):
        self.calls = []
        ops = backends.get("blocked").ops  # the default backend of CPU tensors
        for name, op in list(ops.items()):
            monkeypatch.setitem(ops, name, self._wrap(name, op))

    def _wrap(self, name, op):
        def run(problem, *arrays):
            self.calls.append((name, arrays))
            return op(problem, *arrays)

        return run


def test_014_inputs_reach_the_kernels_without_copies(monkeypatch):
    recorder = _Recorder(monkeypatch)
    q, k, v = (torch.randn(2, 3, 6, 7, 4) for _ in range(3))  # heads-first, contiguous
    attn = natten014.natten2dqkrpb(q, k, torch.randn(3, 5, 5), 3, 1).softmax(-1)
    natten014.natten2dav(attn, v, 3, 1)
    (qk_name, (q_seen, k_seen, _)), (av_name, (attn_seen, v_seen)) = recorder.calls
    assert (qk_name, av_name) == ("qk_forward", "av_forward")
    for original, seen in ((q, q_seen), (k, k_seen), (v, v_seen), (attn, attn_seen)):
        assert seen.data_ptr() == original.data_ptr()
        assert seen.shape == original.permute(0, 2, 3, 1, 4).shape
        assert seen.stride() == original.permute(0, 2, 3, 1, 4).stride()


def test_017_split_inputs_reach_the_kernels_without_copies(monkeypatch):
    recorder = _Recorder(monkeypatch)
    q, k, v = (torch.randn(2, 3, 9, 4, requires_grad=True) for _ in range(3))
    out = natten017.na1d_av(natten017.na1d_qk(q, k, 3, is_causal=True).softmax(-1), v, 3, is_causal=True)
    out.sum().backward()
    seen = {name: arrays for name, arrays in recorder.calls}
    assert seen["qk_forward"][0].data_ptr() == q.data_ptr() and seen["qk_forward"][1].data_ptr() == k.data_ptr()
    assert seen["av_forward"][1].data_ptr() == v.data_ptr()
    assert q.grad.shape == q.shape and torch.isfinite(q.grad).all()


def test_compat_module_feeds_views_of_one_qkv_buffer(monkeypatch):
    recorder = _Recorder(monkeypatch)
    natten014.NeighborhoodAttention2D(8, 2, 3).eval()(torch.randn(1, 5, 5, 8))
    (name, (q, k, v, _)), = recorder.calls
    assert name == "fused_forward"
    assert len({t.untyped_storage().data_ptr() for t in (q, k, v)}) == 1


# ---------------------------------------------------------------- modules and checkpoints

# Hand-written from NATTEN's module sources: parameters registered directly on
# the module (rpb) come before those of submodules (qkv, proj) in a state dict.
STATE_DICTS = {
    "014-1d": (lambda: natten014.NeighborhoodAttention1D(32, 4, 7),
               [("rpb", (4, 13)), ("qkv.weight", (96, 32)), ("qkv.bias", (96,)), ("proj.weight", (32, 32)),
                ("proj.bias", (32,))]),
    "014-2d": (lambda: natten014.NeighborhoodAttention2D(32, 4, 7, 2),
               [("rpb", (4, 13, 13)), ("qkv.weight", (96, 32)), ("qkv.bias", (96,)), ("proj.weight", (32, 32)),
                ("proj.bias", (32,))]),
    "014-2d-no-bias": (lambda: natten014.NeighborhoodAttention2D(32, 4, 7, bias=False, qkv_bias=False),
                       [("qkv.weight", (96, 32)), ("proj.weight", (32, 32)), ("proj.bias", (32,))]),
    "017-1d": (lambda: natten017.NeighborhoodAttention1D(32, 4, 7),
               [("qkv.weight", (96, 32)), ("qkv.bias", (96,)), ("proj.weight", (32, 32)), ("proj.bias", (32,))]),
    "017-2d-rpb": (lambda: natten017.NeighborhoodAttention2D(32, 4, (7, 5), rel_pos_bias=True),
                   [("rpb", (4, 13, 9)), ("qkv.weight", (96, 32)), ("qkv.bias", (96,)), ("proj.weight", (32, 32)),
                    ("proj.bias", (32,))]),
    "017-3d-rpb": (lambda: natten017.NeighborhoodAttention3D(32, 4, (3, 7, 7), rel_pos_bias=True),
                   [("rpb", (4, 5, 13, 13)), ("qkv.weight", (96, 32)), ("qkv.bias", (96,)),
                    ("proj.weight", (32, 32)), ("proj.bias", (32,))]),
    "017-3d": (lambda: natten017.NeighborhoodAttention3D(32, 4, 3, qkv_bias=False),
               [("qkv.weight", (96, 32)), ("proj.weight", (32, 32)), ("proj.bias", (32,))]),
}


@pytest.mark.parametrize("make, expected", STATE_DICTS.values(), ids=STATE_DICTS.keys())
def test_state_dict_has_exactly_nattens_keys(make, expected):
    assert [(k, tuple(v.shape)) for k, v in make().state_dict().items()] == expected


def test_a_natten_checkpoint_loads_and_runs_everywhere():
    """A 0.14 checkpoint (plain dict of NATTEN's keys) loads strictly into the
    0.14 and 0.17 modules and into na_rtc's own layer, and all three agree."""
    g = torch.Generator().manual_seed(3)
    checkpoint = {"rpb": torch.randn(2, 5, 5, generator=g), "qkv.weight": torch.randn(48, 16, generator=g) / 4,
                  "qkv.bias": torch.randn(48, generator=g), "proj.weight": torch.randn(16, 16, generator=g) / 4,
                  "proj.bias": torch.randn(16, generator=g)}
    layers = [natten014.NeighborhoodAttention2D(16, 2, 3, 2),
              natten017.NeighborhoodAttention2D(16, 2, 3, 2, rel_pos_bias=True),
              na_rtc.NeighborhoodAttention2D(16, 2, 3, dilation=2, rel_pos_bias=True)]
    x = torch.randn(2, 7, 8, 16, generator=g)
    outs = []
    for layer in layers:
        layer.load_state_dict(checkpoint)  # strict: no missing, no unexpected keys
        outs.append(layer.eval()(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_a_natten_017_3d_checkpoint_loads_into_both_3d_layers():
    g = torch.Generator().manual_seed(4)
    checkpoint = {"rpb": torch.randn(2, 5, 5, 5, generator=g), "qkv.weight": torch.randn(48, 16, generator=g) / 4,
                  "qkv.bias": torch.randn(48, generator=g), "proj.weight": torch.randn(16, 16, generator=g) / 4,
                  "proj.bias": torch.randn(16, generator=g)}
    layers = [natten017.NeighborhoodAttention3D(16, 2, 3, (1, 2, 1), rel_pos_bias=True),
              na_rtc.NeighborhoodAttention3D(16, 2, 3, dilation=(1, 2, 1), rel_pos_bias=True)]
    x = torch.randn(2, 3, 6, 4, 16, generator=g)
    outs = []
    for layer in layers:
        layer.load_state_dict(checkpoint)
        outs.append(layer.eval()(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert layers[0].kernel_size == (3, 3, 3) and layers[0].dilation == (1, 2, 1)
    assert "has_bias=True" in repr(layers[0])


def test_014_module_attributes_and_defaults():
    layer = natten014.NeighborhoodAttention1D(16, 2, 5, None)  # 0.14 accepted dilation=None
    assert layer.rpb is not None and layer.rpb.shape == (2, 9)  # bias on by default
    assert (layer.kernel_size, layer.dilation, layer.window_size) == (5, 1, 5)
    assert "rel_pos_bias=True" in repr(layer) and "kernel_size=5" in repr(layer)
    assert layer(torch.randn(1, 3, 16)).shape == (1, 3, 16)  # shorter than the window: padded
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        natten014.NeighborhoodAttention2D(16, 2, (3, 5))


def test_017_module_attributes():
    layer = natten017.NeighborhoodAttention2D(16, 2, 3, 2, True, attn_drop=0.1, use_experimental_ops=True)
    assert layer.kernel_size == (3, 3) and layer.dilation == (2, 2) and layer.is_causal == (True, True)
    assert layer.rpb is None and layer.attn_drop_rate == 0.1 and layer.use_experimental_ops
    assert "has_bias=False" in repr(layer)
    with pytest.raises(ValueError, match="rel_pos_bias.*is_causal"):
        natten017.NeighborhoodAttention1D(16, 2, 3, is_causal=True, rel_pos_bias=True)


def test_compat_module_compiles_without_graph_breaks():
    layer = natten014.NeighborhoodAttention2D(8, 2, 3).eval()
    x = torch.randn(1, 2, 5, 8)  # padded on the first axis
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
