"""Fused (flash-style) backward kernels (``cuda_src/na_fused_bwd.cu``).

:class:`FusedBackwardKernels` computes ``(dq, dk, dv, drpb)`` of the fused op
from the forward's ``output`` and ``logsumexp`` without materializing the
attention matrix:

1. ``na_fused_delta<T>``: ``delta = rowsum(dOut * out)`` (float32 workspace,
   one thread per row);
2. ``na_fused_bwd_dq<T, HD, TX, TY, KC>``: one block per (batch, head, query
   tile in one dilation group), the union of the tile's windows streamed KC
   keys at a time; with a bias, per-tile partial sums of the logit gradient
   per relative offset (float32 workspace ``[heads, tiles, entries]``);
3. ``na_fused_bwd_dkdv<T, HD, TX, TY, QC>``: one block per (batch, head, key
   tile), the box of queries that can see the tile streamed QC at a time;
4. ``na_fused_rpb_reduce`` (bias only): a fixed-order sum of the partials.

Every sum has a fixed order and there are no atomics: run-to-run bitwise
deterministic. :meth:`FusedBackwardKernels.covers` says whether a problem is
handled (fp32/fp16/bf16, head dim <= 256, every stride / dilation / causal
combination, shared memory within :data:`SHARED_BUDGET`, grid within CUDA's
limit); callers fall back otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .. import _arrays
from .._args import Problem
from . import fused_tc, fused_wg
from . import plan as P
from . import tiling
from .tiling import CTYPES

# families.py builds its "fused_bwd" entry from this module's tables; this
# module imports naive (which imports families) only inside functions.

SOURCE = "na_fused_bwd.cu"
THREADS = 256  # NA_FB_THREADS in na_fused_bwd.cu
SHARED_BUDGET = 46 * 1024  # dynamic shared memory; static + dynamic stays under 48 KiB (no opt-in)
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIM_BUCKETS = (32, 64, 128, 256)

#: (ndim, head-dim bucket, dtype) -> {"dq": (TX, TY, KC), "dkdv": (TX, TY, QC)}.
#: dq: TX x TY queries per block (256 / (TX TY) threads per query hold HD / that
#: dims of dq in registers), KC keys per streamed chunk. dkdv: TX x TY keys per
#: block (threads per key hold dk and dv dims), QC queries per chunk.
#: Shared memory at D = HD, see :func:`dq_shared_bytes` / :func:`dkdv_shared_bytes`:
#: dq   2 TQ RS s + 2 KC RS s + 4 TQ (KC + 1) (+ 4 bias entries)
#: dkdv 2 TK RS s + 2 QC RS s + 8 TK (QC + 1) + 24 QC
#: (RS = :func:`row_stride`: D padded to an odd number of 4-byte words)
_QTILE = {64: {1: (64, 1), 2: (8, 8)}, 32: {1: (32, 1), 2: (8, 4)}, 16: {1: (16, 1), 2: (4, 4)},
          8: {1: (8, 1), 2: (4, 2)}}
_CONFIG = {  # (hd, itemsize) -> ((query tile size, KC), (key tile size, QC)); bytes at D = HD, no bias
    (32, 4): ((64, 32), (16, 64)),   # dq 33.0 KiB, dkdv 30.2 KiB
    (64, 4): ((32, 32), (32, 32)),   # dq 36.6 KiB, dkdv 41.5 KiB
    (128, 4): ((16, 16), (16, 16)),  # dq 33.3 KiB, dkdv 34.8 KiB
    (32, 2): ((64, 64), (64, 32)),   # dq 33.3 KiB, dkdv 30.0 KiB
    (64, 2): ((64, 32), (32, 64)),   # dq 33.0 KiB, dkdv 42.5 KiB
    (128, 2): ((32, 32), (16, 32)),  # dq 36.6 KiB, dkdv 29.3 KiB
    (256, 4): ((8, 8), (8, 8)),      # dq 32.4 KiB, dkdv 32.8 KiB (a warp per query / key)
    (256, 2): ((8, 16), (8, 16)),    # dq 24.7 KiB, dkdv 25.6 KiB
}
TABLE: dict[tuple[int, int, str], dict[str, tuple[int, int, int]]] = {}
for _dtype in DTYPES:
    for _ndim in (1, 2):
        for _hd in HEAD_DIM_BUCKETS:
            (_tq, _kc), (_tk, _qc) = _CONFIG[(_hd, tiling.ITEMSIZE[_dtype])]
            TABLE[(_ndim, _hd, _dtype)] = {"dq": (*_QTILE[_tq][_ndim], _kc), "dkdv": (*_QTILE[_tk][_ndim], _qc)}

DELTA_PREFIX = "na_fused_delta"
RPB_REDUCE = "na_fused_rpb_reduce"


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIM_BUCKETS)


def delta_name(dtype: str) -> str:
    return f"na_fused_delta<{CTYPES[dtype]}>"


def dq_name(dtype: str, hd: int, cfg) -> str:
    return f"na_fused_bwd_dq<{CTYPES[dtype]}, {hd}, {cfg[0]}, {cfg[1]}, {cfg[2]}>"


def dkdv_name(dtype: str, hd: int, cfg) -> str:
    return f"na_fused_bwd_dkdv<{CTYPES[dtype]}, {hd}, {cfg[0]}, {cfg[1]}, {cfg[2]}>"


def _axes(problem: Problem):
    """``(length, kernel, dilation)`` for x and y (1D: a trivial y axis)."""
    axes = [(a.length, a.kernel_size, a.dilation) for a in problem.axes]
    if len(axes) == 1:
        axes.append((1, 1, 1))
    return axes


def _entries(problem: Problem) -> int:
    return math.prod(problem.rpb_shape[1:])


def row_stride(head_dim: int, itemsize: int) -> int:
    """Elements per staged row (na_fb_row): an odd number of 4-byte words."""
    if itemsize >= 4:
        return head_dim | 1
    return ((-(-head_dim * itemsize // 4)) | 1) * 4 // itemsize


def dq_shared_bytes(problem: Problem, cfg, with_rpb: bool) -> int:
    tq, kc, s = cfg[0] * cfg[1], cfg[2], tiling.ITEMSIZE[problem.dtype]
    rs = row_stride(problem.head_dim, s)
    return 2 * tiling.align16(tq * rs * s) + 2 * tiling.align16(kc * rs * s) + 4 * tq * (kc + 1) + (
        4 * _entries(problem) if with_rpb else 0)


def dkdv_shared_bytes(problem: Problem, cfg) -> int:
    tk, qc, s = cfg[0] * cfg[1], cfg[2], tiling.ITEMSIZE[problem.dtype]
    rs = row_stride(problem.head_dim, s)
    return 2 * tiling.align16(tk * rs * s) + 2 * tiling.align16(qc * rs * s) + 8 * tk * (qc + 1) + 24 * qc


def _plan(problem: Problem):
    """``(hd, dq cfg, dkdv cfg, dq shared, dkdv shared)`` or None when not covered."""
    if problem.dtype not in DTYPES:
        return None
    hd = head_dim_bucket(problem.head_dim)
    if hd is None:
        return None
    cfg = TABLE[(problem.ndim, hd, problem.dtype)]
    dq_shared = dq_shared_bytes(problem, cfg["dq"], problem.has_rpb)
    dkdv_shared = dkdv_shared_bytes(problem, cfg["dkdv"])
    if max(dq_shared, dkdv_shared) > SHARED_BUDGET:
        return None
    bh = problem.batch * problem.heads
    if max(bh * tiling.tiles(problem, cfg["dq"]), bh * tiling.tiles(problem, cfg["dkdv"]),
           -(-math.prod(problem.lse_shape) // THREADS)) > P.MAX_GRID[0]:
        return None
    return hd, cfg["dq"], cfg["dkdv"], dq_shared, dkdv_shared


@dataclass(frozen=True)
class _Launches:
    """The dq and dkdv kernels of one backward: names, sources, grids, block threads, shared memory, and the
    query-tile count."""

    dq: str
    dkdv: str
    dq_source: str
    dkdv_source: str
    dq_blocks: int
    dkdv_blocks: int
    dq_threads: int
    dkdv_threads: int
    dq_shared: int
    dkdv_shared: int
    tiles: int  # query tiles per head (the bias partials' middle dimension)


def _simt_launches(problem: Problem) -> _Launches | None:
    plan = _plan(problem)
    if plan is None:
        return None
    hd, dq_cfg, dkdv_cfg, dq_shared, dkdv_shared = plan
    bh = problem.batch * problem.heads
    return _Launches(dq_name(problem.dtype, hd, dq_cfg), dkdv_name(problem.dtype, hd, dkdv_cfg), SOURCE, SOURCE,
                     bh * tiling.tiles(problem, dq_cfg), bh * tiling.tiles(problem, dkdv_cfg), THREADS, THREADS,
                     dq_shared, dkdv_shared, problem.batch * tiling.tiles(problem, dq_cfg))


def _tensor_core_launches(problem: Problem, dq_wgmma: bool = False, dkdv_wgmma: bool = False) -> _Launches:
    """The mma.sync dq and dkdv kernels; the Hopper ones instead where asked (same grids and partials)."""
    hd = fused_tc.head_dim_bucket(problem.head_dim)
    entries = _entries(problem) if problem.has_rpb else 0
    blocks = fused_tc.bwd_grid(problem)
    dtype, ndim = problem.dtype, problem.ndim
    if dq_wgmma:
        dq, dq_source, dq_shared = (fused_wg.dq_name_of(hd, dtype, ndim), fused_wg.BWD_SOURCE,
                                    fused_wg.dq_shared_bytes(hd, dtype, ndim, entries))
        dq_blocks, dq_threads = fused_wg.grid(problem), fused_wg.block_threads(ndim)
    else:
        dq, dq_source, dq_shared = (fused_tc.dq_name_of(hd, dtype, ndim), fused_tc.BWD_SOURCE,
                                    fused_tc.dq_shared_bytes(hd, dtype, entries))
        dq_blocks, dq_threads = blocks, fused_tc.THREADS
    if dkdv_wgmma:
        dkdv, dkdv_source, dkdv_shared = (fused_wg.dkdv_name_of(hd, dtype, ndim), fused_wg.BWD_SOURCE,
                                          fused_wg.dkdv_shared_bytes(hd, dtype, ndim))
        dkdv_blocks, dkdv_threads = fused_wg.grid(problem), fused_wg.block_threads(ndim)
    else:
        dkdv, dkdv_source, dkdv_shared = (fused_tc.dkdv_name_of(hd, dtype, ndim), fused_tc.BWD_SOURCE,
                                          fused_tc.dkdv_shared_bytes(hd, dtype, ndim))
        dkdv_blocks, dkdv_threads = blocks, fused_tc.THREADS
    return _Launches(dq, dkdv, dq_source, dkdv_source, dq_blocks, dkdv_blocks, dq_threads, dkdv_threads, dq_shared,
                     dkdv_shared, dq_blocks // max(problem.heads, 1))


#: the kernel paths of dq and of dK/dV (each chosen on its own among the tensor-core ones)
WGMMA, MMA_SYNC, SIMT = "wgmma", "mma.sync", "simt"


def describe_paths(paths: tuple[str, str]) -> str:
    """``("wgmma", "mma.sync")`` -> "wgmma dq + mma.sync dK/dV"; one name where both are the same."""
    return paths[0] if paths[0] == paths[1] else f"{paths[0]} dq + {paths[1]} dK/dV"


def _no_verification(problem: Problem, candidate) -> bool:
    return True


class FusedBackwardKernels:
    """The fused backward on one executor (``cuda`` or ``emulator``).

    ``tensor_cores(problem) -> bool``: may the tensor-core dq/dkdv kernels
    (``fused_tc.py``) serve ``problem``; they do where they cover it, the SIMT
    kernels of this module otherwise. Default: SIMT only. ``wgmma(problem) ->
    bool``: may the Hopper dq and dK/dV kernels (``fused_wg.py``) replace the
    mma.sync ones where they cover the problem (sm_90, ``NA_RTC_WGMMA=1``).
    Default: never. The dq and dK/dV kernels are picked as a pair of paths
    (:meth:`paths`, best first); the first pair that ``trusted(problem,
    candidate)`` accepts serves the call (first-use verification,
    :mod:`na_rtc.verify.gate`; default: every pair).
    """

    def __init__(self, run: Callable[[P.LaunchPlan], None], tensor_cores=None, wgmma=None, trusted=None):
        self.run = run
        self.tensor_cores = tensor_cores or (lambda problem: False)
        self.wgmma = wgmma or (lambda problem: False)
        self.trusted = trusted or _no_verification
        self._candidates = {}

    def paths(self, problem: Problem) -> list[tuple[str, str]]:
        """The (dq, dK/dV) paths that cover ``problem`` and the policies allow, best first."""
        pairs = []
        if problem.dtype in fused_tc.DTYPES and fused_tc.bwd_covers(problem) and self.tensor_cores(problem):
            wgmma = bool(self.wgmma(problem))
            dq_paths = ([WGMMA] if wgmma and fused_wg.dq_covers(problem) else []) + [MMA_SYNC]
            dkdv_paths = ([WGMMA] if wgmma and fused_wg.dkdv_covers(problem) else []) + [MMA_SYNC]
            pairs += [(dq, dkdv) for dq in dq_paths for dkdv in dkdv_paths]
        if _simt_launches(problem) is not None:
            pairs.append((SIMT, SIMT))
        return pairs

    def candidate(self, paths: tuple[str, str]):
        """A pair of paths as a :class:`~na_rtc.verify.gate.Candidate`: which output each kernel computes."""
        if paths not in self._candidates:
            from ..verify.gate import Candidate

            def kernels(problem):
                launches = self._launches(problem, paths)
                return {} if launches is None else {launches.dq: ("dq", "drpb"), launches.dkdv: ("dk", "dv")}

            def run(problem, grad_out, query, key, value, rpb_acc, output, lse):
                return self.backward(problem, grad_out, query, key, value, rpb_acc, output, lse, paths)

            self._candidates[paths] = Candidate("backward", describe_paths(paths), kernels, run)
        return self._candidates[paths]

    def path(self, problem: Problem) -> tuple[str, str] | None:
        """The (dq, dK/dV) paths that serve ``problem``: the first pair trusted, or None."""
        for paths in self.paths(problem):
            if self.trusted(problem, self.candidate(paths)):
                return paths
        return None

    def _launches(self, problem: Problem, paths: tuple[str, str] | None = None) -> _Launches | None:
        paths = paths or self.path(problem)
        if paths is None:
            return None
        if paths == (SIMT, SIMT):
            return _simt_launches(problem)
        return _tensor_core_launches(problem, paths[0] == WGMMA, paths[1] == WGMMA)

    def covers(self, problem: Problem) -> bool:
        return self.path(problem) is not None

    def kernel_names(self, problem: Problem) -> tuple[str, ...]:
        """The kernels :meth:`backward` launches for ``problem`` (empty when not covered)."""
        launches = self._launches(problem)
        if launches is None:
            return ()
        names = [delta_name(problem.dtype), launches.dq, launches.dkdv]
        if problem.has_rpb:
            names.append(RPB_REDUCE)
        return tuple(names)

    def backward(self, problem: Problem, grad_out, query, key, value, rpb_acc, output, lse,
                 paths: tuple[str, str] | None = None):
        """``(dq, dk, dv, drpb)``: dq/dk/dv in the problem dtype, drpb float32
        ``[heads, *(2k-1)]`` (None without ``rpb_acc``). ``output`` and ``lse``
        are the forward's (``lse`` float32 ``[b, *spatial, heads]``). ``paths``: the (dq, dK/dV) kernel
        paths (default: :meth:`path`'s choice)."""
        from .naive import _bias, _problem_args, _rows, _tensor

        launches = self._launches(problem, paths)
        if launches is None:
            raise ValueError("the fused backward kernels do not cover this problem; check covers() first")
        if output is None or lse is None:
            raise ValueError("the fused backward needs the forward's output and logsumexp")
        dtype = problem.dtype
        if math.prod(problem.qkv_shape) == 0:  # batch or heads 0: nothing to launch; a bias gets a zero gradient
            grads = tuple(_arrays.empty(query, problem.qkv_shape, dtype) for _ in range(3))
            return (*grads, None if rpb_acc is None else _arrays.zeros(query, problem.rpb_shape, "float32"))
        lse = _arrays.cast(lse, "float32")
        if rpb_acc is not None:
            rpb_acc = _arrays.cast(rpb_acc, "float32")
        problem_args = _problem_args(problem)

        delta = _arrays.empty(query, problem.lse_shape, "float32")
        rows = math.prod(problem.lse_shape)
        args = _tensor(grad_out, problem) + _tensor(output, problem) + _rows(delta, problem) + problem_args
        self.run(P.LaunchPlan(P.Kernel(SOURCE, delta_name(dtype)), (-(-rows // THREADS), 1, 1), (THREADS, 1, 1), 0,
                              tuple(args)))

        inputs = _tensor(query, problem) + _tensor(key, problem) + _tensor(value, problem) + _tensor(grad_out, problem)
        inputs += _rows(lse, problem) + _rows(delta, problem) + _bias(rpb_acc, problem)

        dq = _arrays.empty(query, problem.qkv_shape, dtype)
        tiles, entries = launches.tiles, _entries(problem)
        partial = drpb = None
        if rpb_acc is not None:
            partial = _arrays.empty(query, (problem.heads * tiles * entries,), "float32")
            drpb = _arrays.empty(query, problem.rpb_shape, "float32")
        args = inputs + _tensor(dq, problem) + [P.Arg("ptr", partial), P.f64(problem.scale)] + problem_args
        self.run(P.LaunchPlan(P.Kernel(launches.dq_source, launches.dq), (launches.dq_blocks, 1, 1),
                              (launches.dq_threads, 1, 1), launches.dq_shared, tuple(args)))

        dk = _arrays.empty(query, problem.qkv_shape, dtype)
        dv = _arrays.empty(query, problem.qkv_shape, dtype)
        args = inputs + _tensor(dk, problem) + _tensor(dv, problem) + [P.f64(problem.scale)] + problem_args
        self.run(P.LaunchPlan(P.Kernel(launches.dkdv_source, launches.dkdv), (launches.dkdv_blocks, 1, 1),
                              (launches.dkdv_threads, 1, 1), launches.dkdv_shared, tuple(args)))

        if drpb is not None:
            (_, kx, _), (_, ky, _) = _axes(problem)
            args = [P.ptr(partial), P.i64(tiles), *_bias(drpb, problem), P.i64(problem.heads), P.i64(kx), P.i64(ky)]
            blocks = problem.heads * -(-entries // 32)  # 32 entries of one head per block
            self.run(P.LaunchPlan(P.Kernel(SOURCE, RPB_REDUCE), (blocks, 1, 1), (THREADS, 1, 1), 0, tuple(args)))
        return dq, dk, dv, drpb


# ---------------------------------------------------------------- the family (families.py imports these)


def fused_bwd_names() -> tuple[str, ...]:
    """Every instantiation the tables can pick."""
    names = [delta_name(dtype) for dtype in DTYPES]
    for (_, hd, dtype), cfg in TABLE.items():
        names += [dq_name(dtype, hd, cfg["dq"]), dkdv_name(dtype, hd, cfg["dkdv"])]
    names.append(RPB_REDUCE)
    return tuple(dict.fromkeys(names))


def fused_bwd_threads() -> dict:
    return {n: THREADS for n in fused_bwd_names()}


def fused_bwd_shared() -> dict:
    """The largest dynamic shared memory any launch of each kernel uses: the budget (larger ones are not covered)."""
    return {n: (SHARED_BUDGET if n.startswith(("na_fused_bwd_dq", "na_fused_bwd_dkdv")) else 0)
            for n in fused_bwd_names()}
