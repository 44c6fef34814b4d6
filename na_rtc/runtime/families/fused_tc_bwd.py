"""The tensor-core fused backward (``cuda_src/na_fused_tc_bwd.cu``): dq and dK/dV on mma.sync, fp16 / bf16.

* ``na_fused_tc_bwd_dq<T, HD, TX, TY, KC>``: one block of :data:`THREADS`
  threads per (batch, head, query tile of 64), the union of the tile's windows
  streamed KC keys at a time, with per-tile bias partials;
* ``na_fused_tc_bwd_dkdv<T, HD, TX, TY, QC>``: one block per (batch, head, key
  tile of 64), the queries that can see the tile streamed QC at a time.

Tiles and head-dim buckets are the forward's (``fused_tc.py``; 3D: 4 x 4 x 4
tiles, in the 3D twin ``fused_tc_bwd_3d``); both roles
(``dq``, ``dkdv``) require what the forward covers and share one rule: the
bias partials of the dq kernel and the dK/dV kernel's fixed size within shared
memory. The ``delta`` and bias-reduction kernels around them are the SIMT
backward's (``fused_bwd.py``), and the argument lists are the same.
"""

from __future__ import annotations

import math

from ..._args import Problem
from .. import plan as P
from .. import tiling
from ..registry import Family, Launch, Role, register, source_of
from ..tiling import CTYPES
from .fused_tc import DTYPES, HEAD_DIMS, MIN_ARCH, THREADS, TILES, backward_grid, head_dim_bucket, rank_arguments

NAME = "fused_tc_bwd"
SOURCE = "na_fused_tc_bwd.cu"
SHARED_BUDGET = 46 * 1024  # dynamic; the dkdv kernel's static window ranges stay under 48 KiB in all
#: head-dim bucket -> keys per chunk of the dq kernel (two stages of K and V chunks live in the 128 rows
#: of the Q and dOut tiles: 4 * keys <= 128)
DQ_CHUNK = {32: 32, 64: 32, 128: 16}
#: (ndim, head-dim bucket) -> queries per chunk of the dkdv kernel, streamed through two stages (chunk c + 1
#: loads during chunk c; at HD 128 52 KiB: the launch opts in)
DKDV_CHUNK = {(1, 32): 64, (2, 32): 64, (1, 64): 32, (2, 64): 32, (1, 128): 16, (2, 128): 16,
              (3, 32): 64, (3, 64): 32, (3, 128): 16}
#: the dkdv kernel's dynamic shared memory limit (its size does not depend on the problem); sm_86 / sm_89
#: allow 99 KiB after the opt-in
DKDV_SHARED_BUDGET = 96 * 1024


def dq_name_of(hd: int, dtype: str, ndim: int) -> str:
    tile = TILES[ndim, 1]
    return (f"na_fused_tc_bwd_dq<{CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}, {DQ_CHUNK[hd]}"
            f"{rank_arguments(ndim, tile)}>")


def dkdv_name_of(hd: int, dtype: str, ndim: int) -> str:
    tile = TILES[ndim, 1]
    return (f"na_fused_tc_bwd_dkdv<{CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}, {DKDV_CHUNK[ndim, hd]}"
            f"{rank_arguments(ndim, tile)}>")


def dq_shared_bytes(hd: int, dtype: str, bias_entries: int = 0) -> int:
    """Q and dOut tiles (64 rows each, then the K/V chunks' two stages), ds floats, one float per bias entry."""
    return tiling.align16(2 * 64 * (hd + 8) * tiling.ITEMSIZE[dtype]) + 4 * 64 * (DQ_CHUNK[hd] + 1) + 4 * bias_entries


def dkdv_shared_bytes(hd: int, dtype: str, ndim: int) -> int:
    """K and V tiles (64 rows), per stage (two) the Q and dOut chunks and lse, delta and 4 window bounds per
    query (6 in 3D: the z window too)."""
    qc, stages, bounds = DKDV_CHUNK[ndim, hd], 2, 6 if ndim == 3 else 4
    return (tiling.align16((2 * 64 + 2 * stages * qc) * (hd + 8) * tiling.ITEMSIZE[dtype])
            + stages * (4 * qc * 2 + 4 * bounds * qc))


def bias_entries(problem: Problem) -> int:
    """Entries of one head's bias table (the dq kernels keep one float each), 0 without a bias."""
    return math.prod(problem.rpb_shape[1:]) if problem.has_rpb else 0


def covers(problem: Problem, policy=None) -> tuple[bool, str]:
    """Given the forward's rule (``fused_tc.covers``): the bias partials and the dK/dV kernel within shared
    memory."""
    hd = head_dim_bucket(problem.max_head_dim)
    dq = dq_shared_bytes(hd, problem.dtype, bias_entries(problem))
    if dq > SHARED_BUDGET:
        return False, f"the dq kernel needs {dq} bytes of shared memory with this bias, more than {SHARED_BUDGET}"
    dkdv = dkdv_shared_bytes(hd, problem.dtype, problem.ndim)
    if dkdv > DKDV_SHARED_BUDGET:
        return False, f"the dK/dV kernel needs {dkdv} bytes of shared memory, more than {DKDV_SHARED_BUDGET}"
    return True, ""


def dq_plan(problem: Problem, policy=None) -> Launch:
    """The dq launch; ``tiles``: query tiles per head (the bias partials' middle dimension)."""
    hd = head_dim_bucket(problem.max_head_dim)
    blocks = backward_grid(problem)
    return Launch(P.Kernel(source_of(NAME), dq_name_of(hd, problem.dtype, problem.ndim)), blocks, THREADS,
                  dq_shared_bytes(hd, problem.dtype, bias_entries(problem)), blocks // max(problem.heads, 1))


def dkdv_plan(problem: Problem, policy=None) -> Launch:
    hd = head_dim_bucket(problem.max_head_dim)
    return Launch(P.Kernel(source_of(NAME), dkdv_name_of(hd, problem.dtype, problem.ndim)),
                  backward_grid(problem, kv=True), THREADS, dkdv_shared_bytes(hd, problem.dtype, problem.ndim))


def names(ranks=(1, 2)) -> tuple[str, ...]:
    return tuple(name for dtype in DTYPES for hd in HEAD_DIMS for ndim in ranks
                 for name in (dq_name_of(hd, dtype, ndim), dkdv_name_of(hd, dtype, ndim)))


def _shared(ranks) -> dict:
    """The largest launch of each: dkdv's fixed size, dq's budget (larger bias tables are not covered)."""
    shared = {}
    for dtype in DTYPES:
        for hd in HEAD_DIMS:
            for ndim in ranks:
                shared[dq_name_of(hd, dtype, ndim)] = SHARED_BUDGET
                shared[dkdv_name_of(hd, dtype, ndim)] = dkdv_shared_bytes(hd, dtype, ndim)
    return shared


_FORWARD = (("fused_tc", "forward"),)


def _family(name: str, ranks) -> Family:
    """The family (``ranks`` (1, 2)) or its 3D twin (``(3,)``): one rule and planner per role, each its
    instantiations (the forward's rule is required of the rank's own forward family)."""
    kernels = names(ranks)
    return Family(SOURCE, kernels, dict.fromkeys(kernels, THREADS), _shared(ranks), min_arch=MIN_ARCH, name=name,
                  roles={"dq": Role(covers, dq_plan, requires=_FORWARD, extra_tokens=True),
                         "dkdv": Role(covers, dkdv_plan, requires=_FORWARD)}, ranks=frozenset(ranks))


FAMILY = register(_family(NAME, (1, 2)))
FAMILY_3D = register(_family(NAME + "_3d", (3,)))
