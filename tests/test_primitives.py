"""The conversion primitives of cuda_src/na_types.cuh (inline PTX on the GPU,
software in the emulator) against their definitions: IEEE round to nearest
even, bit for bit. ``make gpu-check`` runs the GPU half first."""

from __future__ import annotations

import numpy as np
import pytest

import na_rtc
from na_rtc.runtime import plan as P
from na_rtc.runtime.families import SELFTEST_WGMMA_N, selftest_wgmma_name, selftest_wgmma_shared


def _usable(name):
    return na_rtc.backends.get(name).probe()[0]


BACKENDS = [
    pytest.param("emulator", marks=pytest.mark.skipif(not _usable("emulator"), reason="no C++ compiler")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _usable("cuda"), reason="no usable GPU")]),
]


def _samples() -> np.ndarray:
    rng = np.random.default_rng(0)
    f16 = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    f16 = f16[np.isfinite(f16)]
    # midpoints between neighbouring fp16 values: every tie case, both parities
    ties = ((f16[:-1].astype(np.float64) + f16[1:]) / 2).astype(np.float32)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    bf16_ties = (rng.integers(0, 2**16, 20_000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 65519.996, 6e-8, 3e-8, 1e-45,
                      3.4028235e38, -3.4028235e38, 1.0 + 2**-11, 1.0 + 3 * 2**-11], np.float32)
    return np.concatenate([f16, ties, bits, bf16_ties, edges]).astype(np.float32)


def _bf16_reference(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 at the bit level."""
    u = values.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded


def _run_convert(backend: str, values: np.ndarray):
    outputs = {name: np.zeros(values.shape, dtype) for name, dtype in
               (("f16", np.uint16), ("bf16", np.uint16), ("f16_back", np.float32), ("bf16_back", np.float32))}
    if backend == "cuda":
        import cupy

        device = {name: cupy.asarray(a) for name, a in outputs.items()}
        source = cupy.asarray(values)
    else:
        device, source = outputs, values
    n = values.size
    args = [P.ptr(source)] + [P.ptr(device[k]) for k in ("f16", "bf16", "f16_back", "bf16_back")] + [P.i64(n)]
    launch = P.LaunchPlan(P.Kernel("na_selftest.cu", "na_selftest_convert"), (-(-n // 256), 1, 1), (256, 1, 1), 0,
                          tuple(args))
    na_rtc.backends.executor(backend)(launch)
    if backend == "cuda":
        return {name: a.get() for name, a in device.items()}
    return device


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_and_bf16_conversions_round_to_nearest_even(backend):
    values = _samples()
    got = _run_convert(backend, values)
    nan = np.isnan(values)
    with np.errstate(over="ignore"):  # overflow to inf is one of the cases under test
        want_f16 = values.astype(np.float16)
    np.testing.assert_array_equal(got["f16"][~nan], want_f16.view(np.uint16)[~nan])
    assert np.isnan(got["f16"].view(np.float16)[nan]).all()
    np.testing.assert_array_equal(got["f16_back"][~nan], want_f16.astype(np.float32)[~nan])
    np.testing.assert_array_equal(got["bf16"][~nan], _bf16_reference(values)[~nan])
    bf16_as_f32 = (got["bf16"].astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(bf16_as_f32[nan]).all()
    # widening is exact (a 16-bit shift); NaN payloads are not specified, only NaN-ness
    np.testing.assert_array_equal(got["bf16_back"].view(np.uint32)[~nan], bf16_as_f32.view(np.uint32)[~nan])
    assert np.isnan(got["bf16_back"][nan]).all()


# ---------------------------------------------------------------- tensor cores: mma.sync m16n8k16, ldmatrix


def _run_mma(backend: str, dtype: str, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> dict:
    import torch

    bits = {name: torch.from_numpy(x).to(getattr(torch, dtype)).view(torch.int16).numpy().view(np.uint16)
            for name, x in (("a", a), ("b", b))}
    outputs = {name: np.full((16, 8), np.nan, np.float32) for name in ("layout", "ldmatrix", "trans")}
    inputs = [bits["a"], bits["b"], c.astype(np.float32)]
    if backend == "cuda":
        import cupy

        inputs = [cupy.asarray(x) for x in inputs]
        device = {name: cupy.asarray(x) for name, x in outputs.items()}
    else:
        device = outputs
    ctype = {"float16": "fp16_t", "bfloat16": "bf16_t"}[dtype]
    args = [P.ptr(x) for x in inputs] + [P.ptr(device[k]) for k in ("layout", "ldmatrix", "trans")]
    launch = P.LaunchPlan(P.Kernel("na_selftest.cu", f"na_selftest_mma<{ctype}>"), (1, 1, 1), (32, 1, 1), 0,
                          tuple(args))
    counts = na_rtc.backends.executor(backend)(launch)
    if backend == "emulator":  # one warp, three mma.sync (from fragments, through ldmatrix, through .trans)
        assert counts == {"mma.sync": 3, "wgmma": 0}
    return {name: (x.get() if backend == "cuda" else x) for name, x in device.items()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mma_and_ldmatrix_compute_a_plain_matrix_product(backend, dtype):
    """D = A B + C through the documented fragment layout, through ldmatrix and through ldmatrix.trans."""
    import torch

    rng = np.random.default_rng(5)
    # distinct, exactly representable values: a layout mix-up moves them and changes D
    a = torch.from_numpy(rng.standard_normal((16, 16))).to(getattr(torch, dtype)).double().numpy()
    b = torch.from_numpy(rng.standard_normal((16, 8))).to(getattr(torch, dtype)).double().numpy()
    c = rng.standard_normal((16, 8)).astype(np.float32)
    want = a @ b + c
    got = _run_mma(backend, dtype, a, b, c)
    for name, d in got.items():
        # fp32 accumulation of 16 exact products: a few float32 ulps of the sum of magnitudes
        bound = 1e-6 * (np.abs(a) @ np.abs(b) + np.abs(c)) + 1e-7
        assert (np.abs(d - want) <= bound).all(), f"{name}: max error {np.abs(d - want).max():.3g}"



# ---------------------------------------------------------------- Hopper: wgmma m64nNk16 (sm_90a)


def _sm90(backend: str) -> bool:
    from na_rtc.runtime import cuda

    return backend != "cuda" or cuda.arch_of("cuda") == 90


def _run_wgmma(backend, dtype, n, a, b, c, fields):
    """(K-major + C, MN-major, SS) of the self-test with descriptor fields (k_lbo, k_sbo, m_lbo, m_sbo)."""
    import torch

    bits = [torch.from_numpy(x).to(getattr(torch, dtype)).view(torch.int16).numpy().view(np.uint16) for x in (a, b)]
    arrays = [*bits, c, *(np.full((64, n), np.nan, np.float32) for _ in range(3))]
    if backend == "cuda":
        import cupy

        device = [cupy.asarray(x) for x in arrays]
    else:
        device = arrays
    ctype = {"float16": "fp16_t", "bfloat16": "bf16_t"}[dtype]
    launch = P.LaunchPlan(P.Kernel("na_selftest_wgmma.cu", selftest_wgmma_name(ctype, n)), (1, 1, 1), (128, 1, 1),
                          selftest_wgmma_shared(n), tuple(P.ptr(x) for x in device) + tuple(P.i32(f) for f in fields))
    na_rtc.backends.executor(backend)(launch)
    return [x.get() if backend == "cuda" else x for x in device[3:]]


@pytest.mark.parametrize("n", SELFTEST_WGMMA_N)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_wgmma_computes_a_plain_matrix_product_from_both_layouts(backend, dtype, n):
    """64 x N = A (64 x 32) B (32 x N) in two k-steps with B read K-major (+ C) and MN-major (first k-step
    without accumulation), and in the SS form (A K-major from shared memory too): fragment layouts, descriptor
    fields and the scale-d flag against numpy. Where the documented fields fail, the message says which other
    reading (LBO and SBO swapped) the device follows."""
    import torch

    if not _sm90(backend):
        pytest.skip("wgmma (sm_90a) runs on Hopper GPUs only")
    rng = np.random.default_rng(11 + n)
    a = torch.from_numpy(rng.standard_normal((64, 32))).to(getattr(torch, dtype)).double().numpy()
    b = torch.from_numpy(rng.standard_normal((32, n))).to(getattr(torch, dtype)).double().numpy()
    c = rng.standard_normal((64, n)).astype(np.float32)
    bound = 1e-6 * (np.abs(a) @ np.abs(b) + np.abs(c)) + 1e-7  # fp32 accumulation of exact products
    wants = (a @ b + c, a @ b, a @ b)
    documented = (128, 512, 16 * n, 128)  # K-major LBO, SBO; MN-major LBO, SBO (cuda_src/na_wgmma.cuh)

    def matches(fields):
        return [bool((np.abs(got - want) <= bound).all()) for got, want in
                zip(_run_wgmma(backend, dtype, n, a, b, c, fields), wants)]

    ok = matches(documented)
    if not all(ok):  # diagnose: does the device read the two offset fields the other way round?
        swapped = matches((512, 128, 128, 16 * n))
        readings = [f"{major}: {'ok' if good else 'matches with LBO and SBO swapped' if other else 'wrong'}"
                    for major, good, other in zip(("K-major + C", "MN-major", "SS (A and B K-major)"), ok, swapped)]
        pytest.fail(f"wgmma with the documented descriptor fields: {'; '.join(readings)}")


# ---------------------------------------------------------------- key-loop helpers: divisor, ex2, cp.async


def _launch(backend: str, name: str, threads: int, blocks: int, arrays: list[np.ndarray], scalars=()) -> list:
    """Run self-test ``name`` on copies of ``arrays`` (device copies on cuda); returns them after the launch."""
    if backend == "cuda":
        import cupy

        device = [cupy.asarray(a) for a in arrays]
    else:
        device = [a.copy() for a in arrays]
    args = tuple(P.ptr(a) for a in device) + tuple(P.i64(s) for s in scalars)
    launch = P.LaunchPlan(P.Kernel("na_selftest.cu", name), (blocks, 1, 1), (threads, 1, 1), 0, args)
    na_rtc.backends.executor(backend)(launch)
    return [a.get() if backend == "cuda" else a for a in device]


@pytest.mark.parametrize("backend", BACKENDS)
def test_divisor_divides_exactly(backend):
    """na_divide(na_make_divisor(d), n) == n // d over random and edge pairs of 0 <= n < 2^31, 1 <= d < 2^31."""
    rng = np.random.default_rng(7)
    top = 2**31 - 1
    d_edges = np.array([1, 2, 3, 7, 8, 20, 63, 64, 65, 1000, 2**16, 2**30, 2**30 + 1, top - 1, top], np.int64)
    n = [rng.integers(0, 2**31, 100_000), rng.integers(0, 4096, 50_000)]
    d = [rng.integers(1, 2**31, 100_000), rng.integers(1, 64, 50_000)]
    for dv in d_edges:  # around multiples of the divisor and at the ends of the range
        multiples = np.array([0, 1, 2, 3, 1000, top // dv], np.int64) * dv
        cand = np.concatenate([multiples - 1, multiples, multiples + 1, [0, top]])
        cand = cand[(cand >= 0) & (cand <= top)]
        n.append(cand)
        d.append(np.full(cand.size, dv))
    n = np.concatenate(n).astype(np.int32)
    d = np.concatenate(d).astype(np.int32)
    (_, _, got) = _launch(backend, "na_selftest_divide", 256, -(-n.size // 256), [n, d, np.zeros_like(n)],
                          (n.size,))
    np.testing.assert_array_equal(got, n.astype(np.int64) // d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exp2_fast_is_within_two_ulp(backend):
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.uniform(-126, 127, 100_000), rng.uniform(-1, 1, 10_000), np.arange(-126, 128),
                        [0.0, -0.0, np.inf, -np.inf, np.nan, -1e30]]).astype(np.float32)
    (_, got) = _launch(backend, "na_selftest_exp2", 256, -(-x.size // 256), [x, np.zeros_like(x)], (x.size,))
    want = np.exp2(x.astype(np.float64))
    finite = np.isfinite(want) & (want > 0)
    rel = np.abs(got[finite] - want[finite]) / want[finite]
    assert rel.max() <= 2 * 2.0**-23, f"max relative error {rel.max():.3g}"
    assert got[x == np.inf][0] == np.inf and got[x == -np.inf][0] == 0.0 and got[x == np.float32(-1e30)][0] == 0.0
    assert np.isnan(got[np.isnan(x)]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cp_async_zero_fills_and_lands_by_group(backend):
    src = np.random.default_rng(9).integers(1, 256, 128 * 16).astype(np.uint8)  # no zero bytes
    (_, out) = _launch(backend, "na_selftest_cp_async", 128, 1, [src, np.zeros(4096, np.uint8)])
    want = src.reshape(128, 16).copy()
    for i in range(128):
        want[i, i % 17:] = 0  # the zero-filled tail of each piece
    final = out[2048:].reshape(128, 16)
    np.testing.assert_array_equal(final, want)
    first = out[:2048].reshape(128, 16)
    np.testing.assert_array_equal(first[0::2], want[0::2])  # the older group has landed at wait_group<1>


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_window_equals_the_definition(backend):
    """na_tc_group_window (32-bit, in group coordinates) against na_rtc.window.window on every position of
    every axis with L < 40: each kernel size, dilation, stride, causal flag."""
    from na_rtc.window import Axis, window

    axes = [Axis(length, k, s, d, causal) for length in range(2, 40) for k in range(2, length + 1)
            for d in range(1, length // k + 1) for s in range(1, k + 1) for causal in (False, True)
            if length >= k * d]
    rng = np.random.default_rng(10)
    axes = [axes[i] for i in sorted(rng.choice(len(axes), 4000, replace=False))]
    max_length = max(a.length for a in axes)
    table = np.array([[a.length, a.kernel_size, a.stride, a.dilation, a.causal] for a in axes], np.int64)
    (_, got) = _launch(backend, "na_selftest_group_window", 64, len(axes),
                       [table, np.full((len(axes), max_length, 2), -7, np.int32)], (max_length,))
    for a, row in zip(axes, got):
        start, end = window(a, np.arange(a.length))
        np.testing.assert_array_equal(row[:a.length, 0], start, err_msg=str(a))
        np.testing.assert_array_equal(row[:a.length, 1], end, err_msg=str(a))
