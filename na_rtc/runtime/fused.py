"""The fused (flash-style) forward kernel (``cuda_src/na_fused.cu``), for any executor.

:class:`FusedKernels` launches ``na_fused_fwd<T, HD, TX, TY>``: one block of
:data:`THREADS` threads per (batch, head, query tile inside one dilation
group per axis); the key/value box the tile's windows cover is streamed
through shared memory in chunks, softmax is online in fp32, and the kernel
writes the output (problem dtype) and the logsumexp (float32).

Covered: float32 / float16 / bfloat16, head dim <= 256, every kernel size,
stride, dilation and causal combination, with or without RPB. Shared memory
is fixed per instantiation (``2 * chunk_keys * HD`` elements, at most 32
KiB: no opt-in). The query tile comes from :data:`TILES`, keyed by (ndim,
head-dim bucket, dtype); a group of ``THREADS / (TX * TY)`` lanes owns one
query and holds ``HD / lanes`` output dims in registers.
"""

from __future__ import annotations

import math

from .. import _arrays
from .._args import Problem
from . import fused_tc, fused_wg
from . import plan as P
from . import tiling
from .tiling import CTYPES

SOURCE = "na_fused.cu"
THREADS = 256  # NA_FUSED_THREADS in na_fused.cu
SHARED_BUDGET = 48 * 1024
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (32, 64, 128, 256)  # head-dim buckets: runtime head_dim <= bucket

#: (ndim, head-dim bucket, dtype) -> query tile (TX, TY) in group coordinates (1D: TY = 1).
#: TX * TY queries per 256-thread block, 256 / (TX * TY) lanes per query, 8 dims per lane
#: (head dim 256: a whole warp per query, 8 queries per block).
TILES: dict[tuple[int, int, str], tuple[int, int]] = {
    (ndim, hd, dtype): tile
    for dtype in DTYPES
    for (ndim, hd), tile in {
        (1, 32): (64, 1), (1, 64): (32, 1), (1, 128): (16, 1), (1, 256): (8, 1),
        (2, 32): (8, 8), (2, 64): (8, 4), (2, 128): (4, 4), (2, 256): (4, 2),
    }.items()
}


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIMS)


def chunk_keys(hd: int) -> int:
    """Keys per staged chunk (na_fused_chunk in na_fused.cu)."""
    return 32 if hd <= 64 else 16


def shared_bytes(hd: int, dtype: str) -> int:
    """Dynamic shared memory of one block: a chunk of K rows and of V rows, HD elements each."""
    return 2 * chunk_keys(hd) * hd * tiling.ITEMSIZE[dtype]


def kernel_name_of(hd: int, dtype: str, tile: tuple[int, int]) -> str:
    return f"na_fused_fwd<{CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}>"


def fused_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(kernel_name_of(hd, dtype, tile) for (_, hd, dtype), tile in TILES.items()))


def fused_threads() -> dict:
    return {name: THREADS for name in fused_names()}


def fused_shared() -> dict:
    return {kernel_name_of(hd, dtype, tile): shared_bytes(hd, dtype) for (_, hd, dtype), tile in TILES.items()}


def _tile(problem: Problem):
    hd = head_dim_bucket(problem.head_dim)
    return hd, TILES.get((problem.ndim, hd, problem.dtype))



#: the forward's kernel paths, in the order the dispatcher tries them
WGMMA, MMA_SYNC, SIMT = "wgmma", "mma.sync", "simt"


def _no_verification(problem: Problem, candidate) -> bool:
    return True


class FusedKernels:
    """The fused forward kernels as an allocating call, for one executor.

    Paths, in order: the Hopper wgmma kernel (``fused_wg.py``) where
    ``wgmma(problem)`` allows it (sm_90 and ``NA_RTC_WGMMA=1``), the mma.sync
    tensor-core kernel (``fused_tc.py``) where ``tensor_cores(problem)`` does
    (sm_80+, ``NA_RTC_TENSOR_CORES``), then the SIMT kernel of this module;
    each where it covers the problem. Default: SIMT only. The first path that
    ``trusted(problem, candidate)`` accepts serves the call (first-use
    verification, :mod:`na_rtc.verify.gate`; default: every path).
    """

    def __init__(self, run, tensor_cores=None, wgmma=None, trusted=None):
        self.run = run
        self.tensor_cores = tensor_cores or (lambda problem: False)
        self.wgmma = wgmma or (lambda problem: False)
        self.trusted = trusted or _no_verification
        self._candidates = {}

    def paths(self, problem: Problem) -> list[str]:
        """The paths that cover ``problem`` and the policies allow, best first (verification aside)."""
        paths = []
        if fused_tc.covers(problem) and self.tensor_cores(problem):
            if fused_wg.covers(problem) and self.wgmma(problem):
                paths.append(WGMMA)
            paths.append(MMA_SYNC)
        if self._simt_covers(problem):
            paths.append(SIMT)
        return paths

    def _simt_covers(self, problem: Problem) -> bool:
        hd, tile = _tile(problem)
        if tile is None or problem.ndim not in (1, 2):
            return False
        if shared_bytes(hd, problem.dtype) > SHARED_BUDGET:
            return False
        return tiling.grid(problem, tile) <= P.MAX_GRID[0]

    def candidate(self, path: str):
        """``path`` as a :class:`~na_rtc.verify.gate.Candidate`: its kernel and how to run it."""
        if path not in self._candidates:
            from ..verify.gate import Candidate

            self._candidates[path] = Candidate(
                "forward", path, lambda problem: {self.kernel_name(problem, path): ("out", "lse")},
                lambda problem, query, key, value, rpb_acc: self.forward(problem, query, key, value, rpb_acc, path))
        return self._candidates[path]

    def path(self, problem: Problem) -> str | None:
        """The path that serves ``problem``: the first one trusted, or None."""
        for path in self.paths(problem):
            if self.trusted(problem, self.candidate(path)):
                return path
        return None

    def covers(self, problem: Problem) -> bool:
        return self.path(problem) is not None

    def kernel_name(self, problem: Problem, path: str | None = None) -> str:
        path = path or self.path(problem) or SIMT
        if path == WGMMA:
            return fused_wg.kernel_name(problem)
        if path == MMA_SYNC:
            return fused_tc.kernel_name(problem)
        hd, tile = _tile(problem)
        if tile is None:
            raise ValueError(
                f"no fused kernel for dtype {problem.dtype} with head_dim {problem.head_dim} "
                f"({problem.ndim}D): fused kernels take float32/float16/bfloat16 and head_dim <= {HEAD_DIMS[-1]}")
        return kernel_name_of(hd, problem.dtype, tile)

    def forward(self, problem: Problem, query, key, value, rpb_acc=None, path: str | None = None):
        """``(out, lse)``: out in the problem dtype, lse float32 ``[batch, *spatial, heads]``.

        ``rpb_acc``: the bias table in the accumulator dtype (float32), or None. ``path``: the kernel path
        (default: :meth:`path`'s choice).
        """
        from .naive import _bias, _problem_args, _rows, _tensor

        path = path or self.path(problem)
        if path is None:
            raise ValueError(f"the fused kernel does not cover this problem ({problem.ndim}D, {problem.dtype}, "
                             f"head_dim {problem.head_dim}); check covers() first")
        name = self.kernel_name(problem, path)
        if path == WGMMA:
            source, _, threads, blocks, smem = fused_wg.launch(problem)
        elif path == MMA_SYNC:
            source, threads, blocks = fused_tc.SOURCE, fused_tc.THREADS, fused_tc.grid(problem)
            smem = fused_tc.shared_bytes(fused_tc.head_dim_bucket(problem.head_dim), problem.dtype)
        else:
            hd, tile = _tile(problem)
            source, threads, blocks, smem = SOURCE, THREADS, tiling.grid(problem, tile), shared_bytes(hd, problem.dtype)
        out = _arrays.empty(query, problem.qkv_shape, problem.dtype)
        lse = _arrays.empty(query, problem.lse_shape, "float32")
        if blocks == 0 or math.prod(problem.qkv_shape) == 0:
            return out, lse
        args = (_tensor(query, problem) + _tensor(key, problem) + _tensor(value, problem) + _bias(rpb_acc, problem)
                + _tensor(out, problem) + _rows(lse, problem) + [P.f64(problem.scale)] + _problem_args(problem))
        self.run(P.LaunchPlan(P.Kernel(source, name), (blocks, 1, 1), (threads, 1, 1), smem, tuple(args)))
        return out, lse
