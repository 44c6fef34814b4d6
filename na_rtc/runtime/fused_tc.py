"""The tensor-core fused forward (``cuda_src/na_fused_tc.cu``): fp16 / bf16 on sm_80+.

``na_fused_tc_fwd<T, HD, TX, TY, KC, MT>``: one block of :data:`THREADS`
threads (4 warps) per (batch, head, query tile of 64 MT group coordinates
inside one dilation group per axis), 16 MT queries per warp as the rows of its
MT ``mma.m16n8k16`` tiles; the key box streamed KC keys at a time,
double-buffered (cp.async loads chunk c + 1 during the math on chunk c). KC and
MT per head dim come from :data:`FORWARD`. Same arguments and results as the
SIMT kernel (``fused.py``), which serves everything this one does not (fp32,
head dim > 128, GPUs below sm_80). The backward kernels are below.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .. import config as _config
from .._args import Problem
from . import plan as P
from . import tiling
from .tiling import CTYPES

SOURCE = "na_fused_tc.cu"
THREADS = 128  # NA_TC_THREADS in na_fused_tc.cu
#: the oldest architecture these kernels run on (mma.sync m16n8k16 in bf16, cp.async): the families'
#: min_arch, so that check and precompile build them for sm_80 and newer only
MIN_ARCH = 80
SHARED_BUDGET = 48 * 1024
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (32, 64, 128)  # head-dim buckets (multiples of 32: k-steps of the mma are taken in pairs)
#: (ndim, mma tiles per warp MT) -> query tile (TX, TY) of 64 MT queries: 16 MT per warp (2D: 2 MT rows
#: of 8 per warp)
TILES = {(1, 1): (64, 1), (2, 1): (8, 8), (1, 2): (128, 1), (2, 2): (16, 8)}


class ForwardConfig(NamedTuple):
    """One instantiation of the forward: keys per staged chunk and mma tiles (16 query rows each) per warp."""

    chunk_keys: int
    mma_tiles: int


#: head-dim bucket -> the forward the dispatcher picks. Two mma tiles per warp share every K/V fragment
#: (half the ldmatrix per mma) where registers allow: the logits of a warp are 16 x MT x KC floats.
FORWARD = {32: ForwardConfig(64, 2), 64: ForwardConfig(32, 2), 128: ForwardConfig(32, 1)}
#: head-dim bucket -> the other instantiations built, chosen with NA_RTC_TC_WARP_ROWS (measured against
#: the table's choice by ``python -m na_rtc bench``'s fused_tc_rows16 entry)
FORWARD_ALTERNATIVES = {32: (ForwardConfig(64, 1),), 64: (ForwardConfig(64, 1),), 128: ()}


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIMS)


def configs_of(hd: int) -> tuple[ForwardConfig, ...]:
    return (FORWARD[hd], *FORWARD_ALTERNATIVES[hd])


def config(hd: int) -> ForwardConfig:
    """The table's configuration, or the one NA_RTC_TC_WARP_ROWS asks for where it is built."""
    rows = _config.tc_warp_rows()
    if rows is not None:
        for candidate in configs_of(hd):
            if 16 * candidate.mma_tiles == rows:
                return candidate
    return FORWARD[hd]


def shared_bytes_of(hd: int, dtype: str, cfg: ForwardConfig) -> int:
    """Two pipeline stages of a K and a V chunk, rows of ``hd + 8`` elements (the Q tile borrows them)."""
    return 4 * cfg.chunk_keys * (hd + 8) * tiling.ITEMSIZE[dtype]


def shared_bytes(hd: int, dtype: str) -> int:
    return shared_bytes_of(hd, dtype, config(hd))


def kernel_name_of(hd: int, dtype: str, ndim: int, cfg: ForwardConfig | None = None) -> str:
    cfg = cfg or FORWARD[hd]
    tx, ty = TILES[ndim, cfg.mma_tiles]
    return f"na_fused_tc_fwd<{CTYPES[dtype]}, {hd}, {tx}, {ty}, {cfg.chunk_keys}, {cfg.mma_tiles}>"


def _instantiations():
    return [(hd, dtype, ndim, cfg) for dtype in DTYPES for hd in HEAD_DIMS for cfg in configs_of(hd)
            for ndim in (1, 2)]


def names() -> tuple[str, ...]:
    return tuple(kernel_name_of(hd, dtype, ndim, cfg) for hd, dtype, ndim, cfg in _instantiations())


def grid(problem: Problem) -> int:
    """Blocks of the forward for ``problem``."""
    return tiling.grid(problem, TILES[problem.ndim, config(head_dim_bucket(problem.head_dim)).mma_tiles])


def covers(problem: Problem) -> bool:
    """fp16/bf16, 1D/2D, head dim <= 128, within shared memory and the grid limit of forward and backward."""
    if problem.dtype not in DTYPES or problem.ndim not in (1, 2):
        return False
    hd = head_dim_bucket(problem.head_dim)
    return (hd is not None and shared_bytes(hd, problem.dtype) <= SHARED_BUDGET
            and max(grid(problem), bwd_grid(problem)) <= P.MAX_GRID[0])


def kernel_name(problem: Problem) -> str:
    hd = head_dim_bucket(problem.head_dim)
    return kernel_name_of(hd, problem.dtype, problem.ndim, config(hd))


def family_threads() -> dict:
    return {name: THREADS for name in names()}


def family_shared() -> dict:
    return {kernel_name_of(hd, dtype, ndim, cfg): shared_bytes_of(hd, dtype, cfg)
            for hd, dtype, ndim, cfg in _instantiations()}


# ---------------------------------------------------------------- backward (cuda_src/na_fused_tc_bwd.cu)

BWD_SOURCE = "na_fused_tc_bwd.cu"
BWD_SHARED_BUDGET = 46 * 1024  # dynamic; the dkdv kernel's static window ranges stay under 48 KiB in all
#: head-dim bucket -> keys per chunk of the dq kernel (two stages of K and V chunks live in the 128 rows
#: of the Q and dOut tiles: 4 * keys <= 128)
DQ_CHUNK = {32: 32, 64: 32, 128: 16}
#: (ndim, head-dim bucket) -> queries per chunk of the dkdv kernel, streamed through two stages (chunk c + 1
#: loads during chunk c; at HD 128 52 KiB: the launch opts in)
DKDV_CHUNK = {(1, 32): 64, (2, 32): 64, (1, 64): 32, (2, 64): 32, (1, 128): 16, (2, 128): 16}
#: the dkdv kernel's dynamic shared memory limit (its size does not depend on the problem); sm_86 / sm_89
#: allow 99 KiB after the opt-in
DKDV_SHARED_BUDGET = 96 * 1024


def bwd_grid(problem: Problem) -> int:
    """Blocks of each backward kernel: 64 queries (dq) or keys (dkdv) per block."""
    return tiling.grid(problem, TILES[problem.ndim, 1])


def dq_name_of(hd: int, dtype: str, ndim: int) -> str:
    tx, ty = TILES[ndim, 1]
    return f"na_fused_tc_bwd_dq<{CTYPES[dtype]}, {hd}, {tx}, {ty}, {DQ_CHUNK[hd]}>"


def dkdv_name_of(hd: int, dtype: str, ndim: int) -> str:
    tx, ty = TILES[ndim, 1]
    return f"na_fused_tc_bwd_dkdv<{CTYPES[dtype]}, {hd}, {tx}, {ty}, {DKDV_CHUNK[ndim, hd]}>"


def dq_shared_bytes(hd: int, dtype: str, bias_entries: int = 0) -> int:
    """Q and dOut tiles (64 rows each, then the K/V chunks' two stages), ds floats, one float per bias entry."""
    return tiling.align16(2 * 64 * (hd + 8) * tiling.ITEMSIZE[dtype]) + 4 * 64 * (DQ_CHUNK[hd] + 1) + 4 * bias_entries


def dkdv_shared_bytes(hd: int, dtype: str, ndim: int) -> int:
    """K and V tiles (64 rows), per stage (two) the Q and dOut chunks and lse, delta and 4 window bounds per
    query."""
    qc, stages = DKDV_CHUNK[ndim, hd], 2
    return (tiling.align16((2 * 64 + 2 * stages * qc) * (hd + 8) * tiling.ITEMSIZE[dtype])
            + stages * (4 * qc * 2 + 16 * qc))


def bwd_covers(problem: Problem) -> bool:
    """What the forward covers, with the bias partials within shared memory."""
    if not covers(problem):
        return False
    hd = head_dim_bucket(problem.head_dim)
    entries = math.prod(problem.rpb_shape[1:]) if problem.has_rpb else 0
    return (dq_shared_bytes(hd, problem.dtype, entries) <= BWD_SHARED_BUDGET
            and dkdv_shared_bytes(hd, problem.dtype, problem.ndim) <= DKDV_SHARED_BUDGET)


def bwd_names() -> tuple[str, ...]:
    return tuple(name for dtype in DTYPES for hd in HEAD_DIMS for ndim in (1, 2)
                 for name in (dq_name_of(hd, dtype, ndim), dkdv_name_of(hd, dtype, ndim)))


def bwd_family_threads() -> dict:
    return {name: THREADS for name in bwd_names()}


def bwd_family_shared() -> dict:
    """The largest launch of each: dkdv's fixed size, dq's budget (larger bias tables are not covered)."""
    shared = {}
    for dtype in DTYPES:
        for hd in HEAD_DIMS:
            for ndim in (1, 2):
                shared[dq_name_of(hd, dtype, ndim)] = BWD_SHARED_BUDGET
                shared[dkdv_name_of(hd, dtype, ndim)] = dkdv_shared_bytes(hd, dtype, ndim)
    return shared
