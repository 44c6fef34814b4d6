"""The tensor-core fused forward (``cuda_src/na_fused_tc.cu``): fp16 / bf16 on sm_80+.

``na_fused_tc_fwd<T, HD, TX, TY, KC, MT>``: one block of :data:`THREADS`
threads (4 warps) per (batch, head, query tile of 64 MT group coordinates
inside one dilation group per axis), 16 MT queries per warp as the rows of its
MT ``mma.m16n8k16`` tiles; the key box streamed KC keys at a time,
double-buffered (cp.async loads chunk c + 1 during the math on chunk c), then
the extra key/value tokens, if any, as one more key range of the same stream
(the forward's ``extra_tokens``). KC and
MT per head dim come from :data:`FORWARD` (3D: :data:`FORWARD_3D`, tiles of 4 x 4 x 4 queries, in the 3D
twin family ``fused_tc_3d``). Same arguments and results as the
SIMT kernel (``fused.py``), which serves everything this one does not (fp32,
head dim > 128, GPUs below sm_80). Its gradients come from the mma.sync
backward kernels (``fused_tc_bwd.py``), which share its tables.
"""

from __future__ import annotations

from typing import NamedTuple

from ..._args import Problem
from .. import launch as L
from .. import plan as P
from .. import tiling
from ..registry import Family, Launch, Role, register, source_of
from ..tiling import CTYPES

NAME = "fused_tc"
SOURCE = "na_fused_tc.cu"
THREADS = 128  # NA_TC_THREADS in na_fused_tc.cu
#: the oldest architecture these kernels run on (mma.sync m16n8k16 in bf16, cp.async): the families'
#: min_arch, so that check and precompile build them for sm_80 and newer only
MIN_ARCH = 80
SHARED_BUDGET = 48 * 1024
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (32, 64, 128)  # head-dim buckets (multiples of 32: k-steps of the mma are taken in pairs)
#: (ndim, mma tiles per warp MT) -> query tile (TX, TY) of 64 MT queries: 16 MT per warp (2D: 2 MT rows
#: of 8 per warp); 3D: (TX, TY, TZ), a warp's 16 queries one x-plane of 4 x 4 (z fastest). The 3D tile is the
#: one whose warps multiply the largest share of products inside a window on the 3D benchmark shapes
#: (tests/test_tensor_core_work.py models it): 55% on 16 x 32 x 32 with k (3, 7, 7) and 56% with k (5, 7, 7)
#: causal in time (2 x 8 x 4: 52%, 2 x 4 x 8: 47%, 1 x 8 x 8: 46%, 8 x 4 x 4 with two mma tiles a warp: 45%),
#: 87% on 30 x 48 x 80 with a (18, 24, 24) window (86%, 81%, 81%, 85%), 99% on 8 x 16 x 16 with k 7 and
#: dilation (1, 2, 2) (tied with 8 x 4 x 4), 100% for every tile at stride (16, 8, 8)
TILES = {(1, 1): (64, 1), (2, 1): (8, 8), (1, 2): (128, 1), (2, 2): (16, 8), (3, 1): (4, 4, 4)}


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
#: the longest last axis of a 3D problem: a query row's window along it is one 32-bit word in the kernels (two
#: 16-bit box coordinates, na_tc_common.cuh)
MAX_Z = 2**16 - 1
#: head-dim bucket -> the 3D forward (one mma tile a warp; the only 3D instantiation per bucket and dtype)
FORWARD_3D = {32: ForwardConfig(64, 1), 64: ForwardConfig(32, 1), 128: ForwardConfig(32, 1)}


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIMS)


def configs_of(hd: int, ndim: int = 2) -> tuple[ForwardConfig, ...]:
    return (FORWARD_3D[hd],) if ndim == 3 else (FORWARD[hd], *FORWARD_ALTERNATIVES[hd])


def config(hd: int, policy=None, ndim: int = 2) -> ForwardConfig:
    """The table's configuration, or the one the policy's warp rows (NA_RTC_TC_WARP_ROWS) ask for where it is
    built."""
    rows = policy.settings.tc_warp_rows if policy is not None else None
    if rows is not None:
        for candidate in configs_of(hd, ndim):
            if 16 * candidate.mma_tiles == rows:
                return candidate
    return configs_of(hd, ndim)[0]


def shared_bytes_of(hd: int, dtype: str, cfg: ForwardConfig) -> int:
    """Two pipeline stages of a K and a V chunk, rows of ``hd + 8`` elements (the Q tile borrows them)."""
    return 4 * cfg.chunk_keys * (hd + 8) * tiling.ITEMSIZE[dtype]


def shared_bytes(hd: int, dtype: str, policy=None, ndim: int = 2) -> int:
    return shared_bytes_of(hd, dtype, config(hd, policy, ndim))


def rank_arguments(ndim: int, tile: tuple[int, ...]) -> str:
    """The trailing template arguments of a 3D instantiation (RANK 3 and the tile's z extent); lower ranks keep
    the kernels' defaults, so that their names stay those of the 1D/2D kernels."""
    return f", 3, {tile[2]}" if ndim == 3 else ""


def kernel_name_of(hd: int, dtype: str, ndim: int, cfg: ForwardConfig | None = None) -> str:
    cfg = cfg or configs_of(hd, ndim)[0]
    tile = TILES[ndim, cfg.mma_tiles]
    return (f"na_fused_tc_fwd<{CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}, {cfg.chunk_keys}, {cfg.mma_tiles}"
            f"{rank_arguments(ndim, tile)}>")


def _instantiations(ranks=(1, 2)):
    # the configurations of 1D and 2D are the same (configs_of reads ndim 3 only)
    return [(hd, dtype, ndim, cfg) for dtype in DTYPES for hd in HEAD_DIMS for cfg in configs_of(hd, ranks[-1])
            for ndim in ranks]


def names(ranks=(1, 2)) -> tuple[str, ...]:
    return tuple(kernel_name_of(hd, dtype, ndim, cfg) for hd, dtype, ndim, cfg in _instantiations(ranks))


def grid(problem: Problem, policy=None) -> int:
    """Blocks of the forward for ``problem``."""
    cfg = config(head_dim_bucket(problem.max_head_dim), policy, problem.ndim)
    return tiling.grid(problem, TILES[problem.ndim, cfg.mma_tiles])


def backward_grid(problem: Problem, kv: bool = False) -> int:
    """Blocks of each mma.sync backward kernel (``fused_tc_bwd.py``): 64 queries (dq) or keys (dkdv, ``kv``: per
    key/value head) per block."""
    return (tiling.kv_grid if kv else tiling.grid)(problem, TILES[problem.ndim, 1])


def covers(problem: Problem, policy=None) -> tuple[bool, str]:
    """fp16/bf16, head dim <= 128, within shared memory and the grid limit of forward and backward (the
    backward kernels serve this forward's gradients); each rank's family serves its own ranks (1D/2D here, 3D
    in the twin)."""
    if problem.dtype not in DTYPES:
        return False, f"dtype {problem.dtype} (the tensor-core kernels take float16 and bfloat16)"
    hd = head_dim_bucket(problem.max_head_dim)
    if hd is None:
        return False, f"head_dim {problem.max_head_dim} > {HEAD_DIMS[-1]}"
    if problem.ndim == 3 and problem.axes[2].length > MAX_Z:
        return False, f"a last axis of {problem.axes[2].length} positions (3D: at most {MAX_Z})"
    smem = shared_bytes(hd, problem.dtype, policy, problem.ndim)
    if smem > SHARED_BUDGET:
        return False, f"{smem} bytes of shared memory, more than {SHARED_BUDGET}"
    blocks = max(grid(problem, policy), backward_grid(problem))
    return P.within_grid_limit(blocks)


def kernel_name(problem: Problem, policy=None) -> str:
    hd = head_dim_bucket(problem.max_head_dim)
    return kernel_name_of(hd, problem.dtype, problem.ndim, config(hd, policy, problem.ndim))


def plan(problem: Problem, policy=None) -> Launch:
    hd = head_dim_bucket(problem.max_head_dim)
    return Launch(P.Kernel(source_of(NAME), kernel_name(problem, policy)), grid(problem, policy), THREADS,
                  shared_bytes(hd, problem.dtype, policy, problem.ndim))


def _family(name: str, ranks) -> Family:
    """The family (``ranks`` (1, 2)) or its 3D twin (``(3,)``): one rule and planner, each its instantiations."""
    instantiations = _instantiations(ranks)
    kernels = tuple(kernel_name_of(hd, dtype, ndim, cfg) for hd, dtype, ndim, cfg in instantiations)
    shared = {kernel_name_of(hd, dtype, ndim, cfg): shared_bytes_of(hd, dtype, cfg)
              for hd, dtype, ndim, cfg in instantiations}
    return Family(SOURCE, kernels, dict.fromkeys(kernels, THREADS), shared, min_arch=MIN_ARCH, name=name,
                  roles={"forward": Role(covers, plan, L.fused_forward, extra_tokens=True)}, ranks=frozenset(ranks))


FAMILY = register(_family(NAME, (1, 2)))
FAMILY_3D = register(_family(NAME + "_3d", (3,)))
