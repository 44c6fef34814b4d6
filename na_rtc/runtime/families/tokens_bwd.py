"""The extra key/value tokens' dK/dV kernel of a fused backward (``cuda_src/na_tokens_bwd.cu``).

``na_tokens_bwd_dkdv<T, HD, TT, QC>``: one block per (batch, key/value head, tile of TT tokens), the queries
of the group's heads streamed QC at a time; ``dxk = scale sum_i ds q_i`` and ``dxv = sum_i p dOut_i`` over
every query (the tokens have no window), from the forward's logsumexp and the delta of the fused backward
(:func:`na_rtc.runtime.launch.fused_backward` launches it after the neighborhood's kernels, whose dq kernel
adds the tokens' part of dq). One instantiation per dtype and head-dim bucket serves 1D and 2D; the 3D twin
``tokens_bwd_3d`` holds the ``<..., 3>`` ones (a query's z coordinate). Role:
``dkdv`` (fp32/fp16/bf16, head dim <= 256, shared memory within :data:`SHARED_BUDGET`, grid within CUDA's
limit).
"""

from __future__ import annotations

from ..._args import Problem
from .. import plan as P
from .. import tiling
from ..registry import RANK3_SUFFIX, Family, Launch, Role, register, source_of
from ..tiling import CTYPES
from .fused_bwd import DTYPES, HEAD_DIM_BUCKETS, SHARED_BUDGET, THREADS, row_stride

NAME = "tokens_bwd"
SOURCE = "na_tokens_bwd.cu"
#: head-dim bucket -> (TT tokens per block, QC queries per chunk): 256 / TT threads own a token and hold
#: HD / that dims of its dk and dv; shared memory at D = HD (:func:`shared_bytes`) stays under the budget for
#: every dtype (fp32 at 32: 33.6 KiB, 64: 42.2 KiB, 128: 35.3 KiB, 256: 33.4 KiB)
TILES = {32: (32, 32), 64: (32, 32), 128: (16, 16), 256: (8, 8)}


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIM_BUCKETS)


def kernel_name(dtype: str, hd: int, ndim: int = 2) -> str:
    tt, qc = TILES[hd]
    return f"na_tokens_bwd_dkdv<{CTYPES[dtype]}, {hd}, {tt}, {qc}{', 3' if ndim == 3 else ''}>"


def shared_bytes(problem: Problem, hd: int) -> int:
    """Token K and V rows, query and dOut rows, p and ds per pair, lse and delta per query (na_tokens_bwd.cu)."""
    tt, qc = TILES[hd]
    s = tiling.ITEMSIZE[problem.dtype]
    rs = row_stride(problem.max_head_dim, s)
    return 2 * tiling.align16(tt * rs * s) + 2 * tiling.align16(qc * rs * s) + 8 * tt * (qc + 1) + 8 * qc


def blocks(problem: Problem, hd: int) -> int:
    return problem.batch * problem.kv_heads * -(-problem.extra_tokens // TILES[hd][0])


def covers(problem: Problem, policy=None) -> tuple[bool, str]:
    """fp32/fp16/bf16, head dim <= 256, shared memory within the budget, the grid within CUDA's limit."""
    hd = head_dim_bucket(problem.max_head_dim)
    if problem.dtype not in DTYPES or hd is None:
        return False, (f"no extra-token gradient kernel for {problem.dtype} at head_dim {problem.max_head_dim} "
                       f"(float32/float16/bfloat16, head_dim <= {HEAD_DIM_BUCKETS[-1]})")
    shared = shared_bytes(problem, hd)
    if shared > SHARED_BUDGET:
        return False, f"{shared} bytes of shared memory, more than {SHARED_BUDGET}"
    return P.within_grid_limit(blocks(problem, hd))


def plan(problem: Problem, policy=None) -> Launch:
    hd = head_dim_bucket(problem.max_head_dim)
    family = NAME if problem.ndim in FAMILY.ranks else FAMILY_3D.name
    return Launch(P.Kernel(source_of(family), kernel_name(problem.dtype, hd, problem.ndim)), blocks(problem, hd),
                  THREADS, shared_bytes(problem, hd))


def names(ranks=frozenset({1, 2})) -> tuple[str, ...]:
    ndim = 3 if 3 in ranks else 2
    return tuple(kernel_name(dtype, hd, ndim) for dtype in DTYPES for hd in TILES)


def _family(name: str, ranks: frozenset) -> Family:
    kernels = names(ranks)
    return Family(SOURCE, kernels, dict.fromkeys(kernels, THREADS), dict.fromkeys(kernels, SHARED_BUDGET), name=name,
                  ranks=ranks, roles={"dkdv": Role(covers, plan)})


FAMILY = register(_family(NAME, frozenset({1, 2})))
#: the 3D twin: the rank-3 instantiations of the same source
FAMILY_3D = register(_family(NAME + RANK3_SUFFIX, frozenset({3})))
