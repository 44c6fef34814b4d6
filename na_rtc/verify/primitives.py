"""Self-tests of the primitives the kernels are built from, against their definitions.

The kernels rest on a few inline-PTX building blocks (fp16/bf16 conversions, ``mma.sync`` with ``ldmatrix``,
``wgmma`` with ``cp.async`` staging, warp shuffles, ``ex2.approx``) and on small integer helpers (fast
division, window bounds). Each check here launches a self-test kernel of ``cuda_src/na_selftest.cu`` (or
``na_selftest_wgmma.cu``) on a backend and compares what it computed with a NumPy definition taken from the
PTX ISA or the IEEE rules. The same checks run on a GPU (``"cuda"``) and on the CPU (``"emulator"``), so a
GPU or driver whose instructions disagree with the documentation, and an emulator whose model of them does,
are both caught before any kernel result is trusted.

A check never raises for a wrong result: it returns ``ok=False`` with the first mismatch in ``detail``.
Launch errors (a kernel that does not compile or load, an emulator fault) propagate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .. import backends
from ..runtime import plan as P
from ..runtime.families import selftest_wgmma

__all__ = ["PrimitiveResult", "PRIMITIVES", "run_primitives"]

BACKENDS = ("cuda", "emulator")


@dataclass(frozen=True)
class PrimitiveResult:
    """The verdict of one primitive check."""

    name: str  # what was checked, e.g. "mma.sync m16n8k16 + ldmatrix (bf16)"
    ok: bool | None  # None: skipped (e.g. wgmma on a GPU that is not sm_90)
    detail: str  # what was compared; on failure the first mismatch; on a skip, why
    seconds: float


# ---------------------------------------------------------------- running self-test kernels


class _Runner:
    """Copies arrays to the backend's memory and back, and launches self-test kernels there."""

    def __init__(self, backend: str, device: int):
        self.backend, self.device = backend, device

    @property
    def arch(self) -> int | None:
        """The GPU's compute capability (90 for sm_90); None on the emulator, which models every primitive."""
        if self.backend != "cuda":
            return None
        from ..runtime import cuda

        return cuda.arch_of(f"cuda:{self.device}")

    def put(self, array: np.ndarray):
        if self.backend == "cuda":
            import cupy

            with cupy.cuda.Device(self.device):
                return cupy.asarray(array)
        return np.array(array, copy=True)  # the caller's array stays untouched

    def get(self, array) -> np.ndarray:
        return array.get() if self.backend == "cuda" else array

    def launch(self, source: str, name: str, blocks: int, threads: int, args, shared_bytes: int = 0):
        """Runs one launch; returns the emulator's tensor-core instruction counts (None on a GPU)."""
        plan = P.LaunchPlan(P.Kernel(source, name), (blocks, 1, 1), (threads, 1, 1), shared_bytes, tuple(args))
        return backends.executor(self.backend)(plan)

    def run(self, name: str, threads: int, blocks: int, arrays: list[np.ndarray], scalars=()) -> list[np.ndarray]:
        """Self-test ``name`` of na_selftest.cu on copies of ``arrays`` (int64 ``scalars`` after them)."""
        device = [self.put(a) for a in arrays]
        args = [P.ptr(a) for a in device] + [P.i64(s) for s in scalars]
        self.launch("na_selftest.cu", name, blocks, threads, args)
        return [self.get(a) for a in device]


def _needs_arch(runner: _Runner, arch: int, what: str) -> str | None:
    """Why the check is skipped on this GPU, or None when it runs."""
    have = runner.arch
    if have is None or have >= arch:
        return None
    return f"{what} needs sm_{arch} or newer and this GPU is sm_{have}; the kernels that use it do not run here"


def _count(n: int, total: int) -> str:
    return f"{n} of {total}"


# ---------------------------------------------------------------- 16-bit floating point


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (the definition the conversion is held to)."""
    u = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _round_to(dtype: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(16-bit patterns, their exact values as float64) of ``values`` rounded to fp16 or bf16."""
    if dtype == "fp16":
        half = np.asarray(values).astype(np.float16)
        return half.view(np.uint16), half.astype(np.float64)
    bits = bf16_bits(np.asarray(values, np.float32))
    return bits, _bf16_values(bits).astype(np.float64)


def _conversion_samples() -> np.ndarray:
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


def _hex16(v) -> str:
    return f"0x{int(v):04x}"


def _hex32(v) -> str:
    return f"0x{int(v):08x}"


def _decimal(v) -> str:
    return repr(float(v))


def _first_bad(label: str, inputs: np.ndarray, got: np.ndarray, want: np.ndarray, bad: np.ndarray, show) -> str:
    i = int(np.flatnonzero(bad)[0])
    x = np.float32(inputs[i])
    return (f"{label} of {float(x)!r} ({_hex32(x.view(np.uint32))}): got {show(got[i])}, want {show(want[i])} "
            f"({_count(int(bad.sum()), bad.size)} values wrong)")


def _check_convert(runner: _Runner) -> tuple[bool, str]:
    values = _conversion_samples()
    n = values.size
    f16, bf16, f16_back, bf16_back = runner.run(
        "na_selftest_convert", 256, -(-n // 256),
        [values, np.zeros(n, np.uint16), np.zeros(n, np.uint16), np.zeros(n, np.float32), np.zeros(n, np.float32)],
        (n,))[1:]
    nan = np.isnan(values)
    with np.errstate(over="ignore"):  # overflow to inf is one of the cases under test
        want_f16 = values.astype(np.float16)
    want_f16_bits, want_bf16 = want_f16.view(np.uint16), bf16_bits(values)
    widened, got_widened = _bf16_values(bf16).view(np.uint32), bf16_back.view(np.uint32)
    checks = [  # (what, got, want, which values are wrong, how to show a value)
        ("float32 -> fp16", f16, want_f16_bits, ~nan & (f16 != want_f16_bits), _hex16),
        ("float32 -> fp16 (NaN stays NaN)", f16, want_f16_bits, nan & ~np.isnan(f16.view(np.float16)), _hex16),
        ("float32 -> bf16", bf16, want_bf16, ~nan & (bf16 != want_bf16), _hex16),
        ("float32 -> bf16 (NaN stays NaN)", bf16, want_bf16, nan & ~np.isnan(_bf16_values(bf16)), _hex16),
        ("fp16 -> float32", f16_back, want_f16.astype(np.float32), ~nan & (f16_back != want_f16.astype(np.float32)),
         _decimal),
        # widening is exact (a 16-bit shift); NaN payloads are not specified, only NaN-ness
        ("bf16 -> float32", got_widened, widened, ~nan & (got_widened != widened), _hex32),
        ("bf16 -> float32 (NaN stays NaN)", bf16_back, bf16_back, nan & ~np.isnan(bf16_back), _decimal),
    ]
    for label, got, want, bad, show in checks:
        if bad.any():
            return False, _first_bad(label, values, got, want, bad, show)
    return True, (f"{n} float32 values (every finite fp16, every fp16 tie, random bits, bf16 ties, edges) to fp16 "
                  "and bf16 and back: bit-exact round to nearest even")


# ---------------------------------------------------------------- tensor cores: mma.sync and ldmatrix

_MMA_PATHS = ("fragments from the documented layout", "A ldmatrix.x4, B ldmatrix.x2 on B^T rows",
              "B ldmatrix.x2.trans on B rows", "B ldmatrix.x4 on B^T rows (both k-steps)",
              "B ldmatrix.x4.trans on B rows (both column tiles)")


def _product_error(label: str, got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> str | None:
    """None when ``got`` is within ``bound`` of ``want`` everywhere, else the first element that is not."""
    bad = ~(np.abs(got - want) <= bound)  # NaN (an element never written) is bad
    if not bad.any():
        return None
    index = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
    at = ", ".join(str(int(i)) for i in index)
    return (f"{label}: D[{at}] = {float(got[index]):.7g}, want {float(want[index]):.7g} (bound "
            f"{float(bound[index]):.2g}; {_count(int(bad.sum()), bad.size)} elements wrong)")


def _accumulation_bound(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    # the products of 16-bit values are exact; fp32 accumulation costs a few float32 ulps of the sum of
    # magnitudes (the hardware's summation order and internal width are unspecified)
    return 1e-6 * (np.abs(a) @ np.abs(b) + np.abs(c)) + 1e-7


def _check_mma(dtype: str) -> Callable[[_Runner], tuple[bool | None, str]]:
    def check(runner: _Runner) -> tuple[bool | None, str]:
        skip = _needs_arch(runner, 80, f"mma.sync with {dtype}")
        if skip:
            return None, skip
        rng = np.random.default_rng(5)
        # distinct, exactly representable values: a layout mix-up moves them and changes D
        a_bits, a = _round_to(dtype, rng.standard_normal((16, 32)))
        b_bits, b = _round_to(dtype, rng.standard_normal((32, 16)))
        c = rng.standard_normal((16, 16)).astype(np.float32)
        arrays = [runner.put(x) for x in (a_bits, b_bits, c, np.full((5, 16, 16), np.nan, np.float32))]
        counts = runner.launch("na_selftest.cu", f"na_selftest_mma<{dtype}_t>", 1, 32,
                               [P.ptr(x) for x in arrays])
        if counts is not None and counts.get("mma.sync") != 20:  # 5 ways x 2 k-steps x 2 column tiles
            return False, f"the emulator counted {counts} tensor-core instructions, not 20 mma.sync"
        got = runner.get(arrays[3])
        want, bound = a @ b + c, _accumulation_bound(a, b, c)
        for path, d in zip(_MMA_PATHS, got):
            error = _product_error(path, d, want, bound)
            if error:
                return False, error
        return True, (f"D = A B + C (16 x 32 x 16, two k-steps of two 8-column tiles) in {len(_MMA_PATHS)} ways: "
                      f"{'; '.join(_MMA_PATHS)}; all within fp32 accumulation bounds")
    return check


#: ldmatrix variants of the self-test, in its output order: (matrices, .trans)
_LDMATRIX_VARIANTS = ((1, False), (1, True), (2, False), (2, True), (4, False), (4, True))


def ldmatrix_fragments(rows: np.ndarray, count: int, trans: bool) -> np.ndarray:
    """The registers ``[lane][matrix]`` ldmatrix.m8n8.x{count}{.trans}.b16 gives when lane ``8 j + i`` points
    at shared row ``rows[8 j + i]`` (row i of matrix j) and shared row s holds the values 8 s .. 8 s + 7.

    PTX ISA, "Warp-level matrix load instruction: ldmatrix": lane l receives in register j the elements
    (l / 4, 2 (l % 4) + {0, 1}) of matrix j, low half first; with .trans the elements (2 (l % 4) + {0, 1}, l / 4).
    """
    want = np.zeros((32, count), np.uint32)
    for lane in range(32):
        for j in range(count):
            for h in range(2):
                row, col = (2 * (lane % 4) + h, lane // 4) if trans else (lane // 4, 2 * (lane % 4) + h)
                want[lane, j] |= np.uint32(8 * int(rows[8 * j + row]) + col) << np.uint32(16 * h)
    return want


def _ldmatrix_name(count: int, trans: bool) -> str:
    return f"ldmatrix.x{count}{'.trans' if trans else ''}"


def _check_ldmatrix(runner: _Runner) -> tuple[bool | None, str]:
    skip = _needs_arch(runner, 75, "ldmatrix")
    if skip:
        return None, skip
    rows = np.random.default_rng(12).permutation(32).astype(np.int32)  # row addresses out of lane order
    (_, out) = runner.run("na_selftest_ldmatrix", 32, 1, [rows, np.zeros((6, 32, 4), np.uint32)])
    for v, (count, trans) in enumerate(_LDMATRIX_VARIANTS):
        got, want = out[v, :, :count], ldmatrix_fragments(rows, count, trans)
        if (got != want).any():
            lane, j = (int(i) for i in np.argwhere(got != want)[0])
            other = "" if (got != ldmatrix_fragments(rows, count, not trans)).any() else (
                f"; it matches {_ldmatrix_name(count, not trans)}'s layout")
            return False, (f"{_ldmatrix_name(count, trans)}: lane {lane} register {j} = 0x{int(got[lane, j]):08x}, "
                           f"want 0x{int(want[lane, j]):08x} (the PTX ISA fragment layout; "
                           f"{_count(int((got != want).sum()), got.size)} registers wrong{other})")
    return True, ("every lane's registers of ldmatrix .x1, .x2, .x4, each plain and .trans, from row addresses in "
                  "permuted lane order: the PTX ISA fragment layout")


# ---------------------------------------------------------------- warp shuffles and votes


def _check_shuffle(runner: _Runner) -> tuple[bool, str]:
    rng = np.random.default_rng(13)
    vi = rng.integers(-2**31, 2**31, 64).astype(np.int32)
    special = np.array([0x7FC01234, 0xFFC00001, 0x80000000, 0x00000001, 0x007FFFFF, 0x7F800000, 0xFF800000,
                        0x7F7FFFFF], np.uint32)  # NaN payloads, -0, subnormals, inf, the largest float
    vf = np.concatenate([special, rng.standard_normal(64 - special.size).astype(np.float32).view(np.uint32)])
    vf = vf.view(np.float32)
    (_, _, xi, xf, votes) = runner.run("na_selftest_shuffle", 64, 1, [
        vi, vf, np.zeros((32, 64), np.int32), np.zeros((32, 64), np.float32), np.full((65, 64), -1, np.int32)])
    thread = np.arange(64)
    source = (thread // 32) * 32 + ((thread % 32) ^ np.arange(32)[:, None])  # [lane mask][thread]
    for label, got, want in (("__shfl_xor_sync (int)", xi, vi[source]),
                             ("__shfl_xor_sync (float bits)", xf.view(np.uint32), vf.view(np.uint32)[source])):
        if (got != want).any():
            o, i = (int(k) for k in np.argwhere(got != want)[0])
            return False, (f"{label}, lane mask {o}: thread {i} got 0x{int(got[o, i]) & 0xFFFFFFFF:08x}, want "
                           f"0x{int(want[o, i]) & 0xFFFFFFFF:08x} (thread {int(source[o, i])}'s value; "
                           f"{_count(int((got != want).sum()), got.size)} wrong)")
    p = np.arange(65)[:, None]
    want_any = (p < 64) & (p // 32 == thread // 32)  # only the predicate's own warp votes yes
    if ((votes != 0) != want_any).any():
        q, i = (int(k) for k in np.argwhere((votes != 0) != want_any)[0])
        who = f"only thread {q}'s predicate true" if q < 64 else "no predicate true"
        return False, f"__any_sync with {who}: thread {i} got {int(votes[q, i])}, want {int(want_any[q, i])}"
    return True, ("__shfl_xor_sync (full mask) for every lane mask 0..31 on ints and on float bits (NaN payloads, "
                  "-0, subnormals, inf move unchanged), and __any_sync, in two warps")


# ---------------------------------------------------------------- key-loop helpers: divisor, ex2, cp.async


def _check_divide(runner: _Runner) -> tuple[bool, str]:
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
    (_, _, got) = runner.run("na_selftest_divide", 256, -(-n.size // 256), [n, d, np.zeros_like(n)], (n.size,))
    want = n.astype(np.int64) // d
    bad = got != want
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return False, (f"{int(n[i])} / {int(d[i])}: got {int(got[i])}, want {int(want[i])} "
                       f"({_count(int(bad.sum()), bad.size)} quotients wrong)")
    return True, f"na_divide(na_make_divisor(d), n) == n // d for {n.size} pairs 0 <= n < 2^31, 1 <= d < 2^31"


_FLT_MIN = np.float32(2.0**-126)


def _exp2_samples() -> np.ndarray:
    rng = np.random.default_rng(8)
    near = np.float32(-126.0) + np.arange(-8, 9, dtype=np.float32) * np.float32(2**-17)  # around the flush edge
    return np.concatenate([
        rng.uniform(-126, 128, 100_000), rng.uniform(-1, 1, 10_000),
        rng.uniform(-150, -126, 10_000),  # results that would be subnormal: flushed to zero
        np.arange(-160, 129), near,
        [0.0, -0.0, 1e-40, -1e-40, 1e-45, np.inf, -np.inf, np.nan, -1e30, 1e30],  # +-subnormal inputs count as 0
    ]).astype(np.float32)


def _check_exp2(runner: _Runner) -> tuple[bool, str]:
    """ex2.approx.ftz.f32 (PTX ISA, section 9.7.3.21 "Floating Point Instructions: ex2"): "The maximum ulp
    error is 2 ulp from correctly rounded result across the full range of inputs", and .ftz "flushes subnormal
    inputs and results to sign-preserving zero". So with want = f32(2^x) rounded correctly: |got - want| <= 2 ulp(want)
    where want is a normal number, and got == 0 where want is subnormal or zero (x below -126); an
    approximation that falls under the normal range may be flushed too, as may one past the largest float
    overflow to inf. -inf gives +0, +inf gives inf, NaN stays NaN."""
    x = _exp2_samples()
    (_, got) = runner.run("na_selftest_exp2", 256, -(-x.size // 256), [x, np.zeros_like(x)], (x.size,))
    with np.errstate(over="ignore", invalid="ignore"):  # 2^x past the float32 range; inf - inf below
        # the float64 exp2 is within an ulp of double precision, so rounding it to float32 gives the correctly
        # rounded result but where 2^x lies within 2^-29 relative of a float32 tie
        want = np.exp2(x.astype(np.float64)).astype(np.float32)
        ulp = np.spacing(np.where(np.isfinite(want), want, np.float32(0))).astype(np.float64)
        error = np.abs(got.astype(np.float64) - want.astype(np.float64))
    normal = np.isfinite(want) & (want >= _FLT_MIN)
    ok = np.zeros(x.shape, bool)
    ok[normal] = error[normal] <= 2 * ulp[normal]
    ok |= normal & (got == 0) & (want.astype(np.float64) - 2 * ulp < _FLT_MIN)
    ok |= normal & (got == np.inf) & (want.astype(np.float64) + 2 * ulp > np.finfo(np.float32).max)
    flushed = ~np.isnan(x) & (want < _FLT_MIN)
    ok[flushed] = got[flushed] == 0
    ok |= (want == np.inf) & (got == np.inf)
    ok |= np.isnan(x) & np.isnan(got)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        if flushed[i]:
            expected = f"0 (2^x = {float(want[i])!r} is subnormal: .ftz flushes it)"
        elif normal[i]:
            expected = f"{float(want[i])!r} ({error[i] / ulp[i]:.3g} ulp off, at most 2 allowed)"
        else:
            expected = f"{float(want[i])!r} (a special case of the PTX ISA)"
        return False, (f"ex2.approx.ftz of {float(x[i])!r}: got {float(got[i])!r}, want {expected}; "
                       f"{_count(int((~ok).sum()), ok.size)} inputs wrong")
    worst = float(np.max(error[normal] / ulp[normal]))
    return True, (f"{x.size} inputs in [-160, 128] and specials: within 2 ulp of the correctly rounded 2^x "
                  f"(worst {worst:.3g} ulp), 0 where 2^x is subnormal (x < -126), inf, NaN and subnormal inputs "
                  "as the PTX ISA says")


def _check_cp_async(runner: _Runner) -> tuple[bool, str]:
    src = np.random.default_rng(9).integers(1, 256, 128 * 16).astype(np.uint8)  # no zero bytes
    (_, out) = runner.run("na_selftest_cp_async", 128, 1, [src, np.zeros(4096, np.uint8)])
    want = src.reshape(128, 16).copy()
    for i in range(128):
        want[i, i % 17:] = 0  # the zero-filled tail of each piece
    final, first = out[2048:].reshape(128, 16), out[:2048].reshape(128, 16)
    for label, got, expected, pieces in (("after wait_group 0", final, want, np.arange(128)),
                                         ("after wait_group 1 (the older group)", first[0::2], want[0::2],
                                          np.arange(0, 128, 2))):
        bad = (got != expected).any(axis=1)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            return False, (f"cp.async {label}: thread {int(pieces[k])}'s 16 bytes ({int(pieces[k]) % 17} copied, "
                           f"the rest zero-filled) are {got[k].tolist()}, want {expected[k].tolist()} "
                           f"({_count(int(bad.sum()), bad.size)} pieces wrong)")
    return True, ("128 threads' 16-byte cp.async copies of 0..16 bytes with zero fill, in two commit groups: the "
                  "older group landed at wait_group 1, both at wait_group 0")


def _check_group_window(runner: _Runner) -> tuple[bool, str]:
    from ..window import Axis, window

    axes = [Axis(length, k, s, d, causal) for length in range(2, 40) for k in range(2, length + 1)
            for d in range(1, length // k + 1) for s in range(1, k + 1) for causal in (False, True)
            if length >= k * d]
    rng = np.random.default_rng(10)
    axes = [axes[i] for i in sorted(rng.choice(len(axes), 4000, replace=False))]
    max_length = max(a.length for a in axes)
    table = np.array([[a.length, a.kernel_size, a.stride, a.dilation, a.causal] for a in axes], np.int64)
    (_, got) = runner.run("na_selftest_group_window", 64, len(axes),
                          [table, np.full((len(axes), max_length, 2), -7, np.int32)], (max_length,))
    for a, row in zip(axes, got):
        want = np.stack(window(a, np.arange(a.length)), axis=1)
        if (row[:a.length] != want).any():
            i = int(np.flatnonzero((row[:a.length] != want).any(axis=1))[0])
            return False, (f"{a}, position {i}: window (start, end) = {tuple(int(v) for v in row[i])}, "
                           f"want {tuple(int(v) for v in want[i])}")
    return True, f"na_tc_group_window against na_rtc.window on every position of {len(axes)} axes with L < 40"


# ---------------------------------------------------------------- Hopper: wgmma m64nNk16 (sm_90a)

#: the self-test's launches: (how its operands are staged, warpgroups, async_copies flag)
_WGMMA_CONFIGS = (("plain stores, 1 warpgroup", 1, 0), ("cp.async + fence.proxy.async, 1 warpgroup", 1, 1),
                  ("cp.async + fence.proxy.async, 2 warpgroups", 2, 1))
_WGMMA_FORMS = ("K-major + C", "MN-major", "SS (A and B K-major)")


def _wgmma_documented(n: int) -> tuple[int, int, int, int]:
    """The documented LBO and SBO: K-major LBO, SBO; MN-major LBO, SBO (cuda_src/na_wgmma.cuh)."""
    return 128, 512, 16 * n, 128


def _wgmma_swapped(n: int) -> tuple[int, int, int, int]:
    """The other reading of the two offset fields: the documented LBO and SBO exchanged."""
    return 512, 128, 128, 16 * n


def wgmma_verdict(documented: list[bool], swapped: list[bool]) -> str:
    """Which reading of the descriptor fields each form follows, where the documented one failed."""
    return "; ".join(f"{form}: {'ok' if good else 'matches with LBO and SBO swapped' if other else 'wrong'}"
                     for form, good, other in zip(_WGMMA_FORMS, documented, swapped))


def _check_wgmma(dtype: str, n: int) -> Callable[[_Runner], tuple[bool | None, str]]:
    def check(runner: _Runner) -> tuple[bool | None, str]:
        if runner.arch is not None and runner.arch != 90:
            return None, f"wgmma (sm_90a) runs on sm_90 (Hopper) GPUs only; this GPU is sm_{runner.arch}"
        rng = np.random.default_rng(11 + n)
        a_bits, a = _round_to(dtype, rng.standard_normal((128, 32)))
        b_bits, b = _round_to(dtype, rng.standard_normal((32, n)))
        bt_bits = np.ascontiguousarray(b_bits.T)
        c = rng.standard_normal((128, n)).astype(np.float32)

        miscounted = []  # what the emulator counted where it differs from the self-test's products

        def launch(warpgroups: int, async_copies: int, fields) -> list[np.ndarray]:
            rows = 64 * warpgroups
            arrays = [runner.put(x) for x in (a_bits[:rows], b_bits, bt_bits, c[:rows])]
            outputs = [runner.put(np.full((rows, n), np.nan, np.float32)) for _ in _WGMMA_FORMS]
            counts = runner.launch("na_selftest_wgmma.cu", selftest_wgmma.name(f"{dtype}_t", n), 1,
                                   128 * warpgroups,
                                   [P.ptr(x) for x in arrays + outputs] + [P.i32(f) for f in fields]
                                   + [P.i32(async_copies)], selftest_wgmma.shared_bytes(n))
            expected = 4 * warpgroups * 2 * len(_WGMMA_FORMS)  # per warp, two k-steps of each form
            if counts is not None and counts.get("wgmma") != expected:
                miscounted.append(f"the emulator counted {counts} tensor-core instructions, not {expected} wgmma")
            return [runner.get(x) for x in outputs]

        def matches(rows: int, got: list[np.ndarray]) -> list[tuple[bool, str | None]]:
            ab = a[:rows] @ b
            bound = _accumulation_bound(a[:rows], b, c[:rows])
            return [(error is None, error) for error in
                    (_product_error(form, d, want, bound)
                     for form, d, want in zip(_WGMMA_FORMS, got, (ab + c[:rows], ab, ab)))]

        for label, warpgroups, async_copies in _WGMMA_CONFIGS:
            verdicts = matches(64 * warpgroups, launch(warpgroups, async_copies, _wgmma_documented(n)))
            if miscounted:
                return False, f"{label}: {miscounted[0]}"
            if all(ok for ok, _ in verdicts):
                continue
            # diagnose: does the device read the two offset fields the other way round?
            swapped = [ok for ok, _ in matches(64 * warpgroups,
                                               launch(warpgroups, async_copies, _wgmma_swapped(n)))]
            first = next(error for ok, error in verdicts if not ok)
            return False, (f"wgmma with the documented descriptor fields, {label}: "
                           f"{wgmma_verdict([ok for ok, _ in verdicts], swapped)} (first: {first})")
        return True, (f"64 x 32 times 32 x {n} per warpgroup in two k-steps, B K-major (+ C) and MN-major (scale-d "
                      "0 first), and the SS form; operands staged by "
                      f"{', by '.join(label for label, _, _ in _WGMMA_CONFIGS)}: all within fp32 accumulation bounds")
    return check


# ---------------------------------------------------------------- the registry


def _timed(name: str, body: Callable[[_Runner], tuple[bool | None, str]]) -> Callable[[str, int], PrimitiveResult]:
    def check(backend: str, device: int = 0) -> PrimitiveResult:
        start = time.perf_counter()
        ok, detail = body(_Runner(backend, device))
        return PrimitiveResult(name, ok, detail, time.perf_counter() - start)

    check.__doc__ = f"{name}: returns a PrimitiveResult for backend 'cuda' (on GPU ``device``) or 'emulator'."
    return check


#: check id -> check(backend, device)
PRIMITIVES: dict[str, Callable[[str, int], PrimitiveResult]] = {
    "convert": _timed("fp16 and bf16 conversions (cvt.rn)", _check_convert),
    "mma_fp16": _timed("mma.sync m16n8k16 + ldmatrix (fp16)", _check_mma("fp16")),
    "mma_bf16": _timed("mma.sync m16n8k16 + ldmatrix (bf16)", _check_mma("bf16")),
    "ldmatrix": _timed("ldmatrix m8n8 fragment layout (x1, x2, x4, .trans)", _check_ldmatrix),
    "shuffle": _timed("warp shuffles and votes (__shfl_xor_sync, __any_sync)", _check_shuffle),
    "divide": _timed("division by a precomputed divisor (na_divide)", _check_divide),
    "exp2": _timed("ex2.approx.ftz.f32", _check_exp2),
    "cp_async": _timed("cp.async with zero fill and commit groups", _check_cp_async),
    "group_window": _timed("window bounds in group coordinates (na_tc_group_window)", _check_group_window),
    **{f"wgmma_{dtype}_n{n}": _timed(f"wgmma m64n{n}k16 ({dtype})", _check_wgmma(dtype, n))
       for dtype in ("fp16", "bf16") for n in selftest_wgmma.N},
}


def run_primitives(backend: str, device: int = 0, only: Iterable[str] | str | None = None) -> list[PrimitiveResult]:
    """Run the primitive checks (all, or the ids in ``only``, in registry order) on ``backend``: ``"cuda"``
    (GPU ``device``) or ``"emulator"``. Raises ``RuntimeError`` when the backend cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {backend!r}")
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)):
        raise TypeError(f"device must be a GPU index (int), not {type(device).__name__}")
    if device < 0:
        raise ValueError(f"device must be a GPU index >= 0, not {device}")
    if only is None:
        ids = list(PRIMITIVES)
    else:
        wanted = [only] if isinstance(only, str) else list(only)
        unknown = [i for i in wanted if i not in PRIMITIVES]
        if unknown:
            raise ValueError(f"unknown primitive check(s) {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(PRIMITIVES)}")
        ids = [i for i in PRIMITIVES if i in wanted]
    available, reason = backends.get(backend).probe()
    if not available:
        raise RuntimeError(f"the {backend} backend is not available here: {reason}")
    if backend == "cuda":
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if device >= count:
            raise ValueError(f"device {device} does not exist: this machine has {count} GPU(s) (0..{count - 1})")
    return [PRIMITIVES[i](backend, int(device)) for i in ids]
