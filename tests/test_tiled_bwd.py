"""Tiled backward kernels (``cuda_src/na_tiled_bwd.cu``) on the emulator.

dK = inverse(dAttn, Q), dV = inverse(Attn, dOut) and dRPB = bias_grad(dAttn)
through the dispatcher's split kernels (tiled where covered) against the
float64 reference (docs/design/testing.md#tolerances), over a seeded sweep (1D /
2D, odd and even kernels 2..13 plus a 1D k = 63, dilation 1..4, causal per
axis, head dims 16/24/32/40/64/128, fp32 / fp16 / bf16, heads-first views,
sizes that are not tile multiples). ``na_tiled_inv`` sums in ``na_inv_fwd``'s
order, so it must equal the naive kernel bit for bit; the two-pass dRPB sums in
another order (per tile, then over tiles) and is held to the tolerance table.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import assert_close, make_inputs, noncontiguous, to_numpy64, RecordingExecutor

import na_rtc
from na_rtc import _args
from na_rtc.runtime import emulated, registry
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import tiled_bwd
from na_rtc.runtime.policy import Policy

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")


_Recorder = RecordingExecutor


def _K(run):
    """The split kernels as the dispatcher picks them: tiled where their tables cover the launch."""
    return Dispatcher(run)


def _straightforward(run):
    """The straightforward split kernels only (what the tiled ones must equal)."""
    return Dispatcher(run, Policy.of(tiled=False))


@dataclasses.dataclass(frozen=True)
class Case:
    spatial: tuple
    kernel_size: tuple
    dilation: tuple
    causal: tuple
    head_dim: int
    dtype: str
    heads_first: bool = False
    batch: int = 1
    heads: int = 2
    rpb: bool = False

    @property
    def ndim(self):
        return len(self.spatial)

    @property
    def window(self):
        return {"kernel_size": self.kernel_size, "dilation": self.dilation, "is_causal": self.causal}

    def __str__(self):
        axes = ",".join(f"L{n}k{k}d{d}{'c' if c else ''}" for n, k, d, c in
                        zip(self.spatial, self.kernel_size, self.dilation, self.causal))
        return (f"{self.ndim}d-{axes}-b{self.batch}h{self.heads}D{self.head_dim}-{self.dtype}"
                f"{'-rpb' if self.rpb else ''}{'-hf' if self.heads_first else ''}")


DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (16, 24, 32, 40, 64, 128)


def _random_case(seed: int) -> Case:
    rng = np.random.default_rng(7000 + seed)
    ndim = 1 + seed % 2
    kmax = 14 if ndim == 1 else 8
    kernel = tuple(int(rng.integers(2, kmax)) for _ in range(ndim))
    dilation = tuple(int(rng.integers(1, 5)) for _ in range(ndim))
    extra = 40 if ndim == 1 else 7
    spatial = tuple(k * d + int(rng.integers(0, extra)) for k, d in zip(kernel, dilation))
    causal = tuple(bool(rng.random() < 0.3) for _ in range(ndim))
    rpb = all(k % 2 for k in kernel) and not any(causal)
    return Case(spatial, kernel, dilation, causal, int(HEAD_DIMS[seed % len(HEAD_DIMS)]),
                DTYPES[seed % 3], bool(rng.random() < 0.4), int(rng.integers(1, 3)), int(rng.integers(1, 3)), rpb)


CASES = [_random_case(s) for s in range(18)] + [
    Case((70,), (63,), (1,), (False,), 16, "float32", rpb=True),  # a large 1D kernel: box spans 2 chunks+
    Case((150,), (13,), (2,), (False,), 40, "bfloat16", heads_first=True, rpb=True),
    Case((67,), (8,), (3,), (True,), 128, "float16"),
    Case((19, 17), (13, 13), (1, 1), (False, False), 32, "float32", rpb=True),  # 2D k = 13
    Case((21, 26), (5, 7), (4, 3), (False, False), 24, "float16", heads_first=True, rpb=True),
    Case((13, 14), (4, 6), (2, 2), (True, False), 64, "bfloat16"),
    Case((11, 9), (3, 3), (1, 1), (False, True), 128, "float32", heads_first=True),
    Case((12, 10), (3, 5), (1, 2), (True, True), 16, "float16", batch=2),
    # bias tables too large for the first dRPB tile: the smaller one of RPB_TILES
    Case((18, 17), (17, 17), (1, 1), (False, False), 16, "float32", heads=1, rpb=True),
    Case((190,), (185,), (1,), (False,), 16, "bfloat16", heads=1, rpb=True),
]


def _arrays(case: Case, shape, count, seed):
    rng = np.random.default_rng(seed)
    dtype = torch.bfloat16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    arrays, arrays64 = make_inputs(rng, shape, dtype, count)
    if case.heads_first:
        arrays = [noncontiguous(a) for a in arrays]
    return arrays, arrays64


def _bits(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.contiguous().view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.contiguous().numpy()
    return np.ascontiguousarray(x)


def _assert_same_bits(a, b, name):
    a, b = _bits(a), _bits(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{name}: tiled != naive bit for bit"


def _fns(ndim):
    if ndim == 1:
        return na_rtc.na1d_qk_backward, na_rtc.na1d_av_backward
    return na_rtc.na2d_qk_backward, na_rtc.na2d_av_backward


def _problem(case: Case, query, key, rpb=None):
    return _args.qk_problem(case.ndim, query, key, case.kernel_size, case.dilation, case.causal, rpb)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tiled_backward_matches_reference_and_naive(case):
    shape = (case.batch, *case.spatial, case.heads, case.head_dim)
    slots = int(np.prod(case.kernel_size))
    (q, k, _, g), (_, k64, v64, g64) = _arrays(case, shape, 4, 0)
    (attn, dattn), (attn64, dattn64) = _arrays(case, (*shape[:-1], slots), 2, 1)
    q = q * case.head_dim**-0.5  # split-op tests pre-scale the query (rounded to the dtype)
    q64 = to_numpy64(q)
    rpb = rpb64 = None
    if case.rpb:
        (rpb,), (rpb64,) = make_inputs(np.random.default_rng(3), (case.heads, *(2 * n - 1 for n in case.kernel_size)),
                                       np.float32)
        if isinstance(q, torch.Tensor):
            rpb = torch.from_numpy(rpb)
    problem = _problem(case, q, k, rpb)
    run = _Recorder()
    kernels, plain = _K(run), _straightforward(emulated.run)
    qk_bwd, av_bwd = _fns(case.ndim)

    dk = kernels.inverse(problem, dattn, q)
    dv = kernels.inverse(problem, attn, g)
    _, ref_dk, ref_drpb = qk_bwd(dattn64, q64, k64, **case.window, rpb=rpb64, backend="reference")
    _, ref_dv = av_bwd(g64, attn64, v64, **case.window, backend="reference")
    assert_close(dk, ref_dk, case.dtype, "grad", "dk")
    assert_close(dv, ref_dv, case.dtype, "grad", "dv")
    # same order of summation as na_inv_fwd: identical bits
    _assert_same_bits(dk, plain.inverse(problem, dattn, q), "dk")
    _assert_same_bits(dv, plain.inverse(problem, attn, g), "dv")
    # float32 weights with a 16-bit source, as the fused backward passes them
    if case.dtype != "float32":
        w32 = dattn.float() if isinstance(dattn, torch.Tensor) else dattn.astype(np.float32)
        _assert_same_bits(kernels.inverse(problem, w32, q, 0.5), plain.inverse(problem, w32, q, 0.5), "dk (fp32 w)")
    assert run.names[0] == kernels.choose("inverse", problem).kernels[0]
    assert run.names[0].startswith("na_tiled_inv<"), run.names

    if case.rpb:
        run.names.clear()
        drpb = kernels.bias_grad(problem, dattn)
        assert run.names == list(kernels.choose("bias_grad", problem).kernels)
        assert run.names == [run.names[0], tiled_bwd.RPB_REDUCE] and run.names[0].startswith("na_tiled_rpb_partial<")
        assert_close(drpb, ref_drpb, case.dtype, "grad", "drpb")
        assert_close(drpb, to_numpy64(plain.bias_grad(problem, dattn)), case.dtype, "grad", "drpb vs naive")
        if case.dtype != "float32":  # float32 logit gradients, as the fused backward passes them
            assert_close(kernels.bias_grad(problem, w32), ref_drpb, case.dtype, "grad", "drpb (fp32 w)")


def test_runs_are_bitwise_deterministic():
    case = Case((23, 19), (5, 5), (2, 1), (False, False), 40, "float32", heads_first=True, heads=3, rpb=True)
    shape = (case.batch, *case.spatial, case.heads, case.head_dim)
    (q,), _ = _arrays(case, shape, 1, 5)
    (dattn,), _ = _arrays(case, (*shape[:-1], 25), 1, 6)
    problem = _problem(case, q, q, np.zeros((3, 9, 9), np.float32))
    kernels = _K(emulated.run)
    first = [kernels.inverse(problem, dattn, q), kernels.bias_grad(problem, dattn)]
    for _ in range(2):
        again = [kernels.inverse(problem, dattn, q), kernels.bias_grad(problem, dattn)]
        for a, b in zip(first, again):
            _assert_same_bits(a, b, "rerun")


def _choice_problem(spatial, kernel_size, head_dim, dtype="float32", stride=1, causal=False):
    axes = tuple(na_rtc.window.Axis(n, k, stride, 1, causal) for n, k in zip(spatial, kernel_size))
    return _args.Problem("qk", axes, 1, 1, head_dim, dtype, "numpy", "cpu", False, None)


def test_choice_follows_the_table_and_falls_back():
    dispatcher = _K(emulated.run)

    class k:  # the chosen kernel of a role (the partial pass of a two-pass bias gradient)
        def choice(problem, role, *weights):
            args = (*weights, problem.dtype) if role == "inverse" and weights else weights
            return dispatcher.choose(role, problem, *args).kernels[0]

    names = registry.get("tiled_bwd").names
    cases = {
        ((100,), (7,), 24, "float32"): "na_tiled_inv<float, float, 32, 32, 1>",
        ((100,), (63,), 128, "bfloat16"): "na_tiled_inv<bf16_t, bf16_t, 128, 16, 1>",
        ((20, 20), (13, 13), 64, "float32"): "na_tiled_inv<float, float, 64, 4, 8>",
        ((20, 20), (5, 5), 128, "float32"): "na_tiled_inv<float, float, 128, 2, 4>",
        ((20, 20), (5, 5), 16, "float16"): "na_tiled_inv<fp16_t, fp16_t, 16, 8, 8>",
        # not covered: float64, head dim above 128, more shared memory than the budget
        ((100,), (7,), 32, "float64"): "na_inv_fwd<double, double>",
        ((100,), (7,), 160, "float32"): "na_inv_fwd<float, float>",
        ((64, 64), (23, 23), 128, "float32"): "na_inv_fwd<float, float>",
    }
    for (spatial, kernel_size, head_dim, dtype), want in cases.items():
        problem = _choice_problem(spatial, kernel_size, head_dim, dtype)
        assert k.choice(problem, "inverse") == want, (spatial, kernel_size, head_dim, dtype)
        assert want in names or want.startswith("na_inv_fwd")
    assert k.choice(_choice_problem((100,), (7,), 32), "inverse", "float32") in names
    assert k.choice(_choice_problem((40,), (7,), 32, stride=2), "inverse") == "na_inv_fwd<float, float>"
    assert k.choice(_choice_problem((40,), (7,), 32, stride=2), "bias_grad") == "na_rpb_bwd<float>"
    assert k.choice(_choice_problem((40,), (7,), 32, "float16"), "bias_grad") == "na_tiled_rpb_partial<fp16_t, 64, 1>"
    assert k.choice(_choice_problem((40,), (7,), 32, "float16"), "bias_grad", "float32") == \
        "na_tiled_rpb_partial<float, 64, 1>"
    assert k.choice(_choice_problem((30, 30), (13, 13), 32), "bias_grad") == "na_tiled_rpb_partial<float, 8, 8>"
    assert k.choice(_choice_problem((40, 40), (17, 17), 32), "bias_grad") == "na_tiled_rpb_partial<float, 4, 4>"
    assert k.choice(_choice_problem((64, 64), (45, 45), 32), "bias_grad") == "na_rpb_bwd<float>"
    with pytest.raises(ValueError):
        k.choice(_choice_problem((40,), (7,), 32), "forward_and_more")


def test_family_lists_every_choice_with_its_launch():
    family = registry.get("tiled_bwd")
    assert family.source == tiled_bwd.SOURCE
    for (ndim, hd, dtype), tile in tiled_bwd.INV_TILES.items():  # 3D: in the twin, tiled_bwd_3d
        assert tiled_bwd.inv_name(dtype, dtype, hd, tile) in registry.for_rank("tiled_bwd", ndim).names
    assert all(family.launch_shared_bytes[n] <= tiled_bwd.SHARED_BUDGET for n in family.names)
    assert all(family.launch_threads[n] == 256 for n in family.names)
    assert not any("double" in n for n in family.names)


def test_the_dispatcher_names_the_kernel_of_every_op():
    """The dispatcher names the kernels of every split role, forward and backward alike."""
    q = torch.zeros(1, 40, 2, 32, dtype=torch.float16)
    problem = _args.qk_problem(1, q, q, 7, 1, False, None)
    kernels = Dispatcher(emulated.run)
    names = {op: kernels.choose(op, problem).kernels for op in ("qk", "av", "inverse", "bias_grad", "softmax")}
    assert names["qk"][0].startswith("na_tiled_qk<") and names["av"][0].startswith("na_tiled_av<")
    assert names["inverse"][0].startswith("na_tiled_inv<")
    assert names["bias_grad"] == ("na_tiled_rpb_partial<fp16_t, 64, 1>", "na_tiled_rpb_reduce")
    assert names["softmax"] == ("na_softmax_fwd<float>",)  # straightforward (no tiled softmax), float32 logits
    assert all(registry.family_of(name) for kernels in names.values() for name in kernels)
    with pytest.raises(ValueError, match="op must be"):
        kernels.choose("softmax_twice", problem)
