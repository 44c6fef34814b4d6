"""The Hopper (wgmma, sm_90a) fused backward (``cuda_src/na_fused_wg_bwd.cu``): dq and dK/dV, fp16 / bf16.

* ``na_fused_wg_bwd_dq<T, HD, TX, TY, KC, QS, WG>``: dq as warpgroup products
  (S, dP, dQ += ds K) over the key box, KC keys at a time (QS: Q and dOut from
  shared memory, in 2D and 3D at head dim 128), then over the extra tokens
  (``extra_tokens=True``: streamed after the box, as the wgmma forward does);
* ``na_fused_wg_bwd_dkdv<T, HD, TX, TY, QC, WG>``: dK and dV per key tile over
  its query box, QC queries at a time (S^T, dP^T in the SS form, then
  dV += P^T dOut, dK += dS^T Q).

Blocks of WG warpgroups (64 rows each) as the forward's (``fused_wg.py``,
whose block tables they share). Each role replaces the mma.sync kernel of the
same role (``fused_tc_bwd.py``) on its own, so both require what the mma.sync
backward covers; the dq kernel's bias partials must also fit its budget. The
``delta`` and bias-reduction kernels around them are the SIMT backward's.
"""

from __future__ import annotations

from ..._args import Problem
from .. import plan as P
from .. import tiling
from ..registry import Family, Launch, Role, register, source_of
from ..tiling import CTYPES
from .fused_tc import rank_arguments
from .fused_tc_bwd import SHARED_BUDGET as MMA_SYNC_DQ_BUDGET
from .fused_tc_bwd import bias_entries
from .fused_wg import ARCH, BLOCK_TILES, block_threads, block_warpgroups, grid, head_dim_bucket, instantiations

NAME = "fused_wg_bwd"
SOURCE = "na_fused_wg_bwd.cu"
#: the dq kernel's, where its tiles do not fit the mma.sync backward's budget: room for bias tables (one float
#: an entry) beside two warpgroups' Q and dOut tiles at head dim 128 (87 KiB)
DQ_SHARED_BUDGET = 192 * 1024
#: keys per staged chunk of the dq kernel (two stages of K and V chunks live in the Q and dOut tiles' rows)
DQ_CHUNK_KEYS = 32
#: (ndim, head-dim bucket) where the dq kernel reads Q and dOut from shared memory (the SS form) instead of
#: fragment registers: in 2D at head dim 128, Q and dOut fragments, S, dP and dQ in registers leave no room
#: for the 2D and 3D boxes' index math (12 to 16 bytes of spills in 2D, 72 to 80 in 3D)
DQ_OPERANDS_SHARED = {(2, 128), (3, 128)}
#: head-dim bucket -> queries per staged chunk of the dK/dV kernel (the N of S^T = K Q^T); at head dim 128
#: the dK and dV accumulators take 128 registers a thread, so S^T and dP^T get 16 each
DKDV_CHUNK_QUERIES = {32: 64, 64: 64, 128: 32}


def dq_name_of(hd: int, dtype: str, ndim: int, warpgroups: int | None = None) -> str:
    wg = warpgroups or block_warpgroups(ndim)
    tile = BLOCK_TILES[ndim, wg]
    qs = int((ndim, hd) in DQ_OPERANDS_SHARED)
    return (f"na_fused_wg_bwd_dq<{CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}, {DQ_CHUNK_KEYS}, {qs}, {wg}"
            f"{rank_arguments(ndim, tile)}>")


def dq_shared_bytes(hd: int, dtype: str, ndim: int, bias_entries: int = 0, warpgroups: int | None = None) -> int:
    """Q and dOut tiles (64 rows a warpgroup of hd + 8, then the K/V stages; in the SS form 64 rows of hd,
    then the stages apart), ds floats, one float per bias entry."""
    item, rows = tiling.ITEMSIZE[dtype], 64 * (warpgroups or block_warpgroups(ndim))
    if (ndim, hd) in DQ_OPERANDS_SHARED:
        tiles = (2 * rows + 4 * DQ_CHUNK_KEYS) * hd * item
    else:
        tiles = 2 * rows * (hd + 8) * item
    return tiling.align16(tiles) + 4 * rows * (DQ_CHUNK_KEYS + 1) + 4 * bias_entries


def dq_shared_budget(hd: int, ndim: int, warpgroups: int | None = None) -> int:
    """The most dynamic shared memory a dq launch takes: the mma.sync backward's budget with one warpgroup
    and fragments in registers, DQ_SHARED_BUDGET otherwise (the launcher opts in above 48 KiB)."""
    one = (warpgroups or block_warpgroups(ndim)) == 1 and (ndim, hd) not in DQ_OPERANDS_SHARED
    return MMA_SYNC_DQ_BUDGET if one else DQ_SHARED_BUDGET


def dkdv_name_of(hd: int, dtype: str, ndim: int, warpgroups: int | None = None) -> str:
    wg = warpgroups or block_warpgroups(ndim)
    tile = BLOCK_TILES[ndim, wg]  # keys
    return (f"na_fused_wg_bwd_dkdv<{CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}, {DKDV_CHUNK_QUERIES[hd]}, {wg}"
            f"{rank_arguments(ndim, tile)}>")


def dkdv_shared_bytes(hd: int, dtype: str, ndim: int, warpgroups: int | None = None) -> int:
    """K and V tiles (2 x 64 rows a warpgroup) and two stages of a Q and a dOut chunk as core matrices, then two
    stages of chunk tables (lse, delta, 4 window bounds: 6 words a query; 8 in 3D, the z window too)."""
    qc, wg = DKDV_CHUNK_QUERIES[hd], warpgroups or block_warpgroups(ndim)
    words = 8 if ndim == 3 else 6
    return (2 * 64 * wg + 4 * qc) * hd * tiling.ITEMSIZE[dtype] + 2 * words * qc * 4


def dq_covers(problem: Problem, policy=None) -> tuple[bool, str]:
    """Given the wgmma forward's and the mma.sync backward's rules: the bias partials within the dq kernel's
    shared memory."""
    hd = head_dim_bucket(problem.max_head_dim)
    wg = block_warpgroups(problem.ndim, policy)
    smem = dq_shared_bytes(hd, problem.dtype, problem.ndim, bias_entries(problem), wg)
    budget = dq_shared_budget(hd, problem.ndim, wg)
    if smem > budget:
        return False, f"the dq kernel needs {smem} bytes of shared memory with this bias, more than {budget}"
    return True, ""


def dkdv_covers(problem: Problem, policy=None) -> tuple[bool, str]:
    """Given the same rules: always (the dK/dV kernel's launch is the same for every problem size)."""
    return True, ""


def dq_plan(problem: Problem, policy=None) -> Launch:
    """The dq launch; ``tiles``: query tiles per head (the bias partials' middle dimension)."""
    hd, wg = head_dim_bucket(problem.max_head_dim), block_warpgroups(problem.ndim, policy)
    blocks = grid(problem, policy)
    return Launch(P.Kernel(source_of(NAME), dq_name_of(hd, problem.dtype, problem.ndim, wg)), blocks,
                  block_threads(problem.ndim, wg), dq_shared_bytes(hd, problem.dtype, problem.ndim,
                                                                   bias_entries(problem), wg),
                  blocks // max(problem.heads, 1))


def dkdv_plan(problem: Problem, policy=None) -> Launch:
    hd, wg = head_dim_bucket(problem.max_head_dim), block_warpgroups(problem.ndim, policy)
    return Launch(P.Kernel(source_of(NAME), dkdv_name_of(hd, problem.dtype, problem.ndim, wg)),
                  grid(problem, policy, kv=True),
                  block_threads(problem.ndim, wg), dkdv_shared_bytes(hd, problem.dtype, problem.ndim, wg))


def names(ranks=(1, 2)) -> tuple[str, ...]:
    """The dq kernels, then the dK/dV kernels (``ranks`` (3,): the 3D twin's)."""
    return tuple(name_of(*instantiation) for name_of in (dq_name_of, dkdv_name_of)
                 for instantiation in instantiations(ranks))


def _launch_sizes(ranks) -> tuple[dict, dict]:
    shared, threads = {}, {}
    for hd, dtype, ndim, wg in instantiations(ranks):
        dq, dkdv = dq_name_of(hd, dtype, ndim, wg), dkdv_name_of(hd, dtype, ndim, wg)
        shared[dq] = dq_shared_budget(hd, ndim, wg)  # its largest launch (larger bias tables are not covered)
        shared[dkdv] = dkdv_shared_bytes(hd, dtype, ndim, wg)
        threads[dq] = threads[dkdv] = block_threads(ndim, wg)
    return threads, shared


_REQUIRES = (("fused_wg", "forward"), ("fused_tc_bwd", "dq"))


def _family(name: str, ranks) -> Family:
    """The family (``ranks`` (1, 2)) or its 3D twin (``(3,)``): the same rules and planners (the required rules
    are the 3D twins' for a 3D call), each its instantiations."""
    return Family(SOURCE, names(ranks), *_launch_sizes(ranks), archs=(ARCH,), arch_specific=True, name=name,
                  roles={"dq": Role(dq_covers, dq_plan, requires=_REQUIRES, extra_tokens=True),
                         "dkdv": Role(dkdv_covers, dkdv_plan, requires=_REQUIRES)}, ranks=frozenset(ranks))


FAMILY = register(_family(NAME, (1, 2)))
FAMILY_3D = register(_family(NAME + "_3d", (3,)))
