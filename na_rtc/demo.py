"""``python -m na_rtc demo``: neighborhood attention, checked, timed and drawn.

For a few 1D, 2D and 3D problems the demo runs na_rtc's forward and backward on
the best available backend, checks every output and gradient against the
definition computed another way (dense attention over all tokens, masked with
:func:`na_rtc.window.is_neighbor` per axis, in float64), times it next to full
attention over all tokens, and draws the neighborhoods of a few queries.

Usable without the CLI: ``na_rtc.demo.run(out="na.png")`` or
``na_rtc.demo.main(["--quick"])``. Returns/exit code 0 when every check passes.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from na_rtc import backends
from na_rtc.window import Axis, is_neighbor

__all__ = ["DEFAULT_OUT", "Problem", "PROBLEMS", "QUICK_PROBLEMS", "run", "main", "draw_neighborhoods"]

DEFAULT_OUT = "na_rtc_demo.png"
#: (flags, argparse options) of every argument; ``na_rtc.__main__``'s demo command and :func:`main` share them
ARGUMENTS: tuple[tuple[tuple[str, ...], dict], ...] = (
    (("--out",), {"default": DEFAULT_OUT, "metavar": "PATH", "help": f"where to write the PNG (default: {DEFAULT_OUT})"}),
    (("--no-png",), {"action": "store_true", "help": "skip the neighborhood picture"}),
    (("--arrays",), {"choices": ("auto", "torch", "numpy"), "default": "auto",
                     "help": "array library to run on (default: torch if installed, else NumPy)"}),
    (("--repeat",), {"type": int, "default": 1, "metavar": "N", "help": "timed runs per problem, median reported "
                                                                       "(default: 1)"}),
    (("--quick",), {"action": "store_true", "help": "smaller problems (a few seconds)"}),
    (("--backend",), {"choices": ("auto", *backends.names()), "default": "auto",
                      "help": "na_rtc backend every problem runs on, e.g. blocked (default: auto, the automatic "
                              "selection)"}),
)

# the test suite's float32 tolerances: |x - ref| <= atol + rtol * |ref|
TOLERANCE_OUT = (1e-4, 1e-4)
TOLERANCE_GRAD = (1e-3, 1e-3)


# ------------------------------------------------------------------ problems


def _per_axis(value, ndim: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim


@dataclass(frozen=True)
class Problem:
    """One row of the table; ``kernel_size``, ``dilation``, ``stride`` and ``is_causal`` are one value for every
    axis or one per axis, as the functions take them."""

    label: str
    spatial: tuple[int, ...]
    kernel_size: int | tuple[int, ...]
    dilation: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    is_causal: bool | tuple[bool, ...] = False
    batch: int = 1
    heads: int = 4
    head_dim: int = 32
    #: smaller size the dense float64 check runs at (None: the problem's own)
    check_spatial: tuple[int, ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    @property
    def axes(self) -> tuple[Axis, ...]:
        per_axis = (_per_axis(value, self.ndim) for value in (self.kernel_size, self.stride, self.dilation,
                                                               self.is_causal))
        return tuple(Axis(n, k, s, d, c) for n, k, s, d, c in zip(self.spatial, *per_axis))

    def na_kwargs(self) -> dict[str, Any]:
        return dict(
            kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation, is_causal=self.is_causal
        )

    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))

    def for_check(self) -> "Problem":
        return self if self.check_spatial is None else replace(self, spatial=self.check_spatial, check_spatial=None)


# The dense float64 reference of a 64x64 problem (4096^2 logits per head)
# takes ~10 s on two cores; the 2D problems are checked at 32x32 instead,
# the 3D one (a short video: frames x height x width) at 6x12x12.
_CHECK_2D = (32, 32)

PROBLEMS = (
    Problem("1D k=31", (1024,), 31),
    Problem("2D k=7", (64, 64), 7, check_spatial=_CHECK_2D),
    Problem("2D k=7 dil=2", (64, 64), 7, dilation=2, check_spatial=_CHECK_2D),
    Problem("2D k=7 causal", (64, 64), 7, is_causal=True, check_spatial=_CHECK_2D),
    Problem("3D k=3x5x5", (8, 16, 16), (3, 5, 5), check_spatial=(6, 12, 12)),
)

QUICK_PROBLEMS = (
    Problem("1D k=31", (256,), 31),
    Problem("2D k=7", (24, 24), 7),
    Problem("2D k=7 dil=2", (24, 24), 7, dilation=2),
    Problem("2D k=7 causal", (24, 24), 7, is_causal=True),
    Problem("2D k=7 stride=2", (24, 24), 7, stride=2),
    Problem("3D k=3x5x5", (6, 8, 8), (3, 5, 5)),
)


# ------------------------------------------------------------------ the definition, computed densely


def _dense_mask_rows(axes: Sequence[Axis], query_tokens: np.ndarray) -> np.ndarray:
    """``[len(query_tokens), tokens]`` bool: key is a neighbor on every axis."""
    lengths = tuple(axis.length for axis in axes)
    query_coords = np.unravel_index(query_tokens, lengths)
    key_coords = np.unravel_index(np.arange(math.prod(lengths)), lengths)
    mask = np.ones((len(query_tokens), math.prod(lengths)), dtype=bool)
    for axis, qc, kc in zip(axes, query_coords, key_coords):
        positions = np.arange(axis.length)
        per_axis = is_neighbor(axis, positions[:, None], positions[None, :])  # [L, L]
        mask &= per_axis[qc[:, None], kc[None, :]]
    return mask


def dense_attention(q, k, v, dout, scale, axes=None, block_elements=1 << 22):
    """Attention over all tokens in q's dtype (NumPy): ``(out, dq, dk, dv)``.

    ``q, k, v, dout`` are ``[batch, tokens, heads, head_dim]``; with ``dout``
    None only ``(out,)`` is computed. With ``axes`` the logits outside each
    query's neighborhood are masked (the NA definition); without, it is full
    attention. Queries go in blocks of about ``block_elements`` logits to
    bound memory.
    """
    batch, tokens, heads, _ = q.shape
    qt, kt, vt = (np.ascontiguousarray(np.swapaxes(a, 1, 2)) for a in (q, k, v))  # [B, H, N, D]
    out = np.empty_like(qt)
    if dout is not None:
        dot = np.ascontiguousarray(np.swapaxes(dout, 1, 2))
        dq, dk, dv = np.empty_like(qt), np.zeros_like(kt), np.zeros_like(vt)
    rows = max(1, block_elements // (heads * tokens))
    for start in range(0, tokens, rows):
        block = slice(start, min(start + rows, tokens))
        logits = (qt[:, :, block] @ np.swapaxes(kt, -1, -2)) * scale  # [B, H, r, N]
        if axes is not None:
            mask = _dense_mask_rows(axes, np.arange(tokens)[block])
            logits = np.where(mask, logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits, out=logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[:, :, block] = probs @ vt
        if dout is None:
            continue
        dprobs = dot[:, :, block] @ np.swapaxes(vt, -1, -2)
        delta = (dot[:, :, block] * out[:, :, block]).sum(axis=-1, keepdims=True)
        dv += np.swapaxes(probs, -1, -2) @ dot[:, :, block]
        dlogits = probs * (dprobs - delta)
        dq[:, :, block] = (dlogits @ kt) * scale
        dk += (np.swapaxes(dlogits, -1, -2) @ qt[:, :, block]) * scale
    results = (out,) if dout is None else (out, dq, dk, dv)
    return tuple(np.swapaxes(a, 1, 2) for a in results)


def _flat(a: np.ndarray, problem: Problem) -> np.ndarray:
    return a.reshape(problem.batch, problem.tokens, problem.heads, problem.head_dim)


def _max_error(got: np.ndarray, ref: np.ndarray, tolerance: tuple[float, float]) -> tuple[float, bool]:
    got = np.asarray(got, dtype=np.float64)
    diff = np.abs(got - ref)
    atol, rtol = tolerance
    ok = bool(np.all(diff <= atol + rtol * np.abs(ref))) and bool(np.all(np.isfinite(got)))
    return float(diff.max()), ok


# ------------------------------------------------------------------ runners: one per array kind


class PeakMemory:
    """Peak memory growth during one call, labelled by how it was measured.

    CUDA: the torch caching allocator's peak. CPU on Linux: the kernel's
    peak-RSS counter (VmHWM), reset before the call after handing freed heap
    memory back to the OS (``malloc_trim``), so memory that the allocator
    kept from earlier calls does not hide growth. Elsewhere: RSS sampled by a
    thread with psutil, or nothing.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._libc = self._load_libc()
        self._sampler = None
        if device.startswith("cuda"):
            self.method = "cuda"
            self.label = "peak memory: torch CUDA allocator peak"
        elif self._reset_hwm():
            self.method = "hwm"
            self.label = "peak memory: process RSS growth (Linux VmHWM)"
        elif self._has_psutil():
            self.method = "psutil"
            self.label = "peak memory: process RSS growth, sampled every 1 ms (psutil)"
        else:
            self.method = None
            self.label = "peak memory: not measured (no /proc, no psutil)"

    @staticmethod
    def _load_libc():
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim  # glibc only
            return libc
        except (OSError, AttributeError):
            return None

    @staticmethod
    def _has_psutil() -> bool:
        try:
            import psutil  # noqa: F401
        except ImportError:
            return False
        return True

    @staticmethod
    def _reset_hwm() -> bool:
        """Reset the kernel's peak-RSS counter (Linux >= 4.0); False when not possible."""
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            return False
        return PeakMemory._status_bytes("VmHWM") is not None

    @staticmethod
    def _status_bytes(key: str) -> int | None:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None

    def start(self) -> None:
        """Called right before the measured call, outside any timed region."""
        if self.method == "cuda":
            import torch

            torch.cuda.synchronize()
            self._before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if self.method == "hwm":
            self._reset_hwm()
            self._before = self._status_bytes("VmRSS")
        elif self.method == "psutil":
            self._sampler = _RssSampler()
            self._before = self._sampler.start()

    def stop(self) -> float | None:
        """Bytes by which memory peaked above its level at :meth:`start`."""
        if self.method == "cuda":
            import torch

            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - self._before)
        if self.method == "hwm":
            peak = self._status_bytes("VmHWM")
            if peak is None or self._before is None:
                return None
            return float(max(peak - self._before, 0))
        if self.method == "psutil" and self._sampler is not None:
            peak = self._sampler.stop()
            self._sampler = None
            return float(max(peak - self._before, 0))
        return None


class _RssSampler:
    """Polls this process's RSS on a thread; the fallback where VmHWM can't be reset."""

    def __init__(self, interval: float = 1e-3):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._peak = 0
        self._done = threading.Event()

    def _poll(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            self._done.wait(self._interval)

    def start(self) -> int:
        self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self._peak

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self._peak, self._process.memory_info().rss)


def _timed(fn: Callable[[], Any], repeat: int, sync: Callable[[], None], memory: PeakMemory | None = None):
    """Median seconds of ``repeat`` calls, and the peak memory of the first (if asked).

    Callers warm up first (the check run does): first-call work is not timed.
    """
    times, peak = [], None
    for index in range(max(1, repeat)):
        measure = memory is not None and index == 0
        if measure:
            memory.start()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        if measure:
            peak = memory.stop()
    return statistics.median(times), peak


class TorchRunner:
    """torch tensors; the backend's autograd gives the gradients."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = device
        kind = "torch CUDA" if device.startswith("cuda") else "torch autograd"
        self.kind = kind
        self.full_label = f"torch SDPA ({kind})"

    def to_array(self, a: np.ndarray):
        return self.torch.from_numpy(a).to(self.device)

    def to_numpy(self, a) -> np.ndarray:
        return a.detach().cpu().numpy()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def na_forward(self, problem: Problem, q, k, v):
        op = _na_function(problem)
        with self.torch.no_grad():
            return op(q, k, v, **problem.na_kwargs())

    def na_forward_backward(self, problem: Problem, q, k, v, dout):
        op = _na_function(problem)
        leaves = [a.detach().requires_grad_(True) for a in (q, k, v)]
        out = op(*leaves, **problem.na_kwargs())
        out.backward(dout)
        return (out.detach(), *(leaf.grad for leaf in leaves))

    def full_forward(self, q, k, v):
        with self.torch.no_grad():
            return self._full(q, k, v)

    def full_forward_backward(self, q, k, v, dout):
        leaves = [a.detach().requires_grad_(True) for a in (q, k, v)]
        out = self._full(*leaves)
        out.backward(dout)
        return (out.detach(), *(leaf.grad for leaf in leaves))

    def _full(self, q, k, v):
        """Full attention over all tokens (what NA avoids), heads-last: torch's scaled_dot_product_attention
        (its flash and memory-efficient kernels where they apply), scale 1/sqrt(head_dim) as na_rtc's."""
        qt, kt, vt = (a.flatten(1, -3).transpose(1, 2) for a in (q, k, v))  # [B, H, N, D]
        out = self.torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        return out.transpose(1, 2).reshape(q.shape)


class NumpyRunner:
    """NumPy arrays; gradients from ``na*_backward`` with the saved logsumexp. Full attention is torch's SDPA on
    the same arrays where torch is installed (the full attention a model would run), else a dense softmax."""

    kind = "numpy"
    device = "cpu"

    def __init__(self):
        try:
            self._sdpa = TorchRunner("cpu")
        except ImportError:  # a NumPy-only install
            self._sdpa = None
        self.full_label = "torch SDPA (cpu)" if self._sdpa is not None else "dense softmax (numpy)"

    def to_array(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def sync(self) -> None:
        pass

    def na_forward(self, problem: Problem, q, k, v):
        return _na_function(problem)(q, k, v, **problem.na_kwargs())

    def na_forward_backward(self, problem: Problem, q, k, v, dout):
        out, lse = _na_function(problem)(q, k, v, return_lse=True, **problem.na_kwargs())
        backward = _na_function(problem, "_backward")
        dq, dk, dv, _ = backward(dout, q, k, v, output=out, logsumexp=lse, **problem.na_kwargs())
        return out, dq, dk, dv

    def full_forward(self, q, k, v):
        if self._sdpa is not None:
            return self._sdpa.to_numpy(self._sdpa.full_forward(*map(self._sdpa.torch.from_numpy, (q, k, v))))
        return self.full_forward_backward(q, k, v, None)[0]

    def full_forward_backward(self, q, k, v, dout):
        """Full attention over all tokens: torch SDPA on the arrays (shared, not copied), or without torch a
        dense softmax, unblocked: the memory NA avoids."""
        if self._sdpa is not None:
            results = self._sdpa.full_forward_backward(*map(self._sdpa.torch.from_numpy, (q, k, v, dout)))
            return tuple(self._sdpa.to_numpy(r) for r in results)
        batch, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
        flat = [a.reshape(batch, -1, heads, dim) for a in (q, k, v)]
        dflat = None if dout is None else dout.reshape(flat[0].shape)
        results = dense_attention(*flat, dflat, dim**-0.5, block_elements=1 << 62)
        return tuple(r.reshape(q.shape) for r in results)


def _na_function(problem: Problem, suffix: str = ""):
    """``na_rtc.na{1,2,3}d{suffix}`` for the problem's rank."""
    import na_rtc

    return getattr(na_rtc, f"na{problem.ndim}d{suffix}")


def _torch_device() -> str | None:
    """'cuda' when torch sees a GPU and na_rtc's cuda backend is available, 'cpu' otherwise; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if torch.cuda.is_available():
            from na_rtc import backends

            available = {name: ok for name, ok, _ in backends.describe()}
            if available.get("cuda") and backends.current_backend_name() in (None, "cuda"):
                return "cuda"
    except Exception:  # noqa: BLE001 - a broken CUDA setup falls back to the CPU demo
        pass
    return "cpu"


def make_runner(arrays: str = "auto"):
    if arrays in ("auto", "torch"):
        device = _torch_device()
        if device is not None:
            return TorchRunner(device)
        if arrays == "torch":
            raise SystemExit("torch is not installed: pip install torch, or use --arrays numpy")
    return NumpyRunner()


def backend_label(runner, ndim: int | None = None) -> str:
    """The backend the runner's calls run on (of a problem with ``ndim`` axes: automatic selection takes the
    reference backend where the default's kernels lack that rank)."""
    from na_rtc import _arrays, backends

    name = backends.current_backend_name()
    if name is None:
        kind = _arrays.NUMPY if isinstance(runner, NumpyRunner) else _arrays.TORCH
        name = backends._default_name(kind, runner.device)
        if ndim is not None and ndim not in backends.get(name).ranks:
            name = "reference"
    return f"{name} ({runner.kind})"


# ------------------------------------------------------------------ one row of the table


@dataclass
class Row:
    problem: str
    shape: str
    backend: str
    forward_s: float | None = None
    forward_backward_s: float | None = None
    peak_bytes: float | None = None
    error_out: float | None = None
    error_grad: float | None = None
    passed: bool | None = None  # None: not a checked row (baseline)
    checked_at: str | None = None  # shape of the checked problem when smaller
    note: str = ""
    tokens: int = 0


COLUMNS = (
    ("problem", 15, "<"),
    ("shape", 14, "<"),
    ("backend", 30, "<"),
    ("fwd ms", 8, ">"),
    ("fwd+bwd ms", 10, ">"),
    ("peak MiB", 9, ">"),
    ("err out", 8, ">"),
    ("err grad", 8, ">"),
    ("check", 5, "<"),
)


def _format_row(values: Sequence[str]) -> str:
    return "  ".join(f"{value:{align}{width}}" for value, (_, width, align) in zip(values, COLUMNS)).rstrip()


def _cells(row: Row) -> list[str]:
    def ms(seconds):
        return "-" if seconds is None else f"{seconds * 1e3:.1f}"

    def mib(count):
        return "n/a" if count is None else f"{count / 2**20:.1f}"

    def err(value):
        return "-" if value is None else f"{value:.1e}"

    check = {None: "-", True: "pass", False: "FAIL"}[row.passed]
    if row.checked_at is not None and row.passed is not None:
        check += "*"
    return [row.problem, row.shape, row.backend, ms(row.forward_s), ms(row.forward_backward_s),
            mib(row.peak_bytes), err(row.error_out), err(row.error_grad), check]


def _inputs(shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]  # q, k, v, dout


def check_problem(runner, problem: Problem, seed: int = 0) -> Row:
    """Run ``problem`` forward and backward and compare with the dense masked definition."""
    row = Row(problem.label, problem.shape_text(), backend_label(runner, problem.ndim))
    host = _inputs(problem.shape, seed)
    q, k, v, dout = (runner.to_array(a) for a in host)
    results = runner.na_forward_backward(problem, q, k, v, dout)
    got = [_flat(runner.to_numpy(a), problem) for a in results]
    wide = [_flat(a.astype(np.float64), problem) for a in host]
    reference = dense_attention(*wide, problem.head_dim**-0.5, axes=problem.axes)
    checks = [_max_error(got[0], reference[0], TOLERANCE_OUT)]
    checks += [_max_error(g, r, TOLERANCE_GRAD) for g, r in zip(got[1:], reference[1:])]
    row.error_out = checks[0][0]
    row.error_grad = max(error for error, _ in checks[1:])
    row.passed = all(ok for _, ok in checks)
    if not row.passed:
        failed = [name for name, (_, ok) in zip(("out", "dq", "dk", "dv"), checks) if not ok]
        row.note = "out of tolerance: " + ", ".join(failed)
    return row


def run_problem(runner, problem: Problem, repeat: int, memory: PeakMemory, seed: int = 0) -> Row:
    """Check ``problem`` (at its check size; this also warms up), then time it at full size."""
    try:
        row = check_problem(runner, problem.for_check(), seed)
        row.shape = problem.shape_text()
        if problem.check_spatial is not None:
            row.checked_at = problem.for_check().shape_text()
        q, k, v, dout = (runner.to_array(a) for a in _inputs(problem.shape, seed))
        row.forward_backward_s, row.peak_bytes = _timed(
            lambda: runner.na_forward_backward(problem, q, k, v, dout), repeat, runner.sync, memory
        )
        row.forward_s, _ = _timed(lambda: runner.na_forward(problem, q, k, v), repeat, runner.sync)
    except Exception as error:  # noqa: BLE001 - report the failing problem, keep going
        row = Row(problem.label, problem.shape_text(), backend_label(runner, problem.ndim), passed=False)
        row.note = f"{type(error).__name__}: {error}"
    return row


def run_full_attention(runner, problem: Problem, repeat: int, memory: PeakMemory) -> Row:
    """Full attention over all of ``problem``'s tokens (torch SDPA where torch is installed): the cost NA
    avoids."""
    shape = (problem.batch, problem.tokens, problem.heads, problem.head_dim)
    row = Row("full attention", "x".join(map(str, shape)), runner.full_label)
    q, k, v, dout = (runner.to_array(a) for a in _inputs(shape, 1))
    try:
        runner.full_forward_backward(q, k, v, dout)  # the warm-up the NA rows get from their check (first-call work)
        row.forward_backward_s, row.peak_bytes = _timed(
            lambda: runner.full_forward_backward(q, k, v, dout), repeat, runner.sync, memory
        )
        row.forward_s, _ = _timed(lambda: runner.full_forward(q, k, v), repeat, runner.sync)
    except (MemoryError, RuntimeError) as error:  # torch reports allocation failures as RuntimeError
        row.note = f"skipped: {type(error).__name__}: {error}"
    return row


# ------------------------------------------------------------------ the picture


@dataclass
class Panel:
    title: str
    axes: tuple[Axis, Axis]
    query: tuple[int, int]
    shared: bool = False  # also mark the queries that share this window (stride)
    centered_outline: bool = False  # dashed box where a zero-padded window would sit


def _neighborhood(axes: tuple[Axis, Axis], query: tuple[int, int]) -> np.ndarray:
    rows = is_neighbor(axes[0], query[0], np.arange(axes[0].length))
    cols = is_neighbor(axes[1], query[1], np.arange(axes[1].length))
    return rows[:, None] & cols[None, :]


def _panels(size: int, k: int) -> list[Panel]:
    plain = (Axis(size, k), Axis(size, k))
    dilated = (Axis(size, k, dilation=2), Axis(size, k, dilation=2))
    causal = (Axis(size, k, causal=True), Axis(size, k, causal=True))
    strided = (Axis(size, k, stride=4), Axis(size, k, stride=4))
    mid = size // 2
    return [
        Panel("center query", plain, (mid, mid)),
        Panel("edge query: window shifted inward", plain, (mid, 1), centered_outline=True),
        Panel(f"corner query: still {k}×{k} keys", plain, (size - 1, size - 1), centered_outline=True),
        Panel("dilation 2: every 2nd row and column", dilated, (mid, mid)),
        Panel("causal (both axes): keys up to the query", causal, (mid, mid)),
        Panel("stride 4: 4×4 queries share one window", strided, (mid + 1, mid - 2), shared=True),
    ]


def draw_neighborhoods(out_path: str, size: int = 24, k: int = 7, stream=None) -> str | None:
    """Draw the neighborhoods of a few queries on a ``size``² grid; returns the path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        print("matplotlib is not installed, skipping the picture (pip install matplotlib)", file=stream or sys.stdout)
        return None

    colors = {"empty": "#eeeeee", "neighbor": "#4c8bd6", "shared": "#f5b971", "query": "#d62728",
              "outline": "#222222"}
    cmap = ListedColormap([colors["empty"], colors["neighbor"], colors["query"]])
    panels = _panels(size, k)
    fig, grid = plt.subplots(2, 3, figsize=(12, 8.8), constrained_layout=True)
    for ax, panel in zip(grid.flat, panels):
        mask = _neighborhood(panel.axes, panel.query)
        image = mask.astype(int)
        image[panel.query] = 2
        ax.imshow(image, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        if panel.shared:
            sharing = [
                (x, y)
                for x in range(size)
                for y in range(size)
                if (x, y) != panel.query and np.array_equal(_neighborhood(panel.axes, (x, y)), mask)
            ]
            xs, ys = zip(*sharing)
            ax.scatter(ys, xs, s=26, color=colors["shared"], edgecolors="#7a4a00", linewidths=0.6, zorder=3)
        ax.set_xticks(np.arange(-0.5, size, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, size, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(0, size, 4))
        ax.set_yticks(range(0, size, 4))
        ax.tick_params(labelsize=8, length=2)
        if panel.centered_outline:
            x, y = panel.query
            half = k // 2
            ax.add_patch(
                Rectangle((y - half - 0.5, x - half - 0.5), k, k, fill=False, linestyle=(0, (4, 3)),
                          linewidth=2.0, edgecolor=colors["outline"], clip_on=True, zorder=4)
            )
        count = int(mask.sum())
        ax.set_title(f"{panel.title}\nquery (row {panel.query[0]}, col {panel.query[1]}): {count} keys", fontsize=10.5)
    legend = [
        Patch(facecolor=colors["query"], label="query"),
        Patch(facecolor=colors["neighbor"], label="its neighbors (keys it attends to)"),
        Line2D([], [], marker="o", linestyle="none", markersize=7, markerfacecolor=colors["shared"],
               markeredgecolor="#7a4a00", label="other queries with the same window"),
        Patch(facecolor="none", edgecolor=colors["outline"], linestyle="--", linewidth=1.6,
              label="centered window, cut at the border (not NA)"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=4, frameon=False, fontsize=10, bbox_to_anchor=(0.5, -0.045))
    fig.suptitle(f"Neighborhood attention on a {size}×{size} grid, kernel {k}×{k}", fontsize=14, fontweight="bold")
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_path


# ------------------------------------------------------------------ entry points


def _comparisons(rows: Sequence[Row], baselines: dict[int, Row]) -> list[str]:
    """One line per token count: the first NA problem of that size against full attention."""
    lines = []
    for tokens, full in baselines.items():
        na = next((row for row in rows if row.tokens == tokens and row.forward_backward_s), None)
        if na is None or not full.forward_backward_s:
            continue
        ratio = full.forward_backward_s / na.forward_backward_s
        speed = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
        text = f"{na.problem} vs full attention over {tokens} tokens: fwd+bwd {speed}"
        if na.peak_bytes is not None and full.peak_bytes is not None:
            text += f", peak memory {na.peak_bytes / 2**20:.0f} vs {full.peak_bytes / 2**20:.0f} MiB"
        lines.append(text)
    return lines


def run(
    out: str | None = DEFAULT_OUT,
    arrays: str = "auto",
    repeat: int = 1,
    quick: bool = False,
    stream=None,
    backend: str = "auto",
) -> int:
    """Run the demo; print the table; write the picture to ``out`` (None: skip). 0 when all checks pass.
    ``backend``: the na_rtc backend every problem runs on (``auto``: automatic selection)."""
    if backend == "auto":  # whatever is chosen already (use_backend, NA_RTC_BACKEND) or automatic selection
        return _run(out, arrays, repeat, quick, stream or sys.stdout)
    with backends.use_backend(backend):
        return _run(out, arrays, repeat, quick, stream or sys.stdout)


def _run(out: str | None, arrays: str, repeat: int, quick: bool, stream) -> int:
    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    import na_rtc

    started = time.perf_counter()
    runner = make_runner(arrays)
    memory = PeakMemory(runner.device)
    problems = QUICK_PROBLEMS if quick else PROBLEMS
    timing = "one run after a warm-up" if repeat <= 1 else f"median of {repeat} runs after a warm-up"
    say(f"na_rtc {na_rtc.__version__} demo: float32 on {runner.device}, backend {backend_label(runner)}")
    say("check: out, dq, dk, dv against dense attention over all tokens masked by na_rtc.window.is_neighbor,")
    say(
        f"       float64; pass when |x - ref| <= atol + rtol*|ref| everywhere "
        f"(out {TOLERANCE_OUT[0]:g}, grads {TOLERANCE_GRAD[0]:g})"
    )
    say(f"times: {timing}; {memory.label}")
    say()
    say(_format_row([name for name, _, _ in COLUMNS]))
    say(_format_row(["-" * width for _, width, _ in COLUMNS]))
    rows: list[Row] = []
    baselines: dict[int, Row] = {}
    for index, problem in enumerate(problems):
        row = run_problem(runner, problem, repeat, memory)
        row.tokens = problem.tokens
        rows.append(row)
        say(_format_row(_cells(row)))
        last_of_size = index + 1 == len(problems) or problems[index + 1].tokens != problem.tokens
        if last_of_size and problem.tokens not in baselines:
            full = run_full_attention(runner, problem, repeat, memory)
            baselines[problem.tokens] = full
            say(_format_row(_cells(full)))
    say()
    checked_smaller = sorted({row.checked_at for row in rows if row.checked_at})
    if checked_smaller:
        say(f"* checked on {', '.join(checked_smaller)} with the same kernel, dilation and causality; "
            "timed at the size shown")
    for row in [*rows, *baselines.values()]:
        if row.note:
            say(f"{row.problem} {row.shape}: {row.note}")
    for line in _comparisons(rows, baselines):
        say(line)
    if any(row.backend.startswith("reference") for row in rows):
        say("(the reference backend is the executable spec, chunked gathers on the CPU: "
            "speed is the cuda kernels' job)")
    if any(row.backend.startswith("blocked") for row in rows):
        say("(the blocked backend: NA as block-sparse dense attention on the CPU's matrix products; "
            "the cuda kernels serve NVIDIA GPUs)")
    failed = [row for row in rows if row.passed is False]
    if failed:
        say(f"FAILED: {len(failed)} of {len(rows)} problems do not match the definition")
    else:
        say(f"all {len(rows)} problems match the definition")
    if out is not None:
        written = draw_neighborhoods(out, stream=stream)
        if written is not None:
            say(f"wrote {os.path.abspath(written)}")
    say(f"demo took {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


def run_from_args(args: argparse.Namespace) -> int:
    return run(
        out=None if args.no_png else args.out,
        arrays=args.arrays,
        repeat=args.repeat,
        quick=args.quick,
        backend=getattr(args, "backend", "auto"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m na_rtc demo`` with ``argv``."""
    parser = argparse.ArgumentParser(prog="python -m na_rtc demo", description=__doc__.splitlines()[0])
    for flags, options in ARGUMENTS:
        parser.add_argument(*flags, **options)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
